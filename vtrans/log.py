"""Rank-0 experiment logging: Weights & Biases (offline by default) or nothing. A run's id is kept in its output
directory (RUN_ID_FILE), so a resumed or requeued job continues the same W&B run. Also the per-layer structure
table and heatmap (retained heads / neurons / hidden channels) that jobs log to W&B and write to their folder."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("vtrans")

RUN_ID_FILE = "wandb_run.json"  # in a job's output directory: {job_type: {"id", "project"}} of its W&B runs
STRUCTURE_COLUMNS = ("layer", "heads", "heads_dense", "kv_heads", "kv_heads_dense", "neurons", "neurons_dense",
                     "hidden", "hidden_dense")


# ---------------------------------------------------------------------------------------------- sweep context


def sweep_context() -> dict | None:
    """{sweep_dir, job_num, overrides} when running as a job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not running under Hydra
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    swept = swept_keys(hc.sweep.dir)
    overrides = [o for o in hc.overrides.task if override_key(o) in swept]
    return {"sweep_dir": str(hc.sweep.dir), "job_num": hc.job.num, "overrides": ",".join(overrides)}


def swept_keys(sweep_dir: str | Path) -> set[str]:
    """The keys a multirun sweeps (e.g. {"budget.target"}), read from <sweep dir>/multirun.yaml, which the
    launching process writes before any job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return set()
    task = OmegaConf.select(OmegaConf.load(path), "hydra.overrides.task", default=None) or []
    parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    return {o.get_key_element() for o in parsed if o.is_sweep_override()}


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a sweep: its directory's name, with the date folder in front when the name is a bare
    time (Hydra's default multirun/<date>/<time>), so sweeps of different days never share a group."""
    p = Path(sweep_dir)
    name = p.name or "sweep"
    if re.fullmatch(r"[\d_.:-]+", name) and p.parent.name:
        name = f"{p.parent.name}_{name}"
    return name


def _rank() -> int:
    from .cluster import dist_env

    return dist_env().rank


def _scalar(v) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    if hasattr(v, "item"):  # one-element tensors, numpy scalars
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return None
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return None


# ---------------------------------------------------------------------------------------------- the logger


def saved_run_id(out_dir: str | Path, job_type: str, project: str) -> str | None:
    """The W&B run id an earlier attempt of this job (same output directory, job type and project) started."""
    path = Path(out_dir) / RUN_ID_FILE
    try:
        entry = json.loads(path.read_text()).get(job_type) or {}
    except (OSError, ValueError):
        return None
    return entry.get("id") if entry.get("project") == project else None


