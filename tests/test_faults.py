"""Faults and bad inputs end in a clear error or a correct result, and nothing is lost: a run directory of another
config is refused before any model loads (or set aside with checkpoint.resume=false); a full disk fails a save with
the path and the bytes, removes the partial save and never costs the pruned model; SIGINT / SIGTERM stop every stage
of every job with the signal's exit code, after saving what training needs; an unreadable latest checkpoint falls
back to the one before; the family's conflicts fail from the model's config alone; data that is not text, or a broken
JSON line, is refused naming the file (and the line). Real jobs on tiny models, real subprocesses and signals, a real
small filesystem (tmpfs) where the behaviour is about them."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.test_distributed import build, mask_state, train
from tests.test_jobs import compose_cfg, make_model, minilm_tokenizer
from vtrans import checkpoint as ckpt
from vtrans import pipeline as P
from vtrans.checkpoint import Checkpointer, CheckpointError, FreeSpaceError, Stopped
from vtrans.engine import Engine
from vtrans.jobs import run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_pending_requests():
    ckpt.clear_requests()
    yield
    ckpt.clear_requests()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaMA (GQA) saved with the real MiniLM tokenizer, and real text (gensim's Lee corpus)."""
    from gensim.test.utils import datapath

    root = tmp_path_factory.mktemp("fault_assets")
    tok = minilm_tokenizer()
    make_model("llama", "lm", tok).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    lee = [line.strip() for line in open(datapath("lee_background.cor")) if line.strip()]
    (root / "lee.txt").write_text("\n".join(lee[:60]) + "\n")
    (root / "lee_all.txt").write_text("\n".join(lee) + "\n")
    return root


def overrides(assets: Path, *extra, text: str = "lee.txt") -> list[str]:
    return ["model.package=", f"model.name_or_path={assets / 'llama'}", "model.gguf_file=",
            f"data.source={assets / text}", "data.seq_len=32", "data.max_eval_blocks=6",
            "budget.count_embeddings=false", "optim.steps=3", "optim.log_every=1", "progress=false", *extra]


def prune(assets: Path, out: Path, *extra) -> dict:
    return run(compose_cfg(overrides(assets, f"output_dir={out}", *extra)))


def digest(path: Path) -> dict[str, str]:
    """{relative file: sha256} of every file under `path` (a file: itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def no_model_loads(monkeypatch):
    """Any attempt to load weights or read data fails the test: what is checked must fail before them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded / data was read before the check")

    monkeypatch.setattr(P, "load_model", refuse)
    monkeypatch.setattr(P.D, "load_documents", refuse)


