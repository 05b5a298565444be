"""Multirun sweeps through the real entry point (`python launch.py -m budget.target=...`) with Hydra's basic
launcher, submitit_local, and submitit_slurm against a local Slurm cluster (marked slurm): every job writes its
metrics, the callback writes the trade-off CSV and PNG into the sweep directory, and W&B runs share one group."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_local import slurm_cluster  # noqa: F401  (fixture)
from tests.test_wandb import offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch.py"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny dense LLaMA (MiniLM tokenizer) and real text, in a temporary folder."""
    import torch
    from gensim.test.utils import datapath

    from tests.test_jobs import make_model, minilm_tokenizer

    root = tmp_path_factory.mktemp("sweep_assets")
    tok = minilm_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    make_model("llama", "lm", tok).save_pretrained(root / "llama")
    torch.set_num_threads(threads)
    tok.save_pretrained(root / "llama")
    lines = [line.strip() for line in open(datapath("lee_background.cor")) if line.strip()][:40]
    (root / "lee.txt").write_text("\n".join(lines) + "\n")
    return root


def sweep(dense: Path, sweep_dir: Path, *overrides: str, env: dict | None = None, timeout: float = 300):
    cmd = [sys.executable, str(LAUNCH), "-m", "model.package=", f"model.name_or_path={dense / 'llama'}",
           "model.gguf_file=", f"data.source={dense / 'lee.txt'}", "data.seq_len=32", "data.max_eval_blocks=4",
           "budget.count_embeddings=false", "optim.steps=2", "progress=false", "eval=none", "data=lee",
           f"hydra.sweep.dir={sweep_dir}",
           *overrides]
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=sweep_dir.parent, timeout=timeout)
    assert r.returncode == 0, f"sweep failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def tradeoff(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "tradeoff.csv") as f:
        return list(csv.DictReader(f))


def check_tradeoff(sweep_dir: Path, targets: list[float]) -> list[dict]:
    """One row per job, sizes following the budget, the task metric named; a PNG with both panels."""
    from matplotlib.image import imread

    rows = tradeoff(sweep_dir)
    assert [float(r["budget_target"]) for r in rows] == targets
    assert [r["overrides"] for r in rows] == [f"budget.target={t}" for t in targets]
    assert {r["series"] for r in rows} == {"all"}  # one curve: the jobs differ only in their budget
    ratios = [float(r["params_ratio"]) for r in rows]
    assert ratios == sorted(ratios) and all(0 < x < 1 for x in ratios)
    for r, t in zip(rows, targets):
        metrics = json.loads((sweep_dir / r["job_num"] / "metrics.json").read_text())
        assert float(r["objective"]) == pytest.approx(metrics["ppl_pruned"]) and r["objective_name"] == "ppl_pruned"
        assert metrics["params_pruned_no_embeddings"] <= t * metrics["params_dense_no_embeddings"] + 1
        assert float(r["flops"]) == pytest.approx(metrics["flops_pruned"])
    image = imread(sweep_dir / "tradeoff.png")
    assert image.shape[0] > 200 and image.shape[1] > 500
    return rows


