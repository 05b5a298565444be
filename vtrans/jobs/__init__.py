"""Jobs: each is `run(cfg, out_dir) -> metrics`; `run` here validates the config and dispatches on `job`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config, load_config

log = logging.getLogger("vtrans")


def output_dir(cfg: Config) -> Path:
    """cfg.output_dir, else the Hydra run directory, else ./outputs/vtrans."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not running under Hydra
        return Path("outputs/vtrans")


def run(cfg) -> dict:
    """Validate the config (before any model is loaded), run the chosen job, write metrics.json."""
    cfg = load_config(cfg)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.job == "prune":
        from .prune import run as job
    else:
        raise ValueError(f"job={cfg.job!r} is not available in this version; available: ['prune']")
    metrics = job(cfg, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
