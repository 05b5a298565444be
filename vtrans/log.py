"""Rank-0 experiment logging: Weights & Biases (offline by default) or nothing; plus the console summary."""
from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("vtrans")


class RunLogger:
    """Logs scalars and summaries to W&B on rank 0 only; a no-op elsewhere or with logger.kind=none."""

    def __init__(self, cfg, run_config: dict, out_dir: str, rank: int = 0):
        self.run = None
        if cfg.kind != "wandb" or rank != 0:
            return
        import wandb

        os.environ.setdefault("WANDB_MODE", cfg.mode)
        self.run = wandb.init(project=cfg.project, group=cfg.group or None, name=cfg.name or None,
                              dir=out_dir, config=run_config, mode=cfg.mode)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str, bool)):
                    self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