def test_basic_launcher_sweep_writes_tradeoff_and_groups_wandb_runs(dense, tmp_path):
    sweep_dir = tmp_path / "budgets"
    sweep(dense, sweep_dir, "budget.target=0.5,0.7,0.9", "logger=wandb")
    check_tradeoff(sweep_dir, [0.5, 0.7, 0.9])
    runs = [read_offline_run(d) for d in offline_runs(sweep_dir)]
    assert len(runs) == 4  # three jobs and the sweep's trade-off run
    assert {r["group"] for r in runs} == {"budgets"}  # default group: the sweep directory's name
    jobs = sorted((r for r in runs if r["job_type"] == "prune"), key=lambda r: r["name"])
    assert [r["name"] for r in jobs] == ["budget.target=0.5", "budget.target=0.7", "budget.target=0.9"]
    for r, row in zip(jobs, tradeoff(sweep_dir)):
        assert r["steps"] == {2}  # optim.log_every > steps: logged at the last step
        for key in ("train/task_loss", "train/kl", "train/distill_logit", "train/expected_ratio", "train/target_ratio",
                    "train/lambda_1", "train/lambda_2", "train/lr/masks", "train/lr/lambdas", "train/grad_norm"):
            assert key in r["history"], key
        s = r["summary"]
        assert s["params_pruned"] == int(row["params"]) and s["flops_pruned"] == pytest.approx(float(row["flops"]))
        assert s["ppl_pruned"] == pytest.approx(float(row["objective"]))
        assert s["train_time_s"] > 0 and s["wall_time_s"] > 0
        assert r["config"]["budget"]["target"] == float(row["budget_target"])  # the resolved job config
        assert r["config"]["sweep"]["sweep_dir"] == str(sweep_dir)
        assert any("structure/heatmap" in f for f in r["media"]) and any("structure/table" in f for f in r["media"])
    (summary,) = [r for r in runs if r["job_type"] == "sweep"]
    assert any(m.startswith("media/table/tradeoff/table") for m in summary["media"])
    assert any(k.startswith("tradeoff/metric_vs_size") for k in summary["history"])  # the scatter plot
    assert any(m.startswith("media/images/tradeoff/plot") for m in summary["media"])


def test_submitit_local_sweep(dense, tmp_path):
    sweep_dir = tmp_path / "local"
    sweep(dense, sweep_dir, "budget.target=0.6,0.8", "hydra/launcher=submitit_local",
          "hydra.launcher.timeout_min=10")
    check_tradeoff(sweep_dir, [0.6, 0.8])
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # each job ran as a submitit job
    assert not offline_runs(sweep_dir)  # logger=none (the default): no W&B files


@pytest.mark.slurm
def test_submitit_slurm_sweep_on_a_local_cluster(dense, tmp_path, slurm_cluster):
    sweep_dir = tmp_path / "slurm"
    sweep(dense, sweep_dir, "budget.target=0.6,0.8", "logger=wandb", "hydra/launcher=submitit_slurm",
          f"hydra.launcher.partition={slurm_cluster.partition}", "hydra.launcher.timeout_min=10",
          "hydra.launcher.cpus_per_task=1", env=slurm_cluster.env, timeout=600)
    check_tradeoff(sweep_dir, [0.6, 0.8])
    job_ids = {p.name.split("_")[0] for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()}
    assert job_ids, "no Slurm job folders"
    for job_id in job_ids:
        assert slurm_cluster.job_state(job_id) == "COMPLETED"
    runs = [read_offline_run(d) for d in offline_runs(sweep_dir)]
    assert len(runs) == 3 and {r["group"] for r in runs} == {"slurm"}


@pytest.mark.slurm
def test_two_tasks_per_node_write_once(dense, tmp_path, slurm_cluster):
    """Both Slurm tasks run the whole job (submitit_slurm, tasks_per_node=2); only rank 0 writes."""
    sweep_dir = tmp_path / "ranks"
    sweep(dense, sweep_dir, "job=evaluate", "eval.max_examples=8,16", "data.heldout_fraction=0.5", "logger=wandb",
          "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={slurm_cluster.partition}",
          "hydra.launcher.timeout_min=10", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
          env=slurm_cluster.env, timeout=600)
    rows = tradeoff(sweep_dir)
    assert [r["overrides"] for r in rows] == ["eval.max_examples=8", "eval.max_examples=16"]
    assert [int(r["eval_examples"]) for r in rows] == [8, 16]
    logs = sorted((sweep_dir / ".submitit").rglob("*_log.out"))
    assert len(logs) == 4  # two jobs x two tasks, each ran
    runs = offline_runs(sweep_dir)
    assert len(runs) == 2 + 1  # one W&B run per job (rank 0) and the sweep's
    for job in ("0", "1"):
        assert len(list((sweep_dir / job).glob("metrics.json"))) == 1


def _wait_for(what: str, cond, timeout: float, log=lambda: "") -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}\n{log()[-6000:]}")