def _new_run_id() -> str:
    """Eight random lower-case letters and digits, the form of W&B's own run ids."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def save_run_id(out_dir: str | Path, job_type: str, project: str, run_id: str) -> None:
    path = Path(out_dir) / RUN_ID_FILE
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError):
        runs = {}
    runs[job_type] = {"id": run_id, "project": project}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    tmp.replace(path)


class RunLogger:
    """Logs to W&B on rank 0 only; a no-op on other ranks and with logger.kind=none.

    The run id is saved in the output directory and reused with resume="allow": a job that resumes from its
    checkpoint (a requeue, a restart with the same output_dir) continues the same run (offline: a second
    offline-run-* folder with the same id, which `wandb sync` appends). System metrics and the console are recorded
    (logger.system_metrics, logger.console). `log` takes the training statistics every `optim.log_every` steps (under
    train/, against train/step), `structure` the per-layer kept counts (a wandb.Table plus a heatmap image),
    `summary` the final metrics, `artifacts` files (the model, its decision, metrics.json); `finish` adds the
    expected-vs-target size chart and closes the run. The run's config is the resolved job config.
    """

    def __init__(self, cfg, run_config: dict, out_dir: str, rank: int | None = None, job_type: str | None = None):
        self.run = None
        self._wandb = None
        self._sizes: list[tuple[int, float, float]] = []
        self._structure_logged = False
        if cfg.kind != "wandb" or (rank if rank is not None else _rank()) != 0:
            return
        import wandb

        sweep = sweep_context()
        group = cfg.group or (sweep_group(sweep["sweep_dir"]) if sweep else None)
        name = cfg.name or (sweep["overrides"] or f"job{sweep['job_num']}" if sweep else None)
        run_config = dict(run_config)
        if sweep:
            run_config["sweep"] = sweep
        self._wandb = wandb
        self._log_artifacts = cfg.log_artifacts
        job_type = job_type or run_config.get("job") or "job"
        run_id = saved_run_id(out_dir, job_type, cfg.project) or _new_run_id()
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, group=group, name=name,
                              job_type=job_type, tags=list(cfg.tags) or None, id=run_id, resume="allow",
                              dir=str(out_dir), config=run_config, mode=cfg.mode, reinit="finish_previous",
                              settings=wandb.Settings(console=cfg.console, silent=True,
                                                      x_disable_stats=not cfg.system_metrics))
        save_run_id(out_dir, job_type, cfg.project, self.run.id)
        self.run.define_metric("train/*", step_metric="train/step")

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Training statistics at an optimizer step: task loss, KL, distillation, expected / target size,
        Lagrange multipliers, learning rates (whatever scalars `values` holds), under train/."""
        if self.run is None:
            return
        scalars = {f"train/{k}": s for k, v in values.items() if (s := _scalar(v)) is not None}
        scalars["train/step"] = step
        self.run.log(scalars)  # no step=: a resumed run replays steps after its checkpoint (W&B's own step must rise)
        if "expected_ratio" in values and "target_ratio" in values:
            self._sizes.append((step, float(_scalar(values["expected_ratio"])),
                                float(_scalar(values["target_ratio"]))))

    def structure(self, rows: list[dict], title: str = "retained structure") -> None:
        """Per-layer kept heads / neurons / hidden channels: a wandb.Table and a heatmap image."""
        if self.run is None or not rows:
            return
        wandb = self._wandb
        table = wandb.Table(columns=list(STRUCTURE_COLUMNS),
                            data=[[r.get(c) for c in STRUCTURE_COLUMNS] for r in rows])
        figure = structure_figure(rows, title)
        self.run.log({"structure/table": table, "structure/heatmap": wandb.Image(_to_image(figure)),
                      "structure/heads_per_layer": wandb.plot.bar(table, "layer", "heads",
                                                                  title="kept heads per layer")})
        self._structure_logged = True

    def summary(self, values: dict[str, Any]) -> None:
        """Final metrics (sizes, FLOPs, task metrics, wall times) into the run summary. A prune job's
        `shape_pruned` becomes the structure table when `structure` was not called."""
        if self.run is None:
            return
        for k, v in values.items():
            s = _scalar(v)
            if s is not None and not (isinstance(s, float) and not math.isfinite(s)):
                self.run.summary[k] = s
            elif isinstance(v, str):
                self.run.summary[k] = v
        if not self._structure_logged and isinstance(values.get("shape_pruned"), dict):
            self.structure(rows_from_summary(values["shape_pruned"]), "retained structure (kept layers)")

    def artifacts(self, files: dict[str, str | Path | None]) -> None:
        """Log each existing file or directory as an artifact named <run id>-<kind> of type <kind> (model, decision,
        metrics, ...); a new version each time (e.g. after a requeue)."""
        if self.run is None or not self._log_artifacts:
            return
        for kind, path in files.items():
            if path is None or not Path(path).exists():
                continue
            artifact = self._wandb.Artifact(f"{self.run.id}-{kind}", type=kind)
            if Path(path).is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def image(self, key: str, path: str | Path) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Image(str(path))})

    def table(self, key: str, rows: list[dict]) -> None:
        if self.run is not None and rows:
            columns = list(rows[0])
            self.run.log({key: self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    @contextlib.contextmanager
    def preemption(self):
        """Around training: when the job stops to be requeued (vtrans.checkpoint.Preempted), the run is marked
        preempting and closed with the job's exit code; the requeued job resumes it (same id, see RUN_ID_FILE)."""
        from .checkpoint import Preempted

        try:
            yield
        except Preempted as stop:
            if self.run is not None:
                self.run.mark_preempting()
                self.run.finish(exit_code=stop.code)
                self.run = None
            raise

    def finish(self) -> None:
        if self.run is None:
            return
        if self._sizes:
            steps, expected, target = zip(*self._sizes)
            self.run.log({"train/size_vs_target": self._wandb.plot.line_series(
                xs=list(steps), ys=[list(expected), list(target)], keys=["expected size", "target size"],
                title="model size (share of dense): expected vs target", xname="step")})
        self.run.finish()
        self.run = None


# ---------------------------------------------------------------------------------------------- structure


def rows_from_counts(layers: list[dict], hidden: int, dense_layers: list[dict] | None = None,
                     dense_hidden: int | None = None) -> list[dict]:
    """Structure rows from per-layer {"heads", "kv_heads", "intermediate"} counts (and the dense counts)."""
    rows = []
    for i, layer in enumerate(layers):
        dense = dense_layers[i] if dense_layers is not None and i < len(dense_layers) else {}
        rows.append({"layer": i, "heads": int(layer["heads"]), "heads_dense": _opt_int(dense.get("heads")),
                     "kv_heads": int(layer["kv_heads"]), "kv_heads_dense": _opt_int(dense.get("kv_heads")),
                     "neurons": int(layer["intermediate"]), "neurons_dense": _opt_int(dense.get("intermediate")),
                     "hidden": int(hidden), "hidden_dense": _opt_int(dense_hidden)})
    return rows


def rows_from_summary(summary: dict, dense_summary: dict | None = None) -> list[dict]:
    """Rows from `ModelShape.summary()` dicts (per kept layer: a prune job's `shape_pruned`)."""
    def layers(s):
        return [{"heads": h, "kv_heads": k, "intermediate": n}
                for h, k, n in zip(s["heads"], s["kv_heads"], s["intermediate"])]
    return rows_from_counts(layers(summary), summary["hidden"],
                            layers(dense_summary) if dense_summary else None,
                            dense_summary["hidden"] if dense_summary else None)


def rows_from_decision(decision) -> list[dict]:
    """Rows per layer of the dense model (removed layers included, as zeros) from a Decision."""
    dense = decision.dense
    layers = [{"heads": l.heads, "kv_heads": l.kv_heads, "intermediate": l.intermediate}
              for l in decision.layer_shapes()]
    dense_layers = [{"heads": l.heads, "kv_heads": l.kv_heads, "intermediate": l.intermediate} for l in dense.layers]
    return rows_from_counts(layers, len(decision.hidden), dense_layers, dense.hidden)


def _opt_int(v):
    return None if v is None else int(v)


def structure_figure(rows: list[dict], title: str = "retained structure"):
    """Heatmap: rows heads / neurons / hidden, one column per layer, colour = kept share of the dense count
    (or the count itself when dense counts are unknown), each cell annotated with the kept count."""
    from matplotlib.figure import Figure

    kinds = (("heads", "heads_dense"), ("neurons", "neurons_dense"), ("hidden", "hidden_dense"))
    have_dense = all(r.get(d) for r in rows for _, d in kinds)
    values = [[(r[k] / r[d]) if have_dense else r[k] for r in rows] for k, d in kinds]
    if not have_dense:  # scale each kind to its own maximum so the three rows share one colour bar
        values = [[v / max(max(row), 1) for v in row] for row in values]
    fig = Figure(figsize=(max(4.0, 0.45 * len(rows) + 2), 2.6))
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(3), [k for k, _ in kinds])
    ax.set_xticks(range(len(rows)), [str(r["layer"]) for r in rows])
    ax.set_xlabel("layer")
    ax.set_title(title)
    if len(rows) <= 40:
        for j, r in enumerate(rows):
            for i, (k, _) in enumerate(kinds):
                ax.text(j, i, str(r[k]), ha="center", va="center", fontsize=7,
                        color="white" if values[i][j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="kept share of dense" if have_dense else "kept (share of max)")
    fig.tight_layout()
    return fig


def _to_image(fig):
    """A matplotlib Figure as a PIL image (W&B takes it without a temporary file)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def write_structure(rows: list[dict], out_dir: Path, title: str = "retained structure") -> dict[str, str]:
    """structure.csv and structure.png in `out_dir` (for people without W&B)."""
    out_dir = Path(out_dir)
    csv_path, png_path = out_dir / "structure.csv", out_dir / "structure.png"
    write_csv(rows, csv_path, STRUCTURE_COLUMNS)
    structure_figure(rows, title).savefig(png_path, dpi=100)
    return {"structure_csv": str(csv_path), "structure_png": str(png_path)}


def write_csv(rows: list[dict], path: Path, columns=None) -> None:
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
