"""Checkpoints and resuming: a run stopped (as by SIGTERM) and resumed ends with the same masks as an uninterrupted
run (one process, the prune job, and 2-process ZeRO-2 / ZeRO-3); the data stream resumes at its exact position; a kill
at any point of a save leaves the latest checkpoint readable; signal handlers only set flags."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import build, mask_state, spawn, token_data, train
from vtrans import checkpoint as ckpt
from vtrans.checkpoint import Checkpointer, Preempted, batch_stream
from vtrans.engine import Engine, _strip_names, fit, lr_schedule

REPO = Path(__file__).resolve().parents[1]
STEPS, STOP_AT = 6, 3
NOISY = -9.0  # the default log sigma^2: the VIB noise matters, so the RNG states must be restored too
NEURONS = "layers.0.neurons.mu"
GAIN = "layers.0.ffn_gain.scale"


@pytest.fixture(autouse=True)
def no_pending_requests():
    ckpt.clear_requests()
    yield
    ckpt.clear_requests()


def _stop_at(step_to_stop: int):
    """An on_log callback that asks the run to stop (what SIGTERM does) after the given step."""
    return lambda step, stats: ckpt.request_stop() if step == step_to_stop else None


def _run_single(root: Path, stop_at: int | None = None, every: int = 2):
    mm, module, groups = build(log_sigma2=NOISY)
    engine = Engine(module, groups, grad_accum=2, seed=0)
    history = train(engine, steps=STEPS, checkpointer=Checkpointer(root, every=every),
                    on_log=_stop_at(stop_at) if stop_at else None)
    return module, history


def test_batch_stream_resumes_at_its_sample_offset():
    data = token_data(10)  # 2 full batches of 4 per epoch (drop_last)
    full = batch_stream(data, 4, seed=3)
    whole = [next(full)["input_ids"] for _ in range(7)]
    for k in range(7):
        tail = batch_stream(data, 4, seed=3, start=4 * k)
        for expected in whole[k:]:
            assert torch.equal(next(tail)["input_ids"], expected)
    assert not torch.equal(whole[0], whole[2])  # a new order each epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps in one go, checkpointed every 2: (checkpoint dir, final masks, losses)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    module, history = _run_single(root)
    return root, mask_state(module), [h["loss"] for h in history]


def _assert_same_masks(module, expected: dict) -> None:
    got = mask_state(module)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_single_process_resume_equals_uninterrupted(tmp_path, uninterrupted):
    _, ref_masks, ref_losses = uninterrupted
    with pytest.raises(Preempted) as stopped:
        _run_single(tmp_path, stop_at=STOP_AT)
    assert stopped.value.step == STOP_AT and stopped.value.code == ckpt.PREEMPTED_EXIT_CODE
    assert Checkpointer(tmp_path).latest().name == f"step-{STOP_AT:08d}"
    module, history = _run_single(tmp_path)
    assert [h["loss"] for h in history] == ref_losses
    _assert_same_masks(module, ref_masks)
    initial = mask_state(build(log_sigma2=NOISY)[1])
    assert not torch.allclose(ref_masks[NEURONS], initial[NEURONS])  # the masks did train
    assert not torch.allclose(ref_masks[GAIN], initial[GAIN])  # and the gains, restored with them


def test_lr_schedules_warm_up_then_decay_to_zero_after_the_last_step():
    cos, lin, const = (lr_schedule(k, 10, warmup_steps=2) for k in ("cosine", "linear", "constant"))
    for f in (cos, lin, const):
        assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]  # the ramp, then the peak
    assert const(9) == 1.0
    assert lin(6) == pytest.approx(0.5) and cos(6) == pytest.approx(0.5)  # half way through the 8 decaying steps
    for f in (cos, lin):
        factors = [f(s) for s in range(2, 10)]
        assert factors == sorted(factors, reverse=True)
    assert lin(9) == pytest.approx(1 / 8) and 0 < cos(9) < lin(9)  # the last step still moves the weights
    with pytest.raises(ValueError, match=r"schedule 'step' is not one of constant, linear, cosine"):
        lr_schedule("step", 10)


def _run_scheduled(root: Path, stop_at: int | None = None):
    mm, module, groups = build(log_sigma2=NOISY)
    engine = Engine(module, groups, grad_accum=2, seed=0)
    rates = {}

    def on_log(step, stats):
        rates[step] = {k: v for k, v in stats.items() if k.startswith("lr/")}
        if step == stop_at:
            ckpt.request_stop()

    history = fit(engine, lambda start: batch_stream(token_data(), 4, 0, start), STEPS, 2, progress=False,
                  checkpointer=Checkpointer(root, every=2), on_log=on_log, log_every=1,
                  lr_factor=lr_schedule("cosine", STEPS, warmup_steps=2))
    return module, history, rates, {n: g["lr"] for n, g in zip(*_strip_names(groups))}


def test_a_resumed_run_continues_the_learning_rate_schedule(tmp_path):
    module, history, rates, base = _run_scheduled(tmp_path / "whole")
    factor = lr_schedule("cosine", STEPS, warmup_steps=2)
    for step, logged in rates.items():  # what each step used: the group's own lr times the schedule's factor
        assert logged == {f"lr/{n}": pytest.approx(lr * factor(step - 1)) for n, lr in base.items()}
    with pytest.raises(Preempted):
        _run_scheduled(tmp_path / "cut", stop_at=STOP_AT)
    resumed, resumed_history, resumed_rates, _ = _run_scheduled(tmp_path / "cut")
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in history]
    assert resumed_rates == {s: r for s, r in rates.items() if s > STOP_AT}
    _assert_same_masks(resumed, mask_state(module))


def test_checkpoints_keep_the_newest_and_point_to_the_latest(uninterrupted):
    root, ref_masks, _ = uninterrupted
    assert [p.name for p in Checkpointer(root).complete()] == ["step-00000004", "step-00000006"]  # keep=2
    assert (root / "latest").read_text().strip() == "step-00000006"
    state = json.loads((root / "step-00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["samples"] == 6 * 2 * 4 and len(state["history"]) == 6
    assert (root / "step-00000006" / "rng-rank00000.pt").is_file()
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".del-*"))
    # a finished run resumes at its end: nothing left to train, the whole history returned
    module, history = _run_single(root)
    assert len(history) == STEPS
    _assert_same_masks(module, ref_masks)


def test_resume_false_refuses_to_overwrite(uninterrupted):
    mm, module, groups = build()
    with pytest.raises(FileExistsError, match="checkpoint.resume=true"):
        train(Engine(module, groups, grad_accum=2), checkpointer=Checkpointer(uninterrupted[0], resume=False))


def test_signal_handlers_only_set_flags():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        ckpt.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ckpt.signal_requests() == (True, False)
        ckpt.clear_save_request()
        for stop in (signal.SIGTERM, signal.SIGUSR2):  # the process goes on: the loop decides when to stop
            os.kill(os.getpid(), stop)
            assert ckpt.signal_requests() == (False, True)
            ckpt.clear_requests()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_handler_found_in_place_runs_after_the_stop_checkpoint_not_during_the_step():
    """submitit installs a USR2 handler (checkpoint the submission, requeue, exit) before the job runs; vtrans' own
    handler takes the signal, the loop saves and stops, and only then is submitit's handler called."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    calls = []
    try:
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # as submitit's would be
        ckpt.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [] and ckpt.signal_requests() == (False, True)  # nothing else happened yet
        ckpt.clear_requests()  # what the training loop does once it has saved, before raising Preempted
        ckpt.hand_over()
        assert calls == [signal.SIGUSR2]
        ckpt.hand_over()  # once
        assert calls == [signal.SIGUSR2]
        os.kill(os.getpid(), signal.SIGTERM)  # TERM had no Python handler before ours: nothing to hand over
        ckpt.hand_over()
        assert calls == [signal.SIGUSR2]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        ckpt._previous.clear()