# ---------------------------------------------------------------------------------------------------------------
# 1. a reused run directory


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished prune run (budget 0.8) and the fingerprint of its files."""
    out = tmp_path_factory.mktemp("finished")
    metrics = prune(assets, out)
    return out, metrics


@pytest.mark.parametrize("change,named", [
    (["budget.target=0.5"], "budget.target: 0.8 -> 0.5"),
    (["mask.structures=[neurons,heads]"],
     'mask.structures: ["hidden", "heads", "attention", "neurons", "ffn"] -> ["neurons", "heads"]'),
    (["eval.batch_size=4"], "eval.batch_size: 8 -> 4"),  # a finished run's metrics are not replaced either
])
def test_another_config_in_a_finished_run_dir_is_refused_before_the_model_loads(finished, assets, monkeypatch,
                                                                                 change, named):
    out, _ = finished
    before = {**digest(out / "model"), **digest(out / "metrics.json"), **digest(out / "checkpoints")}
    no_model_loads(monkeypatch)
    with pytest.raises(P.OutputConflict, match="checkpoint.resume=false") as refused:
        prune(assets, out, *change)
    assert named in str(refused.value) and str(out) in str(refused.value)
    assert {**digest(out / "model"), **digest(out / "metrics.json"), **digest(out / "checkpoints")} == before


def test_another_job_may_not_write_over_a_run(finished, assets, monkeypatch):
    out, _ = finished
    no_model_loads(monkeypatch)
    with pytest.raises(P.OutputConflict, match="job=evaluate would write its results over"):
        run(compose_cfg(overrides(assets, f"output_dir={out}", "job=evaluate", f"model_dir={out / 'model'}")))


def test_the_same_config_reruns_without_retraining(finished, assets, monkeypatch):
    out, first = finished
    model = digest(out / "model")
    monkeypatch.setattr(Engine, "train_step", lambda *a: pytest.fail("trained again: the end checkpoint was not used"))
    again = prune(assets, out)
    assert again["ppl_pruned"] == first["ppl_pruned"] and again["final_loss"] == first["final_loss"]
    assert digest(out / "model") == model


def test_a_checkpoint_of_another_config_is_refused_on_restore(tmp_path):
    mm, module, groups = build()
    train(Engine(module, groups, grad_accum=2, seed=0), steps=2,
          checkpointer=Checkpointer(tmp_path, fingerprint={"budget.target": 0.8, "mask.k": 10.0}))
    mm, module, groups = build()
    with pytest.raises(CheckpointError, match=r"Changed: budget.target: 0.8 -> 0.5"):
        train(Engine(module, groups, grad_accum=2, seed=0), steps=4,
              checkpointer=Checkpointer(tmp_path, fingerprint={"budget.target": 0.5, "mask.k": 10.0}))


def test_resume_false_moves_the_earlier_run_aside(assets, tmp_path):
    first = prune(assets, tmp_path)
    kept = digest(tmp_path / "model")
    second = prune(assets, tmp_path, "budget.target=0.5", "checkpoint.resume=false")
    (previous,) = (tmp_path / "previous").iterdir()
    assert json.loads((previous / "metrics.json").read_text())["ppl_pruned"] == first["ppl_pruned"]
    assert digest(previous / "model") == kept
    assert [p.name for p in Checkpointer(previous / "checkpoints").complete()] == ["step-00000003"]
    assert json.loads((previous / "run.json").read_text())["config"]["budget.target"] == 0.8
    assert second["budget_target"] == 0.5
    assert json.loads((tmp_path / "metrics.json").read_text())["budget_target"] == 0.5


@pytest.mark.slow  # a subprocess: imports and loads again (~15-30 s)
@pytest.mark.timeout(180)
def test_launch_refuses_before_hydra_writes_into_the_run_dir(finished, assets):
    """The user's command: `python launch.py ... hydra.run.dir=X budget.target=0.5` over a finished 0.8 run: exit 1
    naming the change, the earlier run's .hydra/, log, model and metrics untouched."""
    out, _ = finished
    (out / ".hydra").mkdir(exist_ok=True)
    (out / ".hydra" / "config.yaml").write_text("budget:\n  target: 0.8\n")
    (out / "launch.log").write_text("the first run's log\n")
    before = {**digest(out / ".hydra"), **digest(out / "launch.log"), **digest(out / "model"),
              **digest(out / "metrics.json")}
    r = subprocess.run([sys.executable, "launch.py", *overrides(assets, f"hydra.run.dir={out}", "budget.target=0.5")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=170)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "budget.target: 0.8 -> 0.5" in r.stderr and "checkpoint.resume=false" in r.stderr
    after = {**digest(out / ".hydra"), **digest(out / "launch.log"), **digest(out / "model"),
             **digest(out / "metrics.json")}
    assert after == before


# ---------------------------------------------------------------------------------------------------------------
# 3. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_bytes) -> a fresh tmpfs of that size (a real filesystem that fills up); unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_checkpoint_that_does_not_fit_fails_naming_path_bytes_needed_and_free(small_disk):
    disk = small_disk(256 * 1024)
    mm, module, groups = build()
    engine = Engine(module, groups, grad_accum=2, seed=0)
    needed = engine.state_bytes()
    with pytest.raises(FreeSpaceError) as full:
        train(engine, steps=2, checkpointer=Checkpointer(disk / "ckpt", every=1))
    message = str(full.value)
    assert str(disk / "ckpt") in message and "needs about" in message and "free" in message
    assert re.search(r"needs about [\d.,]+ MiB \([\d,]+ bytes\), [\d.,]+ MiB \([\d,]+ bytes\) free", message)
    stated = int(re.search(r"needs about [\d.,]+ MiB \(([\d,]+) bytes\)", message).group(1).replace(",", ""))
    assert needed < stated < needed * 1.06 + 2 ** 20 + 4096  # the estimate (Adam's state counted), with its margin
    assert not list(disk.rglob(".tmp-*"))


def test_a_free_space_error_survives_pickling():
    """A submitit job's exception is pickled back to its launcher: a full disk must arrive as itself, message intact
    (OSError pickles as (errno, strerror), which FreeSpaceError's one-argument constructor once refused)."""
    import errno
    import pickle

    err = FreeSpaceError("not enough disk space to save the model to /x: needs about 1 MiB, 0 MiB free")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is FreeSpaceError and str(back) == str(err) and back.errno == errno.ENOSPC


def test_a_save_the_disk_fills_during_is_removed_and_the_latest_stays(small_disk, monkeypatch, tmp_path):
    """The estimate is beaten (the preflight sees room; the real write runs out of it): the partial checkpoint is
    removed and the previous one stays the readable latest."""
    mm, module, groups = build()
    engine = Engine(module, groups, grad_accum=2, seed=0)
    train(engine, steps=1, checkpointer=Checkpointer(tmp_path / "roomy", every=1))
    size = sum(f.stat().st_size for f in (tmp_path / "roomy" / "step-00000001").iterdir())
    disk = small_disk(int(size * 1.5))  # one checkpoint fits, a second does not
    mm, module, groups = build()
    engine = Engine(module, groups, grad_accum=2, seed=0)
    ckpts = Checkpointer(disk / "ckpt", every=1)
    monkeypatch.setattr(ckpt, "check_free_space", lambda *a, **k: None)  # as if the estimate were too low
    with pytest.raises(CheckpointError, match=r"saving checkpoint step-00000002 to .*ckpt failed .*removed"):
        train(engine, steps=3, checkpointer=ckpts)
    assert [p.name for p in ckpts.complete()] == ["step-00000001"] and ckpts.latest().name == "step-00000001"
    assert not list((disk / "ckpt").glob(".tmp-*"))


def test_a_full_disk_at_the_end_checkpoint_keeps_the_pruned_model(assets, finished, small_disk, caplog):
    """Room for the model but not for the end-of-training checkpoint and the model: the checkpoint is skipped with a
    warning, the model and metrics are written, nothing partial is left."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(assets / "llama")
    model_room = P.model_bytes(dense)
    roomy, probe = finished  # the same run on a roomy disk: its end checkpoint's real size
    end = sum(f.stat().st_size for f in (roomy / "checkpoints").rglob("*") if f.is_file())
    disk = small_disk(model_room + end // 2)
    with caplog.at_level(logging.WARNING, logger="vtrans"):
        m = prune(assets, disk / "run")
    assert "end checkpoint not saved" in caplog.text and "not enough disk space" in caplog.text
    assert (disk / "run" / "metrics.json").is_file() and (disk / "run" / "model" / "config.json").is_file()
    assert m["ppl_pruned"] == probe["ppl_pruned"]
    assert not list((disk / "run").rglob(".tmp-*")) and not Checkpointer(disk / "run" / "checkpoints").complete()


def test_a_model_that_does_not_fit_fails_naming_the_path_and_leaves_nothing_partial(assets, small_disk):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets / "llama")
    tok = AutoTokenizer.from_pretrained(assets / "llama")
    disk = small_disk(P.model_bytes(model) // 2)
    with pytest.raises(FreeSpaceError, match=rf"to save the model to {disk}: needs about .* free"):
        P.save_model(model, tok, disk / "model")
    assert not list(disk.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 4. signals


def test_stop_signals_set_a_flag_with_their_exit_code_and_abort_where_nothing_is_to_save():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        ckpt.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGINT)  # only a flag: training saves at its next step boundary
        assert ckpt.signal_requests() == (False, True) and ckpt.stop_signal() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Stopped) as stopped:
            ckpt.check_stop()
        assert stopped.value.code == 130 and ckpt.stop_signal() == 0
        with pytest.raises(Stopped) as stopped:  # loading / tokenising: nothing to save, stop at once
            with ckpt.abortable():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                pytest.fail("the stop did not interrupt the abortable region")
        assert stopped.value.code == 143
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


class Launched:
    """A `python launch.py ...` subprocess whose output is read as it comes (tqdm redraws with \\r, not lines)."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait_for(self, marker: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while marker not in self.text:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.proc.kill()
                raise AssertionError(f"{marker!r} never appeared:\n{self.text[-3000:]}")
            time.sleep(0.05)

    def stop(self, signum: int, timeout: float) -> tuple[int, float]:
        """Send `signum`; (exit code, seconds it took to exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {timeout} s after {signal.Signals(signum).name}:\n{self.text[-3000:]}")
        self._reader.join(5)
        return code, time.monotonic() - t0


# ~5,000 one-block batches of held-out text: an evaluation of many seconds even on a tiny model
LONG_EVALUATION = ("data.heldout_fraction=0.9", "data.max_eval_blocks=0", "data.seq_len=16", "eval.batch_size=1",
                   "progress=true")


@pytest.mark.slow  # a subprocess: imports and loads again (~15-30 s)
@pytest.mark.timeout(240)
def test_sigterm_during_an_evaluate_job_exits_143_within_a_batch(assets, tmp_path):
    job = Launched(overrides(assets, f"hydra.run.dir={tmp_path}", "job=evaluate", *LONG_EVALUATION,
                             text="lee_all.txt"))
    job.wait_for("evaluate (perplexity):")
    code, seconds = job.stop(signal.SIGTERM, timeout=30)
    assert code == 143, job.text[-3000:]
    assert seconds < 10 and "stopped by SIGTERM" in job.text
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_during_the_dense_evaluation_exits_143_within_a_batch(assets, tmp_path):
    job = Launched(overrides(assets, f"hydra.run.dir={tmp_path}", *LONG_EVALUATION, text="lee_all.txt"))
    job.wait_for("dense (perplexity):")
    code, seconds = job.stop(signal.SIGTERM, timeout=30)
    assert code == 143 and seconds < 10, job.text[-3000:]
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_during_training_saves_and_a_rerun_ends_with_the_identical_model(assets, tmp_path):
    """Ctrl-C (SIGINT) with the default checkpoint.every=0: the step finishes, a checkpoint is saved, exit 130; the
    rerun resumes there and ends with the same model, bit for bit, as an uninterrupted run."""
    steps = ["optim.steps=20"]
    reference = prune(assets, tmp_path / "reference", *steps)
    job = Launched(overrides(assets, f"hydra.run.dir={tmp_path / 'run'}", "progress=true", *steps))
    job.wait_for("faster-vtrans:")
    code, _ = job.stop(signal.SIGINT, timeout=60)
    assert code == 130, job.text[-3000:]
    saved = Checkpointer(tmp_path / "run" / "checkpoints").latest()
    assert saved is not None and 0 < int(saved.name.split("-")[1]) < 20
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.json").exists()
    resumed = prune(assets, tmp_path / "run", *steps)
    for key in ("final_loss", "ppl_pruned", "shape_pruned", "params_pruned"):
        assert resumed[key] == reference[key], key
    ours = digest(tmp_path / "run" / "model")
    theirs = digest(tmp_path / "reference" / "model")
    assert {Path(k).name: v for k, v in ours.items()} == {Path(k).name: v for k, v in theirs.items()}


def _stop_at_last_step(monkeypatch, steps: int):
    real = Engine.train_step

    def step(self, micro, i):
        if i == steps - 1:
            ckpt.request_stop(signal.SIGINT)
        return real(self, micro, i)

    monkeypatch.setattr(Engine, "train_step", step)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return prune(assets, out), digest(out / "model")


def _same_run(metrics: dict, model: dict, reference) -> None:
    ref_metrics, ref_model = reference
    for key in ("final_loss", "ppl_pruned", "ppl_dense", "shape_pruned"):
        assert metrics[key] == ref_metrics[key], key
    assert {Path(k).name: v for k, v in model.items()} == {Path(k).name: v for k, v in ref_model.items()}


@pytest.mark.parametrize("where", ["after training", pytest.param("warm start", marks=pytest.mark.slow),
                                   pytest.param("dense evaluation", marks=pytest.mark.slow), "compensation",
                                   "pruned evaluation"])
def test_a_stop_in_any_stage_exits_with_its_code_and_a_rerun_finishes(assets, tmp_path, monkeypatch, reference,
                                                                      where):
    """A stop (as by SIGINT) in each stage of the prune job: the job ends with 130; the rerun ends with the
    uninterrupted run's model. A stop after training, or during the pruned model's evaluation, leaves the end
    checkpoint: the rerun does not train again."""
    real_score, real_ppl = P.score_masks, P.perplexity
    if where == "after training":
        _stop_at_last_step(monkeypatch, 3)
    elif where == "warm start":
        monkeypatch.setattr(P, "score_masks", lambda *a, **k: (ckpt.request_stop(signal.SIGINT), real_score(*a, **k)))
    elif where == "compensation":  # the refit (turned on below) runs layer by layer before the model is saved
        real_refit = P.refit_outputs
        monkeypatch.setattr(P, "refit_outputs", lambda *a, **k: (ckpt.request_stop(signal.SIGINT),
                                                                 real_refit(*a, **k))[1])
    else:
        from vtrans.models import is_pruned

        def perplexity(model, *a, **k):  # a signal arriving while the stage evaluates
            if is_pruned(model.config) == (where == "pruned evaluation"):
                ckpt.request_stop(signal.SIGINT)
            return real_ppl(model, *a, **k)
        monkeypatch.setattr(P, "perplexity", perplexity)
    # the dense model's perplexity must really be computed (not read from the dense-perplexity cache) to be stopped
    extra = {"dense evaluation": ["eval.cache_dense=false"], "compensation": ["mask.compensate=true"]}.get(where, [])
    with pytest.raises(Stopped) as stopped:
        prune(assets, tmp_path, *extra)
    assert stopped.value.code == 130
    assert not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "model").exists() == (where == "pruned evaluation")  # saved before it is evaluated
    monkeypatch.undo()
    trained = where in ("after training", "compensation", "pruned evaluation")
    if trained:
        assert Checkpointer(tmp_path / "checkpoints").latest().name == "step-00000003"
        monkeypatch.setattr(Engine, "train_step", lambda *a: pytest.fail("trained again"))
    # evaluation settings may change before the rerun (here one that leaves every metric as it was)
    metrics = prune(assets, tmp_path, *extra, *(["eval.primary=ppl"] if where == "pruned evaluation" else []))
    if where == "compensation":  # the same training and decision as the reference run, then the refit it lacks
        assert metrics["compensated_ffn"] > 0
        for key in ("final_loss", "ppl_dense", "shape_pruned"):
            assert metrics[key] == reference[0][key], key
        return
    _same_run(metrics, digest(tmp_path / "model"), reference)


def test_the_refit_settings_may_change_before_a_rerun_without_training_again(assets, tmp_path, monkeypatch,
                                                                          reference):
    """The output refit runs after training: a run stopped after training reruns with the refit turned on (or its
    settings changed) from its end checkpoint, and refits the same decision."""
    _stop_at_last_step(monkeypatch, 3)
    with pytest.raises(Stopped):
        prune(assets, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(Engine, "train_step", lambda *a: pytest.fail("trained again"))
    metrics = prune(assets, tmp_path, "mask.compensate=true", "mask.compensate_damp=1.0")
    assert metrics["compensated_ffn"] > 0
    for key in ("final_loss", "ppl_dense", "shape_pruned"):
        assert metrics[key] == reference[0][key], key
    # a field training depends on still refuses the checkpoint, naming it
    with pytest.raises(Exception, match=r"mask.beta"):
        prune(assets, tmp_path, "mask.beta=1e-3")


# ---------------------------------------------------------------------------------------------------------------
# 5. corrupted checkpoints


def _three_checkpoints(root: Path) -> dict:
    mm, module, groups = build(log_sigma2=-9.0)
    train(Engine(module, groups, grad_accum=2, seed=0), steps=6, checkpointer=Checkpointer(root, every=2, keep=3))
    return mask_state(module)


def _resume(root: Path) -> dict:
    mm, module, groups = build(log_sigma2=-9.0)
    history = train(Engine(module, groups, grad_accum=2, seed=0), steps=6, checkpointer=Checkpointer(root, every=2,
                                                                                                      keep=3))
    assert len(history) == 6
    return mask_state(module)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    """Truncated (caught by reading its zip directory) or missing (caught when loading) engine state in the latest
    checkpoint: a warning names both checkpoints, the run resumes from step 4 and ends as the uninterrupted one."""
    reference = _three_checkpoints(tmp_path / "reference")
    root = tmp_path / "run"
    _three_checkpoints(root)
    # the run was stopped at step 6 as far as the files tell: redo it from the damaged latest
    engine_file = root / "step-00000006" / "engine.pt"
    if damage == "truncated":
        engine_file.write_bytes(engine_file.read_bytes()[: engine_file.stat().st_size // 2])
    else:
        engine_file.unlink()
    with caplog.at_level(logging.WARNING, logger="vtrans"):
        got = _resume(root)
    assert "step-00000006" in caplog.text and "falling back to" in caplog.text and "step-00000004" in caplog.text
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    assert Checkpointer(root).latest().name == "step-00000006"  # saved again, whole


def test_no_readable_checkpoint_is_an_error_naming_the_directory(tmp_path):
    _three_checkpoints(tmp_path)
    for p in tmp_path.glob("step-*/engine.pt"):
        p.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=rf"no readable checkpoint in {tmp_path}"):
        _resume(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 6. conflicts the model family decides, found from the model's config alone


def test_uniform_export_of_masked_heads_fails_before_data_or_weights(tmp_path, monkeypatch):
    """The user's `model=minilm data=polarity export_uniform=true`: refused after reading MiniLM's config.json."""
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match="uniform export of a bert model can only prune FFN neurons"):
        run(compose_cfg(["model=minilm", "data=polarity", "export_uniform=true", f"output_dir={tmp_path}",
                         "progress=false"]))
    # the structures a uniform BERT export allows pass the check (and fail only at the stubbed loader)
    with pytest.raises(AssertionError, match="a model was loaded"):
        run(compose_cfg(["model=minilm", "data=polarity", "export_uniform=true", "mask.structures=[neurons,ffn]",
                         f"output_dir={tmp_path}", "progress=false"]))


def test_a_task_the_family_has_no_head_for_fails_from_its_config(tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    with pytest.raises(ValueError, match=r"model.task=causal_lm is supported for the model families \[.*'llama'"):
        run(compose_cfg(["model=minilm", "model.task=causal_lm", f"output_dir={tmp_path}", "progress=false"]))


# ---------------------------------------------------------------------------------------------------------------
# 7. data that is not what it claims


def test_random_bytes_as_text_are_refused_naming_the_file(tmp_path):
    from vtrans.data import load_documents

    path = tmp_path / "random.txt"
    path.write_bytes(random.Random(0).randbytes(200_000))
    with pytest.raises(ValueError, match=rf"{path}' does not look like text: .*% of its characters"):
        load_documents(str(path))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("A perfectly good sentence.\n" * 50, encoding="utf-16")
    with pytest.raises(ValueError, match="utf16.txt' does not look like text"):
        load_documents(str(utf16))


def test_latin1_text_is_read_with_a_warning(tmp_path, caplog):
    from gensim.test.utils import datapath

    from vtrans.data import load_documents

    with caplog.at_level(logging.WARNING):
        docs = load_documents("gensim:pang_lee_polarity.cor")
    assert len(docs) == 200 and "is not UTF-8" in caplog.text and "latin-1" in caplog.text
    assert Path(datapath("pang_lee_polarity.cor")).name in caplog.text


def test_a_broken_jsonl_line_is_reported_with_its_number_and_file(tmp_path):
    from vtrans.data import load_documents

    path = tmp_path / "broken.jsonl"
    lines = [json.dumps({"text": f"sentence number {i}", "label": i % 2}) for i in range(20)]
    lines[6] = lines[6][:-5]  # line 7 cut short
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}' line 7 is not a JSON object"):
        load_documents(str(path))
