"""Jobs: each is `run(cfg, out_dir) -> metrics`; `run` here validates the config, dispatches on `job`, picks the
job's objective (the metric sweeps optimise and plot) and writes metrics.json on rank 0."""
from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

from ..config import Config, load_config

log = logging.getLogger("vtrans")

# metrics where lower is better; every other objective is higher-is-better
LOWER_IS_BETTER = ("ppl",)


def output_dir(cfg: Config) -> Path:
    """cfg.output_dir, else the Hydra run directory, else ./outputs/vtrans."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not running under Hydra
        return Path("outputs/vtrans")


def is_main_process() -> bool:
    from ..cluster import dist_env

    return dist_env().is_main


def run(cfg) -> dict:
    """Validate the config (before any model is loaded), run the chosen job, write metrics.json (rank 0)."""
    cfg = load_config(cfg)
    out = output_dir(cfg)
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    job = importlib.import_module(f"{__name__}.{cfg.job}").run
    metrics = job(cfg, out)
    metrics.setdefault("job", cfg.job)
    set_objective(cfg, metrics)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=_json_default))
    return metrics


def set_objective(cfg: Config, metrics: dict) -> None:
    """metrics["objective"] = the primary metric of the job's resulting model (eval.primary, else the task's own:
    ppl, accuracy, pearson for regression, f1 for QA); "objective_name" names it, "objective_mode" says min/max."""
    primary = cfg.eval.primary or default_primary(cfg, metrics)
    for key in (f"{primary}_pruned", f"{primary}_after", primary):
        if key in metrics and isinstance(metrics[key], (int, float)):
            metrics["objective"] = float(metrics[key])
            metrics["objective_name"] = key
            metrics["objective_mode"] = "min" if primary in LOWER_IS_BETTER else "max"
            return
    if "objective" in metrics and "objective_name" not in metrics:  # a job's own choice, named after its key
        name = next((k for k, v in metrics.items() if k != "objective" and v == metrics["objective"]), "objective")
        metrics["objective_name"] = name
        metrics["objective_mode"] = "min" if name.startswith(LOWER_IS_BETTER) else "max"


def default_primary(cfg: Config, metrics: dict) -> str:
    if cfg.model.task == "causal_lm":
        return "ppl"
    if cfg.model.task == "question_answering":
        return "f1"
    if any(k.startswith("pearson") for k in metrics) and not any(k.startswith("accuracy") for k in metrics):
        return "pearson"
    return "accuracy"


def _json_default(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)
