"""The sweep's trade-off: a Hydra callback that, when a multirun ends (whatever the launcher: basic,
submitit_local, submitit_slurm), collects every job's metrics.json and writes <sweep dir>/tradeoff.csv and
tradeoff.png (size and FLOPs against the task metric), and with logger.kind=wandb logs the same table and
plot to one more run in the sweep's W&B group, for the dashboard."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .log import override_key, swept_keys, sweep_group, write_csv

log = logging.getLogger("vtrans")

LEADING = ("job_num", "overrides", "series", "job", "variant", "budget_kind", "budget_target", "params",
           "params_ratio", "flops", "flops_ratio", "objective_name", "objective", "wall_time_s")


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job of the sweep (its metrics.json and .hydra/overrides.yaml), ordered by job number."""
    rows = []
    swept = swept_keys(sweep_dir)
    for metrics_file in sorted(Path(sweep_dir).rglob("metrics.json")):
        job_dir = metrics_file.parent
        if not (job_dir / ".hydra").is_dir():  # only Hydra job folders (any hydra.sweep.subdir pattern)
            continue
        metrics = json.loads(metrics_file.read_text())
        overrides = []
        ov_file = job_dir / ".hydra" / "overrides.yaml"
        if ov_file.is_file():
            overrides = [str(o) for o in OmegaConf.load(ov_file)]
        if swept:  # only what the sweep varies; the shared overrides are in multirun.yaml
            overrides = [o for o in overrides if override_key(o) in swept]
        rows.append(row_of(str(job_dir.relative_to(sweep_dir)), overrides, metrics))
    rows.sort(key=lambda r: (int(r["job_num"]) if str(r["job_num"]).isdigit() else math.inf, str(r["job_num"])))
    return rows


def row_of(job_num: str, overrides: list[str], m: dict) -> dict:
    """The trade-off row of one job: sizes of its resulting model (pruned, fine-tuned or evaluated) and its
    objective, plus every other scalar metric."""
    params = _first(m, "params_pruned", "params")
    flops = _first(m, "flops_pruned", "flops")
    params_dense, flops_dense = m.get("params_dense"), m.get("flops_dense")
    row: dict[str, Any] = {
        "job_num": job_num,
        "overrides": " ".join(overrides),
        # jobs that differ only in the budget form one curve
        "series": " ".join(o for o in overrides if not override_key(o).startswith(("budget.", "budget"))) or "all",
        "job": m.get("job"), "variant": m.get("variant"), "budget_kind": m.get("budget_kind"),
        "budget_target": m.get("budget_target"),
        "params": params, "params_ratio": params / params_dense if params and params_dense else m.get("params_ratio"),
        "flops": flops, "flops_ratio": flops / flops_dense if flops and flops_dense else m.get("flops_ratio"),
        "objective_name": m.get("objective_name"), "objective": m.get("objective"),
        "wall_time_s": m.get("wall_time_s"),
    }
    for k, v in sorted(m.items()):
        if k not in row and isinstance(v, (int, float, str, bool)) and not isinstance(v, dict):
            row[k] = v
    return row


def _first(m: dict, *keys):
    return next((m[k] for k in keys if isinstance(m.get(k), (int, float))), None)


def write_tradeoff(rows: list[dict], sweep_dir: Path) -> dict[str, Path]:
    """tradeoff.csv (every job, every scalar metric) and tradeoff.png in the sweep directory."""
    sweep_dir = Path(sweep_dir)
    columns = list(LEADING) + sorted({k for r in rows for k in r} - set(LEADING))
    csv_path, png_path = sweep_dir / "tradeoff.csv", sweep_dir / "tradeoff.png"
    write_csv(rows, csv_path, columns)
    plot_tradeoff(rows, png_path)
    return {"csv": csv_path, "png": png_path}


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Task metric against parameters and against FLOPs (share of dense when known), one line per series."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    names = sorted({r["objective_name"] for r in rows if r.get("objective_name")})
    ylabel = ", ".join(names) or "objective"
    series = sorted({r["series"] for r in rows})
    for ax, (x_ratio, x_abs, label) in zip(axes, (("params_ratio", "params", "parameters"),
                                                  ("flops_ratio", "flops", "FLOPs / token"))):
        use_ratio = all(r.get(x_ratio) is not None for r in rows)
        x_key = x_ratio if use_ratio else x_abs
        for s in series:
            pts = sorted((r[x_key], r["objective"], r.get("budget_target")) for r in rows
                         if r["series"] == s and r.get(x_key) is not None and _finite(r.get("objective")))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s if len(series) > 1 else None)
                for x, y, target in pts:
                    if target is not None:
                        ax.annotate(f"{target:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"{label} (share of dense{', embeddings counted' if x_abs == 'params' else ''})"
                      if use_ratio else label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"trade-off over {len(rows)} runs (point labels: budget target)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def log_to_wandb(rows: list[dict], files: dict[str, Path], sweep_dir: Path, logger_cfg) -> None:
    """One "sweep" run in the sweep's group: the trade-off table, a scatter plot of metric vs size, the PNG."""
    import wandb

    group = logger_cfg.get("group") or sweep_group(str(sweep_dir))
    run = wandb.init(project=logger_cfg.get("project", "vtrans"), entity=logger_cfg.get("entity") or None,
                     group=group, name=f"{group}-tradeoff", job_type="sweep", dir=str(sweep_dir),
                     mode=logger_cfg.get("mode", "offline"), reinit="finish_previous",
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
                     config={"sweep_dir": str(sweep_dir), "runs": len(rows)})
    columns = list(LEADING)
    table = wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])
    x = "params_ratio" if all(r.get("params_ratio") is not None for r in rows) else "params"
    run.log({"tradeoff/table": table,
             "tradeoff/metric_vs_size": wandb.plot.scatter(table, x, "objective", title="task metric vs size"),
             "tradeoff/plot": wandb.Image(str(files["png"]))})
    run.finish()


def _cell(v):
    return v if v is None or isinstance(v, (int, float, str, bool)) else str(v)


class TradeoffCallback(Callback):
    """Registered in conf/config.yaml under hydra.callbacks; acts only at the end of a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            log.warning("sweep %s: no job wrote metrics.json; no trade-off written", sweep_dir)
            return
        files = write_tradeoff(rows, sweep_dir)
        log.info("sweep trade-off of %d runs: %s, %s", len(rows), files["csv"], files["png"])
        logger_cfg = OmegaConf.to_container(config.get("logger", {}), resolve=True) or {}
        if logger_cfg.get("kind") == "wandb":
            log_to_wandb(rows, files, sweep_dir, logger_cfg)
