"""Checkpoints of a training run and resuming from them, and what stops a job. A checkpoint is a directory
`step-NNNNNNNN` holding the engine's state (weights, masks, multipliers, optimizer; DeepSpeed's own format under
DeepSpeed), every rank's RNG states, the data position and the training fingerprint of the config that wrote it; it is
written to a temporary directory (after checking the disk has room for it), fsynced and renamed, then the `latest`
pointer is replaced atomically, so a kill or a full disk at any moment leaves the latest checkpoint readable. A
checkpoint resumes only under the same training fingerprint; an unreadable latest one falls back to the one before.

Signals: SIGTERM, SIGINT and SIGUSR2 (submitit's preemption / time-limit signal) ask the job to stop (at the next step
boundary in training, after saving; at the next forward call or stage boundary elsewhere) and it exits 128 + the
signal number (143, 130, 140); a second SIGINT aborts at once. SIGUSR1 asks for a checkpoint at the next step
boundary. The handlers only set flags, except inside an `abortable()` region (loading, tokenising: nothing to save),
where the stop is raised at once. A handler that was installed before ours (submitit's SIGUSR2 handler, which
requeues the job) is called once the job has stopped (`hand_over`), not while a step is running."""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import strict_json

log = logging.getLogger("vtrans")
POINTER = "latest"
STATE_FILE = "trainer_state.json"
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: the shell's code for "ended by SIGTERM"
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: "ended by SIGINT" (Ctrl-C)
_STEP_DIR = re.compile(r"^step-(\d{8,})$")

# ------------------------------------------------------------------------------------------------ signals

# Slurm preemption / requeue / scancel (TERM), Ctrl-C (INT), submitit's preemption and time-limit signal (USR2, its
# --signal=USR2@signal_delay_s): save if training, then end the job
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
SAVE_SIGNALS = (signal.SIGUSR1,)  # the time-limit warning (--signal=B:USR1@120) or a manual request: save, go on
_requests = {"save": False, "stop": 0}  # stop: the number of the signal that asked (0: none)
_abortable = [0]  # depth of abortable() regions
_stopped_by: list = []  # the stop signal received (kept past clear_requests: hand_over reads it after the stop)
_previous: dict = {}  # signal -> the Python handler it had before ours (e.g. submitit's requeue on USR2)


class Stopped(SystemExit):
    """The job stops because a signal asked it to; the process exits with 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGTERM, step: int | None = None):
        super().__init__(128 + int(signum))
        self.signum, self.step = int(signum), step

    def __str__(self) -> str:
        where = f" after saving a checkpoint at step {self.step}" if self.step is not None else ""
        return f"stopped by {signal.Signals(self.signum).name}{where} (exit code {self.code})"


class Preempted(Stopped):
    """Training saved a checkpoint after SIGTERM / SIGINT / SIGUSR2 and stops; a rerun of the same config resumes
    there."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(signum, step)


def _on_signal(signum, frame) -> None:
    if signum in SAVE_SIGNALS:
        _requests["save"] = True
        return
    if signum == signal.SIGINT and _requests["stop"]:
        raise KeyboardInterrupt  # a second Ctrl-C: abort now, without saving
    _requests["stop"] = signum
    _stopped_by[:] = [signum]
    if _abortable[0]:
        raise Stopped(signum)


def install_signal_handlers() -> None:
    """SIGTERM / SIGINT / SIGUSR2 -> stop (training saves at the next step boundary first); SIGUSR1 -> save at the next
    step boundary and go on. Python handlers found in place (submitit installs its own before the job runs; Python's
    own Ctrl-C handler excepted) are kept for `hand_over`."""
    for sig in STOP_SIGNALS + SAVE_SIGNALS:
        previous = signal.signal(sig, _on_signal)
        if callable(previous) and previous not in (_on_signal, signal.default_int_handler):
            _previous[sig] = previous


def hand_over() -> None:
    """After the job stopped on a signal (`Stopped`; `Preempted` once training saved): call the handler the stop signal
    had before ours, so the launcher does its part, e.g. submitit's USR2 handler requeues the job (resubmitting the
    same Hydra job, which resumes from the checkpoint) and exits. Nothing when the signal had no Python handler (plain
    sbatch: the template requeues)."""
    if not _stopped_by:
        return
    sig = _stopped_by.pop()
    handler = _previous.get(sig)
    if handler is not None:
        log.info("handing %s over to the handler installed before vtrans' (%s)", signal.Signals(sig).name,
                 getattr(handler, "__qualname__", handler))
        handler(sig, None)


