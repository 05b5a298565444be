"""W&B logging on rank 0, offline: what a run records (resolved config, per-step training statistics, the
per-layer structure table and heatmap, final sizes / FLOPs / metrics / wall time), read back from the offline
run files; logger=none and other ranks record nothing."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vtrans.config import LoggerConfig
from vtrans.log import RunLogger, rows_from_decision, rows_from_summary, structure_figure, sweep_group


def wandb_records(path: Path):
    """The protobuf records of an offline run file (run-*.wandb: W&B's LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            record = chunk
        elif kind == 2:  # first
            pending = chunk
            continue
        elif kind == 3:  # middle
            pending += chunk
            continue
        else:  # last
            record = pending + chunk
        r = pb.Record()
        r.ParseFromString(record)
        yield r


def read_offline_run(run_dir: Path) -> dict:
    """id, group, name, job_type, config keys, history keys, summary (key -> JSON value), media files, artifacts
    ((name, type, files) each), system-metric samples, console lines and exit code of one offline run folder
    (wandb/offline-run-*)."""
    files = list(Path(run_dir).glob("run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + 20  # W&B's writer process may still be flushing right after finish()
    while files[0].stat().st_size < 7 or \
            not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(files[0])):
        assert time.monotonic() < deadline, f"{files[0]} has no exit record: the run did not finish"
        time.sleep(0.2)
    out = {"id": None, "group": None, "name": None, "job_type": None, "config": {}, "history": set(), "summary": {},
           "steps": set(), "artifacts": [], "stats": 0, "console": "", "exit_code": None, "preempting": False}
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, group=r.run.run_group, name=r.run.display_name, job_type=r.run.job_type)
            out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update if u.key})
        elif kind == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history"].add(key)
                if key == "train/step":
                    out["steps"].add(json.loads(item.value_json))
        elif kind == "summary":
            for item in r.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            files = [e.path for e in r.artifact.manifest.contents]
            out["artifacts"].append((r.artifact.name, r.artifact.type, files))
        elif kind == "stats":
            out["stats"] += 1
        elif kind == "output_raw":
            out["console"] += r.output_raw.line
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
        elif kind == "preempting":
            out["preempting"] = True
    out["media"] = sorted(str(p.relative_to(run_dir / "files")) for p in (run_dir / "files").rglob("*")
                          if p.is_file() and "media" in p.parts)
    return out


def offline_runs(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir() and not p.is_symlink())


ROWS = [{"layer": i, "heads": h, "heads_dense": 6, "kv_heads": h // 3, "kv_heads_dense": 2, "neurons": n,
         "neurons_dense": 80, "hidden": 40, "hidden_dense": 48} for i, (h, n) in enumerate([(6, 80), (3, 40), (0, 10)])]


def test_offline_run_records_steps_structure_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: offline must not care
    t0 = time.perf_counter()
    logger = RunLogger(LoggerConfig(kind="wandb", group="g1", name="n1", tags=["t"]),
                       {"job": "prune", "budget": {"target": 0.5}}, str(tmp_path), rank=0)
    assert logger.active
    for step in (1, 2, 3):
        logger.log(step, {"task_loss": 3.0 / step, "kl": torch.tensor(10.0 * step), "distill_logit": 0.1,
                          "expected_ratio": 1 - 0.1 * step, "target_ratio": 1 - 0.15 * step, "lambda_1": 0.01 * step,
                          "lambda_2": 0.0, "lr/masks": 0.1, "lr/weights": 2e-5, "note": "not a scalar"})
    logger.structure(ROWS)
    logger.summary({"params_pruned": 1000, "flops_pruned": 2.5e6, "ppl_pruned": 12.5, "wall_time_s": 3.2,
                    "variant": "faster", "nan_metric": float("nan")})
    logger.finish()
    assert time.perf_counter() - t0 < 60  # online mode without a network waits ~100 s before failing
    (run_dir,) = offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    assert (run["group"], run["name"], run["job_type"]) == ("g1", "n1", "prune")
    assert run["config"]["budget"] == {"target": 0.5}
    for key in ("train/task_loss", "train/kl", "train/distill_logit", "train/expected_ratio", "train/target_ratio",
                "train/lambda_1", "train/lambda_2", "train/lr/masks", "train/lr/weights"):
        assert key in run["history"], key
    assert "train/note" not in run["history"] and run["steps"] == {1, 2, 3}
    assert run["summary"]["params_pruned"] == 1000 and run["summary"]["ppl_pruned"] == 12.5
    assert run["summary"]["variant"] == "faster" and "nan_metric" not in run["summary"]
    assert run["summary"]["train/kl"] == 30.0  # the last step's value
    media = run["media"]
    assert any(m.startswith("media/table/structure/table") for m in media)
    assert any(m.startswith("media/images/structure/heatmap") and m.endswith(".png") for m in media)
    assert any(m.startswith("media/table/train/size_vs_target") for m in media)  # expected vs target chart
    table = next(run_dir / "files" / m for m in media if m.startswith("media/table/structure/table"))
    data = json.loads(table.read_text())
    assert data["columns"][:3] == ["layer", "heads", "heads_dense"] and [r[1] for r in data["data"]] == [6, 3, 0]


