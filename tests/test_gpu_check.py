"""bench/gpu_check.sh: it refuses clearly without CUDA, and its parts (bench/gpu_steps.py at a tiny shape on the CPU,
bench/gpu_report.py) run and report, so that a GPU session spends its minutes on the figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_recovery.sh"])
def test_gpu_scripts_refuse_without_cuda_and_run_nothing(tmp_path, script):
    r = subprocess.run(["bash", str(REPO / "bench" / script)], capture_output=True, text=True, timeout=120,
                       env={**ENV, "RESULTS": str(tmp_path)})
    assert r.returncode == 2 and f"bench/{script} needs a CUDA GPU" in r.stderr
    assert not list(tmp_path.iterdir())


def test_the_recovery_script_composes_its_jobs_configs_on_any_machine(tmp_path):
    """DRY_RUN=1: the configs bench/gpu_recovery.sh would start, validated on the CPU, so a device session does not
    spend its minutes finding a bad override."""
    env = {**ENV, "RESULTS": str(tmp_path), "DRY_RUN": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_recovery.sh")], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    prune, recovery = r.stdout.splitlines()
    assert "job=prune steps=40" in prune and "teacher:128 x1]" in prune and "teacher_batch_size=32" in prune
    assert "job=finetune steps=3000" in recovery and "teacher:4096 x1]" in recovery
    assert "teacher_batch_size=256" in recovery
    assert not list(tmp_path.iterdir())
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_recovery.sh")], capture_output=True, text=True, timeout=120,
                       env={**env, "RECOVERY_TEACHER": "many"})
    assert r.returncode != 0 and "'teacher:many' is not accepted" in r.stderr


def test_the_cross_domain_sets_travel_as_files_and_read_back_as_the_same_documents(tmp_path, monkeypatch):
    from bench.gpu_domains import export
    from vtrans.data import load_documents

    monkeypatch.syspath_prepend(str(tmp_path))
    domains = {"newsgroups": "gensim:mini_newsgroup", "pydoc": "pydoc:topics"}
    assert export(tmp_path, domains) == {"newsgroups": 200, "pydoc": 79}
    for name, source in domains.items():
        back = [d.text for d in load_documents(f"package:vtrans_domains/{name}/*.txt")]
        original = [d.text for d in load_documents(source)]
        same = sum(a == b for a, b in zip(back, original))
        # one Usenet post holds more control characters than a text file may: it travels without them
        assert len(back) == len(original) and same == len(original) - (name == "newsgroups")


def test_gpu_steps_and_report_at_a_tiny_shape_on_the_cpu(tmp_path):
    for part in ("faster", "materialise"):
        r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_steps.py"), "--part", part, "--shape", "tiny",
                            "--device", "cpu", "--seq-len", "32", "--steps", "1"], capture_output=True, text=True,
                           timeout=300, env=ENV, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        (tmp_path / f"gpu_{'b_faster' if part == 'faster' else 'c'}.log").write_text(r.stdout + "rc=0\n")
    result = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert result["pruned_params"] > 0 and result["materialise_s"] > 0
    (tmp_path / "gpu_env.txt").write_text("cpu test")
    report = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_report.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60).stdout
    assert "| Faster-VTrans (weights frozen, offloaded) |" in report and "| ok |" in report
    assert "decide " in report and "materialise " in report
    assert "VTrans (weights trained, optimizer offloaded) | - | - | - | - | not run" in report