# ---------------------------------------------------------------------------------------------------------------
# a kill in the middle of a save

CRASHING_RUN = r'''
import os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import vtrans.checkpoint as C
from vtrans.engine import Engine
from tests.test_distributed import build, train

where, root = sys.argv[1], Path(sys.argv[2])
calls = {{"n": 0}}

def crash_at(n, real, partial):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:  # in the save at step 4
            partial(*args)
            os._exit(9)  # a kill: no exception handling, no cleanup
        return real(*args, **kwargs)
    return wrapped

if where == "engine_state":  # half of the engine state written
    Engine.save_state = crash_at(2, Engine.save_state, lambda self, path: (Path(path) / "engine.pt").write_bytes(b"\0" * 99))
elif where == "pointer":  # the step directory renamed into place, the pointer not yet replaced
    C._write_atomic = crash_at(2, C._write_atomic, lambda path, text: path.with_name("." + path.name + ".tmp").write_text("step-"))
elif where == "prune":  # the oldest checkpoint half deleted
    C.shutil.rmtree = crash_at(1, C.shutil.rmtree, lambda path, **kw: next(Path(path).iterdir()).unlink())
mm, module, groups = build(log_sigma2=-9.0)
train(Engine(module, groups, grad_accum=2, seed=0), steps=6, checkpointer=C.Checkpointer(root, every=2, keep=1))
'''


