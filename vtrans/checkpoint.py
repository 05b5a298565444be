"""Checkpoints of a training run and resuming from them. A checkpoint is a directory `step-NNNNNNNN` holding the
engine's state (weights, masks, multipliers, optimizer; DeepSpeed's own format under DeepSpeed), every rank's RNG
states and the data position; it is written to a temporary directory, fsynced and renamed, then the `latest` pointer
is replaced atomically, so a kill at any moment leaves the latest checkpoint readable. SIGTERM / SIGUSR2 / SIGUSR1
handlers only set a flag: the training loop saves at the next step boundary (and stops after SIGTERM and SIGUSR2).
A handler that was installed before ours (submitit's SIGUSR2 handler, which requeues the job) is called once the
stop checkpoint is saved (`hand_over`), not while a step is running."""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import strict_json

log = logging.getLogger("vtrans")
POINTER = "latest"
STATE_FILE = "trainer_state.json"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the shell's code for "ended by SIGTERM"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")

# ------------------------------------------------------------------------------------------------ signals

# Slurm preemption / requeue / scancel (TERM); submitit's preemption and time-limit signal (USR2, its
# --signal=USR2@signal_delay_s): save, then end the run
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
SAVE_SIGNALS = (signal.SIGUSR1,)  # the time-limit warning (--signal=B:USR1@120) or a manual request: save, go on
_requests = {"save": False, "stop": False}
_stopped_by: list = []  # the stop signal received (kept past clear_requests: hand_over reads it after the save)
_previous: dict = {}  # signal -> the Python handler it had before ours (e.g. submitit's requeue on USR2)


class Preempted(SystemExit):
    """The run saved a checkpoint after SIGTERM and stops; the process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


def _on_signal(signum, frame) -> None:
    if signum in STOP_SIGNALS:
        _requests["stop"] = True
        _stopped_by[:] = [signum]
    else:
        _requests["save"] = True


def install_signal_handlers() -> None:
    """SIGTERM, SIGUSR2 -> save at the next step boundary and stop; SIGUSR1 -> save at the next step boundary.
    Python handlers found in place (submitit installs its own before the job runs) are kept for `hand_over`."""
    for sig in STOP_SIGNALS + SAVE_SIGNALS:
        previous = signal.signal(sig, _on_signal)
        if callable(previous) and previous is not _on_signal:
            _previous[sig] = previous


def hand_over() -> None:
    """After a stop checkpoint (`Preempted`): call the handler the stop signal had before ours, so the launcher does
    its part, e.g. submitit's USR2 handler requeues the job (resubmitting the same Hydra job, which resumes from the
    checkpoint) and exits. Nothing when the signal had no Python handler (plain sbatch: the template requeues)."""
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


def request_stop() -> None:
    _requests["stop"] = True


def signal_requests() -> tuple[bool, bool]:
    """(save requested, stop requested) on this process."""
    return _requests["save"], _requests["stop"]


def clear_save_request() -> None:
    _requests["save"] = False


def clear_requests() -> None:
    _requests["save"] = _requests["stop"] = False


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


class Checkpointer:
    """Saves and restores a run's checkpoints under `root` (shared by all ranks)."""

    def __init__(self, root: str | Path, every: int = 0, keep: int = 2, resume: bool = True):
        if every < 0 or keep < 1:
            raise ValueError(f"checkpoint every={every} must be >= 0 and keep={keep} >= 1")
        self.root, self.every, self.keep, self.resume = Path(root), every, keep, resume

    @classmethod
    def from_config(cls, cc, out: Path) -> "Checkpointer":
        """From the `checkpoint` config group; the directory defaults to <output dir>/checkpoints."""
        return cls(cc.dir or Path(out) / "checkpoints", every=cc.every, keep=cc.keep, resume=cc.resume)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # --- finding ---
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (only complete ones ever carry a step-* name)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The checkpoint the `latest` pointer names; the newest complete one if the pointer is missing."""
        pointer = self.root / POINTER
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            if _STEP_DIR.match(target.name) and (target / STATE_FILE).is_file():
                return target
        done = [p for p in self.complete() if (p / STATE_FILE).is_file()]
        return done[-1] if done else None

    # --- saving ---
    def save(self, engine, state: TrainState, reason: str = "periodic") -> Path:
        """Collective: every rank calls it at the same step."""
        self.root = Path(engine.broadcast_object(str(self.root)))  # one directory, whatever each rank was given
        name = f"step-{state.step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if engine.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in [*self.root.glob(".tmp-step-*"), *self.root.glob(".del-step-*")]:  # a killed save / prune
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        engine.barrier()
        engine.save_state(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{engine.rank:05d}.pt")
        if engine.is_main:
            state = TrainState(step=state.step, samples=state.samples, history=state.history,
                               world_size=engine.world_size, engine=type(engine).__name__)
            (tmp / STATE_FILE).write_text(strict_json.dumps(asdict(state)))  # a diverged step's inf: null
        engine.barrier()  # every rank's files are written
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
        """Load the latest checkpoint into `engine` (and this rank's RNG states); None when starting fresh."""
        self.root = Path(engine.broadcast_object(str(self.root)))
        found = engine.broadcast_object(str(p) if (p := self.latest()) else None)
        if found is None:
            return None
        path = Path(found)
        if not self.resume:
            raise FileExistsError(f"{self.root} holds checkpoints of an earlier run (latest {path.name}) and "
                                  "checkpoint.resume=false; set checkpoint.resume=true to continue it, or choose "
                                  "another checkpoint.dir / output_dir")
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
        if state.world_size != engine.world_size and state.engine == "DeepSpeedEngine":
            raise RuntimeError(f"checkpoint {path} was written by {state.world_size} ranks; DeepSpeed's ZeRO shards "
                               f"load only into the same number of ranks (now {engine.world_size})")
        if engine.is_main:  # checkpoints past the one resumed from belong to a run whose pointer never reached them
            for later in self.complete():
                if int(_STEP_DIR.match(later.name).group(1)) > state.step:
                    _remove(later)
        engine.load_state(path)
        rng = path / f"rng-rank{engine.rank:05d}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        if engine.is_main:
            log.info("resuming from %s at step %d (sample %d)", path, state.step, state.samples)
        return state