def test_no_logger_and_other_ranks_record_nothing(tmp_path, monkeypatch):
    for cfg, rank in ((LoggerConfig(kind="none"), 0), (LoggerConfig(kind="wandb"), 1)):
        logger = RunLogger(cfg, {"job": "prune"}, str(tmp_path), rank=rank)
        logger.log(1, {"loss": 1.0})
        logger.structure(ROWS)
        logger.summary({"params": 1})
        logger.finish()
        assert not logger.active
    monkeypatch.setenv("RANK", "1")  # the rank comes from the launcher's variables by default
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not RunLogger(LoggerConfig(kind="wandb"), {}, str(tmp_path)).active
    assert list(tmp_path.iterdir()) == []


def test_sweep_groups_are_named_after_the_sweep_directory():
    assert sweep_group("multirun/2026-11-27/12-00-00") == "2026-11-27_12-00-00"
    assert sweep_group("/scratch/sweeps/bert_sst2_budgets") == "bert_sst2_budgets"


def test_structure_rows_and_heatmap_from_decisions_and_summaries():
    from tests.tiny import make_tiny
    from vtrans.masks.attach import attach_masks

    mm = attach_masks(make_tiny("llama"), ["heads", "neurons", "hidden"])
    mm.layers[1].heads.decide(torch.tensor([True, False]))
    mm.layers[2].heads.decide(torch.tensor([False, False]))
    mm.layers[2].neurons.decide(torch.zeros(80, dtype=torch.bool))
    rows = rows_from_decision(mm.decision())
    assert [(r["heads"], r["kv_heads"], r["neurons"]) for r in rows] == [(6, 2, 80), (3, 1, 80), (0, 0, 0)]
    assert all(r["heads_dense"] == 6 and r["neurons_dense"] == 80 and r["hidden_dense"] == 48 for r in rows)
    rows2 = rows_from_summary({"hidden": 40, "heads": [6, 3], "kv_heads": [2, 1], "intermediate": [80, 20]})
    assert [r["neurons"] for r in rows2] == [80, 20] and rows2[0]["heads_dense"] is None
    for r in (rows, rows2):
        fig = structure_figure(r)
        assert fig.axes[0].get_images()[0].get_array().shape == (3, len(r))


# ---------------------------------------------------------------------------------------------- continuity

from tests.test_jobs import assets, compose_cfg, lm_overrides  # noqa: E402,F401  (session fixture)


def test_a_preempted_prune_job_resumes_the_same_wandb_run_with_artifacts(assets, tmp_path, monkeypatch):  # noqa: F811
    """A prune job stopped after step 2 (the SIGTERM path: save, then Preempted) and run again with the same output
    directory resumes from its checkpoint and continues the same W&B run: same id (saved in the output directory),
    steps 1-2 in the first offline folder, 3-4 in the second; the first closed as preempting with exit code 143; the
    second holds system metrics, the console and the model, decision and metrics.json artifacts."""
    import pytest

    from vtrans import checkpoint
    from vtrans.jobs import run
    from vtrans.log import RUN_ID_FILE

    monkeypatch.setenv("WANDB_X_STATS_SAMPLING_INTERVAL", "0.5")  # system metrics sampled within these short runs
    out = tmp_path / "out"
    overrides = lm_overrides(assets, out, "logger=wandb", "optim.steps=4", "checkpoint.every=1", "budget.target=0.6")
    real_log = RunLogger.log

    def stop_after_step_2(self, step, values):
        real_log(self, step, values)
        if step == 2:
            checkpoint.request_stop()  # what SIGTERM's handler does

    monkeypatch.setattr(RunLogger, "log", stop_after_step_2)
    with pytest.raises(checkpoint.Preempted) as stopped:
        run(compose_cfg(overrides))
    assert stopped.value.step == 2
    checkpoint.clear_requests()
    monkeypatch.setattr(RunLogger, "log", real_log)
    run_id = json.loads((out / RUN_ID_FILE).read_text())["prune"]["id"]
    m = run(compose_cfg(overrides))  # the requeued job: same output directory
    assert m["train_steps"] == 4

    first, second = (read_offline_run(d) for d in offline_runs(out))
    assert first["id"] == second["id"] == run_id
    assert first["steps"] == {1, 2} and first["preempting"] and first["exit_code"] == checkpoint.PREEMPTED_EXIT_CODE
    assert second["steps"] == {3, 4} and second["exit_code"] == 0
    assert second["summary"]["params_pruned"] == m["params_pruned"]
    assert first["stats"] > 0 or second["stats"] > 0  # system metrics are on
    assert second["console"].strip()  # the console (stdout / stderr) is recorded
    kinds = {t: files for _, t, files in second["artifacts"]}
    assert {"model", "decision", "metrics"} <= set(kinds)
    assert "config.json" in kinds["model"] and any(f.endswith(".safetensors") for f in kinds["model"])
    assert kinds["decision"] == ["vtrans_decision.json"] and kinds["metrics"] == ["metrics.json"]
    ours = sorted(name for name, kind, _ in second["artifacts"] if kind != "run_table")  # W&B keeps tables so too
    assert ours == [f"{run_id}-{k}" for k in ("decision", "metrics", "model")]


def test_run_ids_are_kept_per_job_type_and_project(tmp_path):
    from vtrans.log import save_run_id, saved_run_id

    save_run_id(tmp_path, "prune", "vtrans", "abc12345")
    save_run_id(tmp_path, "export", "vtrans", "def67890")
    assert saved_run_id(tmp_path, "prune", "vtrans") == "abc12345"
    assert saved_run_id(tmp_path, "export", "vtrans") == "def67890"
    assert saved_run_id(tmp_path, "prune", "other-project") is None  # a new run there
    assert saved_run_id(tmp_path / "elsewhere", "prune", "vtrans") is None