@pytest.mark.timeout(120)
def test_kill_during_save_leaves_latest_readable(tmp_path, uninterrupted):
    script = CRASHING_RUN.format(repo=str(REPO))
    places = {"engine_state": 2, "pointer": 2, "prune": 4}  # crash point -> the step the latest checkpoint holds
    runs = {w: subprocess.Popen([sys.executable, "-c", script, w, str(tmp_path / w)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for w in places}
    for where, proc in runs.items():
        out, _ = proc.communicate(timeout=100)
        assert proc.returncode == 9, out
    for where, step in places.items():
        root = tmp_path / where
        assert Checkpointer(root).latest().name == f"step-{step:08d}", where
        module, history = _run_single(root)  # resumes from it and finishes
        assert len(history) == STEPS
        _assert_same_masks(module, uninterrupted[1])
        assert not list(root.glob(".tmp-*")) and not list(root.glob(".del-*"))  # the next save cleared them


# ---------------------------------------------------------------------------------------------------------------
# the prune job, stopped and resumed


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tests.tiny import save_tiny_with_tokenizer

    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny_llama"), "llama")


def _job_config(model_dir: Path, text: Path, out: Path):
    from vtrans.config import Config

    c = Config()
    c.model.package, c.model.name_or_path, c.model.gguf_file = "", str(model_dir), ""
    c.data.source, c.data.seq_len, c.data.max_train_blocks, c.data.max_eval_blocks = str(text), 32, 40, 4
    c.optim.steps, c.optim.batch_size, c.optim.grad_accum = STEPS, 2, 2
    c.budget.count_embeddings = False
    c.checkpoint.every = 2
    c.output_dir, c.progress = str(out), False
    return c


def test_prune_job_resumes_after_preemption(tiny_llama_dir, tmp_path, monkeypatch):
    from vtrans.data import load_documents
    from vtrans.jobs import run

    text = tmp_path / "news.txt"
    text.write_text("\n".join(d.text for d in load_documents("gensim:lee_background.cor")[:60]))

    ref = run(_job_config(tiny_llama_dir, text, tmp_path / "a"))
    train_step = Engine.train_step

    def stopping(self, micro, step):
        if step == STOP_AT - 1:
            ckpt.request_stop()
        return train_step(self, micro, step)

    monkeypatch.setattr(Engine, "train_step", stopping)
    with pytest.raises(Preempted):
        run(_job_config(tiny_llama_dir, text, tmp_path / "b"))
    assert not (tmp_path / "b" / "metrics.json").exists()
    monkeypatch.setattr(Engine, "train_step", train_step)
    got = run(_job_config(tiny_llama_dir, text, tmp_path / "b"))
    for key in ("final_loss", "params_pruned", "ppl_pruned", "shape_pruned"):
        assert got[key] == ref[key], key


# ---------------------------------------------------------------------------------------------------------------
# two ranks


def _resume_two_ranks(rank: int, root: str) -> dict:
    from vtrans.engine import DeepSpeedEngine

    out = {}
    for stage in (2, 3):
        def run(stop_at=None, sub="b"):
            mm, module, groups = build(log_sigma2=NOISY)
            engine = DeepSpeedEngine(module, groups, stage=stage, grad_accum=2, seed=0)
            history = train(engine, steps=STEPS, checkpointer=Checkpointer(Path(root) / f"zero{stage}-{sub}", every=2),
                            on_log=_stop_at(stop_at) if stop_at else None)  # called on rank 0 only
            engine.consolidate()
            return mask_state(module), [h["loss"] for h in history]

        reference = run(sub="a")
        try:
            run(stop_at=STOP_AT)
            raise AssertionError("the run did not stop")
        except Preempted as e:
            stopped_at = e.step
        out[stage] = {"reference": reference, "resumed": run(), "stopped_at": stopped_at}
    return out


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_rank_zero_resume_equals_uninterrupted(tmp_path):
    for rank, result in enumerate(spawn(_resume_two_ranks, tmp_path / "spawn", str(tmp_path))):
        for stage in (2, 3):
            r = result[stage]
            assert r["stopped_at"] == STOP_AT, (rank, stage)  # the stop asked on rank 0 reached rank 1
            (ref_masks, ref_losses), (masks, losses) = r["reference"], r["resumed"]
            assert losses == pytest.approx(ref_losses, rel=1e-6), (rank, stage)
            for name, value in ref_masks.items():
                torch.testing.assert_close(masks[name], value, rtol=1e-6, atol=1e-6,
                                           msg=lambda m: f"rank {rank} ZeRO-{stage} {name}: {m}")
    ckpts = sorted(p.name for p in (tmp_path / "zero3-b").iterdir())
    assert ckpts == ["latest", "step-00000004", "step-00000006"]
    # masks only: nothing of DeepSpeed's to save (the frozen weights come from the model), the whole replicated part
    assert (tmp_path / "zero3-b" / "step-00000006" / "replicated.pt").is_file()
    assert not (tmp_path / "zero3-b" / "step-00000006" / "deepspeed").exists()


# ---------------------------------------------------------------------------------------------------------------
# another number of ranks


def _zero3_run(rank: int, root: str, teacher: bool, stop_at: int | None, steps: int = STEPS) -> dict:
    """ZeRO-3 on this many ranks, checkpointed every step in `root` (stopped after `stop_at` steps if given): the
    masks and the first trained weight (gathered whole) where it ends."""
    import deepspeed

    from vtrans.engine import DeepSpeedEngine

    mm, module, groups = build(teacher=teacher)  # quiet VIB noise: any number of ranks computes the same steps
    engine = DeepSpeedEngine(module, groups, stage=3, grad_accum=2, seed=0)
    stopped = False
    try:
        train(engine, steps=steps, checkpointer=Checkpointer(root, every=1),
              on_log=_stop_at(stop_at) if stop_at else None)
    except Preempted:
        stopped = True
    weight = None
    if teacher:
        p = next(p for p in module.model.parameters() if p.requires_grad)
        with deepspeed.zero.GatheredParameters([p]):
            weight = p.data.detach().clone().float()
    return {"stopped": stopped, "masks": mask_state(module), "weight": weight}


@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("teacher", [False, True], ids=["faster", "vtrans"])
def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, teacher):
    """Saved by 2 ZeRO-3 ranks, resumed by 1: masks, multipliers and their optimizer state are whole in the
    checkpoint and resume exactly; trained weights are read whole from the shards (their Adam moments restart)."""
    import shutil

    root = tmp_path / "ckpt"
    stopped = spawn(_zero3_run, tmp_path / "two", str(root), teacher, STOP_AT)
    assert all(r["stopped"] for r in stopped)
    shutil.copytree(root, tmp_path / "ckpt2")
    # resumed on 1 rank with nothing left to train: exactly the state the 2 ranks saved
    loaded = spawn(_zero3_run, tmp_path / "load", str(root), teacher, None, STOP_AT, world=1)[0]
    for name, value in stopped[0]["masks"].items():
        torch.testing.assert_close(loaded["masks"][name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    if teacher:
        torch.testing.assert_close(loaded["weight"], stopped[0]["weight"], rtol=0, atol=0)
        return
    # masks only: resumed to the end, the masks of one uninterrupted process
    resumed = spawn(_zero3_run, tmp_path / "one", str(tmp_path / "ckpt2"), teacher, None, world=1)[0]
    mm, module, groups = build(teacher=teacher)
    train(Engine(module, groups, grad_accum=2, seed=0), steps=STEPS)
    for name, value in mask_state(module).items():
        torch.testing.assert_close(resumed["masks"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