def request_save() -> None:
    _requests["save"] = True


def request_stop(signum: int = signal.SIGTERM) -> None:
    _requests["stop"] = int(signum)


def signal_requests() -> tuple[bool, bool]:
    """(save requested, stop requested) on this process."""
    return _requests["save"], bool(_requests["stop"])


def stop_signal() -> int:
    """The signal that asked this process to stop; 0 when none did."""
    return _requests["stop"]


def clear_save_request() -> None:
    _requests["save"] = False


def clear_requests() -> None:
    _requests["save"], _requests["stop"] = False, 0


def check_stop() -> None:
    """Raise `Stopped` when a signal asked the job to stop (called at stage boundaries and on every forward call of
    an evaluated model)."""
    if _requests["stop"]:
        signum = _requests["stop"]
        clear_requests()
        raise Stopped(signum)


@contextlib.contextmanager
def abortable():
    """A region with nothing to save (loading a model, tokenising): a stop signal ends the job at once."""
    check_stop()
    _abortable[0] += 1
    try:
        yield
    finally:
        _abortable[0] -= 1


# ------------------------------------------------------------------------------------------------ free space


class FreeSpaceError(OSError):
    """A save that would not fit on its filesystem (or did not: the disk filled while writing)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # OSError pickles as (errno, strerror): a submitit job's error must reach its launcher whole
        return type(self), (self.strerror,)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes free to this process on the filesystem that holds (or will hold) `path`."""
    return shutil.disk_usage(_existing(Path(path))).free