@pytest.mark.slurm
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case,timeout_min", [("preempted", 20), ("timed-out", 10)])
def test_submitit_job_signalled_saves_requeues_and_resumes(dense, tmp_path, slurm_cluster, case, timeout_min):
    """A sweep job under hydra/launcher=submitit_slurm gets submitit's preemption / time-limit signal (USR2, sent as
    submitit's own `job._interrupt()` does): vtrans saves a checkpoint at the next step and stops, submitit's handler
    (called after the save) requeues the job, which resumes from the checkpoint, continues the same W&B run and ends
    with the result of an uninterrupted run. submitit counts a USR2 as a time-out when the job has run past
    min(0.8 x, x - 10 min) of its limit x (always, for timeout_min=10), then one requeue of max_num_timeout is used."""
    import time

    steps = 400
    job_args = ["budget.target=0.6", f"optim.steps={steps}", "checkpoint.every=20", "optim.log_every=20"]
    env = {**slurm_cluster.env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def command(sweep_dir, *extra):
        return [sys.executable, str(LAUNCH), "-m", "model.package=", f"model.name_or_path={dense / 'llama'}",
                "model.gguf_file=", f"data.source={dense / 'lee.txt'}", "data.seq_len=32", "data.max_eval_blocks=4",
                "budget.count_embeddings=false", "progress=false", f"hydra.sweep.dir={sweep_dir}", *job_args, *extra]

    reference = tmp_path / "reference"  # the same job, not interrupted (Hydra's basic launcher, here)
    r = subprocess.run(command(reference), env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    want = json.loads((reference / "0" / "metrics.json").read_text())

    sweep_dir = tmp_path / "signalled"
    cmd = command(sweep_dir, "logger=wandb", "hydra/launcher=submitit_slurm",
                  f"hydra.launcher.partition={slurm_cluster.partition}",
                  f"hydra.launcher.timeout_min={timeout_min}", "hydra.launcher.cpus_per_task=1",
                  "hydra.launcher.max_num_timeout=2")
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    launcher = subprocess.Popen(cmd, env=env, cwd=sweep_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        def job_id():  # submitit's folder per job: the Slurm job id (<array id>_<task> for sweeps of several jobs)
            found = [p.name for p in (sweep_dir / ".submitit").glob("[0-9]*") if p.is_dir()]
            return found[0] if found else None

        def log():
            return "".join(p.read_text(errors="replace") for p in sorted((sweep_dir / ".submitit").rglob("*_log.*")))

        latest = sweep_dir / "0" / "checkpoints" / "latest"
        _wait_for("the job's first checkpoint", lambda: latest.is_file() and job_id(), 300, log)
        job = job_id()
        slurm_cluster.run("scancel", "--signal=USR2", job)  # what submitit's job._interrupt() does
        _wait_for("the requeued job to be pending", lambda: slurm_cluster.job_state(job) == "PENDING", 120, log)
        text = log()
        assert f"this job is {case}" in text, text[-4000:]  # submitit's handler ran ...
        assert "saved (signal)" in text and "handing SIGUSR2 over" in text  # ... after vtrans saved
        state = json.loads((latest.parent / latest.read_text().strip() / "trainer_state.json").read_text())
        stopped_at = state["step"]
        assert 20 <= stopped_at < steps
        slurm_cluster.run("scontrol", "update", f"jobid={job}", "starttime=now")  # skip Slurm's requeue delay
        out, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            time.sleep(1)
    assert launcher.returncode == 0, out[-5000:]
    text = log()
    resumed = re.search(r"resuming from \S+ at step (\d+)", text)
    assert resumed and int(resumed.group(1)) == stopped_at, text[-4000:]
    got = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert got["train_steps"] == steps
    for key in ("params_pruned", "shape_pruned", "flops_pruned"):
        assert got[key] == want[key], key
    assert got["ppl_pruned"] == pytest.approx(want["ppl_pruned"], rel=1e-5)
    runs = [read_offline_run(d) for d in offline_runs(sweep_dir / "0")]
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]  # one W&B run, continued after the requeue
    assert runs[0]["preempting"] and max(runs[0]["steps"]) <= stopped_at < min(runs[1]["steps"])
