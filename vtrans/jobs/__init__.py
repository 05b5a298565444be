"""Jobs: each is `run(cfg, out) -> metrics`, built from the stages in vtrans.pipeline; `run` here validates the
config, dispatches on `job`, picks the job's objective (the metric sweeps optimise and plot) and writes metrics.json
on rank 0 (strict JSON: non-finite values as null, listed under `non_finite_keys`)."""
from __future__ import annotations

import importlib
import logging

from ..config import load_config
from ..pipeline import is_main_process, output_dir, set_objective, write_metrics

log = logging.getLogger("vtrans")


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
        write_metrics(out, metrics)
    return metrics