def size_text(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB ({int(n):,} bytes)"


def check_free_space(path: str | Path, needed: int, what: str, reserve: int = 0) -> None:
    """Raise FreeSpaceError naming `path`, the bytes needed and the bytes free unless `needed` (+ `reserve`, room kept
    for something written later) fits."""
    free = free_bytes(path)
    if needed + reserve > free:
        extra = f" plus {size_text(reserve)} kept free for the model" if reserve else ""
        raise FreeSpaceError(f"not enough disk space to save {what} to {path}: needs about {size_text(needed)}"
                             f"{extra}, {size_text(free)} free; free some space or point the output elsewhere")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------------------------------ data position


def batch_stream(data, batch_size: int, seed: int, start: int = 0):
    """Global batches over epochs (epoch e in the order fixed by seed + e, incomplete batches dropped) as model-input
    dicts, starting `start` samples in: the stream a run resumed at sample `start` continues exactly."""
    from .data import batches, _num_samples

    tensors = data.tensors() if hasattr(data, "tensors") else data
    per_epoch = (_num_samples(tensors) // batch_size) * batch_size
    if per_epoch == 0:
        raise ValueError(f"{_num_samples(tensors)} samples make no full batch of {batch_size}")
    first, offset = divmod(start, per_epoch)
    for epoch in itertools.count(first):
        for b in batches(data, batch_size, shuffle=True, seed=seed + epoch, start=offset if epoch == first else 0,
                         drop_last=True):
            yield {"input_ids": b} if isinstance(b, torch.Tensor) else b


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed: the data position in the seed-fixed order
    history: list = field(default_factory=list)  # per-step stats so far
    world_size: int = 1
    engine: str = ""
    config: dict = field(default_factory=dict)  # the training fingerprint of the config that wrote it


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed (all unreadable), or one belongs to another config."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _remove(checkpoint: Path) -> None:
    """Renamed first, so that a half-deleted checkpoint never looks complete."""
    doomed = checkpoint.with_name(f".del-{checkpoint.name}")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unreadable(path: Path) -> str | None:
    """Why the checkpoint `path` cannot be resumed from (a missing or broken state file, a truncated tensor file);
    None when it looks whole. Cheap: reads the state file and each tensor file's zip directory, not the tensors."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        TrainState(**state)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (ValueError, TypeError) as e:
        return f"{STATE_FILE} is unreadable ({e})"
    for f in sorted(path.rglob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                size = f.stat().st_size
                if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                    return f"{f.relative_to(path)} is truncated"
        except (zipfile.BadZipFile, OSError) as e:
            return f"{f.relative_to(path)} is truncated or corrupted ({e})"
    return None


class Checkpointer:
    """Saves and restores a run's checkpoints under `root` (shared by all ranks)."""

    def __init__(self, root: str | Path, every: int = 0, keep: int = 2, resume: bool = True,
                 fingerprint: dict | None = None):
        if every < 0 or keep < 1:
            raise ValueError(f"checkpoint every={every} must be >= 0 and keep={keep} >= 1")
        self.root, self.every, self.keep, self.resume = Path(root), every, keep, resume
        self.fingerprint = fingerprint  # the training fingerprint saved with, and required of, every checkpoint
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, cc, out: Path, fingerprint: dict | None = None) -> "Checkpointer":
        """From the `checkpoint` config group; the directory defaults to <output dir>/checkpoints."""
        return cls(cc.dir or Path(out) / "checkpoints", every=cc.every, keep=cc.keep, resume=cc.resume,
                   fingerprint=fingerprint)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # --- finding ---
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (only complete ones ever carry a step-* name)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: the one the `latest` pointer names, then the others, newest
        first."""
        done = self.complete()[::-1]
        pointer = self.root / POINTER
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named in done:
                done.remove(named)
                done.insert(0, named)
        return done

    def readable(self) -> list[Path]:
        """`candidates()` that pass `unreadable`, warning (once) for each one skipped and naming the one used
        instead; raises CheckpointError naming the directory when there are checkpoints but none is readable."""
        found = self.candidates()
        good, bad = [], []
        for p in found:
            reason = unreadable(p)
            (bad if reason else good).append((p, reason))
        for p, reason in bad:
            if str(p) not in self._warned:
                self._warned.add(str(p))
                instead = next((g for g, _ in good if g != p), None)
                log.warning("checkpoint %s is unreadable (%s); %s", p, reason,
                            f"falling back to {instead}" if instead else "no other checkpoint to fall back to")
        if found and not good:
            raise CheckpointError(f"no readable checkpoint in {self.root}: " + "; ".join(
                f"{p.name}: {r}" for p, r in bad) + ". Move the directory away to start afresh")
        return [p for p, _ in good]

    def latest(self) -> Path | None:
        """The checkpoint a resume starts from: the newest readable one (the pointer's target when readable)."""
        found = self.readable()
        return found[0] if found else None

    def saved_fingerprint(self) -> tuple[Path, dict] | None:
        """(latest readable checkpoint, the training fingerprint it records); None without checkpoints."""
        path = self.latest()
        if path is None:
            return None
        return path, TrainState(**json.loads((path / STATE_FILE).read_text())).config

    def check_config(self, fingerprint: dict) -> None:
        """Raise CheckpointError naming every differing field (old -> new) when the latest checkpoint was written
        under another training fingerprint."""
        from .config import training_changes

        saved = self.saved_fingerprint()
        if saved is None:
            return
        path, old = saved
        if not old:
            log.warning("checkpoint %s records no config fingerprint (written by an older vtrans): resuming it "
                        "unchecked", path)
            return
        changes = training_changes(old, fingerprint)
        if changes:
            raise CheckpointError(
                f"{path} was written under another config; a checkpoint resumes only under the config that wrote "
                f"it. Changed: {'; '.join(changes)}. Use another output_dir (or checkpoint.dir), or "
                "checkpoint.resume=false to move the earlier run aside and start afresh")

    # --- saving ---
    def save(self, engine, state: TrainState, reason: str = "periodic", required: bool = True,
             reserve: int = 0) -> Path | None:
        """Collective: every rank calls it at the same step. First checks that the disk holds the estimated size
        (plus `reserve` bytes kept free for what is written later); a save that does not fit, or fails while
        writing, removes its temporary directory and raises FreeSpaceError / the error (`required`), or logs a
        warning and returns None (not `required`: a checkpoint the run can do without)."""
        self.root = Path(engine.broadcast_object(str(self.root)))  # one directory, whatever each rank was given
        name = f"step-{state.step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        problem = None
        if engine.is_main:
            try:
                needed = engine.state_bytes()
                check_free_space(self.root, needed + needed // 20 + 2 ** 20, f"checkpoint {name}", reserve)
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in [*self.root.glob(".tmp-step-*"), *self.root.glob(".del-step-*")]:  # a killed save
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                problem = (type(e).__name__, str(e))
        problem = engine.broadcast_object(problem)  # every rank takes the same branch
        if problem is None:
            failed = None
            try:
                engine.save_state(tmp)
                torch.save(rng_state(), tmp / f"rng-rank{engine.rank:05d}.pt")
                if engine.is_main:
                    state = TrainState(step=state.step, samples=state.samples, history=state.history,
                                       world_size=engine.world_size, engine=type(engine).__name__,
                                       config=self.fingerprint or {})
                    (tmp / STATE_FILE).write_text(strict_json.dumps(asdict(state)))  # a diverged step's inf: null
            except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
                failed = e
            if engine.any_rank(failed is not None)[0]:  # also the barrier: every rank's files are written
                if engine.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                problem = ("CheckpointError", f"saving checkpoint {name} to {self.root} failed ("
                           f"{failed or 'on another rank'}); {size_text(free_bytes(self.root))} free now; the partial "
                           "checkpoint was removed")
        if problem is not None:
            kind, message = problem
            if required:
                raise FreeSpaceError(message) if kind == "FreeSpaceError" else CheckpointError(message)
            log.warning("%s checkpoint not saved: %s. The run goes on without it (a rerun of this config that "
                        "stops before its model is saved retrains from the previous checkpoint)", reason, message)
            return None
        if engine.is_main:
            _fsync_tree(tmp)
            if final.exists():  # never the pointer's target: left by a run killed before its pointer moved
                _remove(final)
            os.replace(tmp, final)
            _fsync(self.root)
            _write_atomic(self.root / POINTER, name + "\n")
            self._prune(keep_also=final)
            log.info("checkpoint %s saved (%s)", final, reason)
        engine.barrier()
        return final

    def _prune(self, keep_also: Path) -> None:
        done = self.complete()
        for p in [p for p in done if p != keep_also][: max(0, len(done) - self.keep)]:
            _remove(p)

    # --- restoring ---
    def restore(self, engine) -> TrainState | None:
        """Load the latest readable checkpoint into `engine` (and this rank's RNG states), falling back to the one
        before when it cannot be loaded; None when starting fresh. Refuses a checkpoint of another config."""
        self.root = Path(engine.broadcast_object(str(self.root)))
        found = engine.broadcast_object([str(p) for p in self.readable()] if engine.is_main else None)
        if not found:
            return None
        if not self.resume:
            raise FileExistsError(f"{self.root} holds checkpoints of an earlier run (latest {Path(found[0]).name}) "
                                  "and checkpoint.resume=false; set checkpoint.resume=true to continue it, or choose "
                                  "another checkpoint.dir / output_dir")
        if self.fingerprint is not None:
            self.check_config(self.fingerprint)
        errors = []
        for k, name in enumerate(found):
            path = Path(name)
            state = TrainState(**json.loads((path / STATE_FILE).read_text()))
            if state.engine and state.engine != type(engine).__name__:
                raise RuntimeError(f"checkpoint {path} was written by a {state.engine} (deepspeed.enabled="
                                   f"{state.engine == 'DeepSpeedEngine'}); this run uses a {type(engine).__name__}: "
                                   "resume with the same deepspeed.enabled, or start in another checkpoint.dir / "
                                   "output_dir")
            error = None
            try:
                rng_file = path / f"rng-rank{engine.rank:05d}.pt"
                rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
                engine.load_state(path, state.world_size)  # DeepSpeed also reads another world size's
            except Exception as e:  # noqa: BLE001 - any failure to read it: try the previous checkpoint
                error = e
            if engine.any_rank(error is not None)[0]:
                errors.append(f"{path.name}: {error or 'failed on another rank'}")
                nxt = found[k + 1] if k + 1 < len(found) else None
                log.warning("checkpoint %s could not be loaded (%s); %s", path, error or "failed on another rank",
                            f"falling back to {nxt}" if nxt else "no other checkpoint to fall back to")
                continue
            if engine.is_main:  # checkpoints past the one resumed from belong to a run whose pointer never reached
                for later in self.complete():  # them, or could not be read
                    if int(_STEP_DIR.match(later.name).group(1)) > state.step:
                        _remove(later)
            if rng is not None:
                set_rng_state(rng)
            if engine.is_main:
                log.info("resuming from %s at step %d (sample %d)", path, state.step, state.samples)
            return state
        raise CheckpointError(f"no checkpoint in {self.root} could be loaded: {'; '.join(errors)}. Move the "
                              "directory away to start afresh")
