"""Runs optimisation of a module that returns (loss, stats): gradient accumulation, clipping, separate
learning rates per parameter group. The only module allowed to import the distributed stack."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn


class Engine:
    """Single-process engine (plain PyTorch AdamW)."""

    def __init__(self, module: nn.Module, param_groups: list[dict], grad_accum: int = 1, clip: float = 1.0):
        self.module = module
        groups = [g for g in param_groups if g["params"]]
        self.names = [g.get("name", str(i)) for i, g in enumerate(groups)]
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                                           betas=(0.9, 0.999), eps=1e-8)
        self.grad_accum, self.clip = grad_accum, clip
        self.params = [p for g in groups for p in g["params"]]
        self.rank, self.world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{n}": g["lr"] for n, g in zip(self.names, self.optimizer.param_groups)}

    def train_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        self.module.train()
        totals: dict[str, float] = {}
        for batch in micro_batches:
            loss, stats = self.module(batch, step)
            (loss / len(micro_batches)).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        if self.clip > 0:
            # masks and multipliers are clipped with the weights; the multipliers' reversed gradient is exact
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            totals["grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals


def fit(engine: Engine, batches: Iterator[dict], steps: int, grad_accum: int,
        on_log: Callable[[int, dict], None] | None = None, log_every: int = 10, progress: bool = True,
        desc: str = "prune") -> list[dict]:
    """Run `steps` optimizer steps of `grad_accum` micro-batches; returns the per-step stats."""
    from tqdm.auto import tqdm

    history = []
    bar = tqdm(total=steps, desc=desc, disable=not (progress and engine.is_main), dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in range(steps):
        micro = [next(batches) for _ in range(grad_accum)]
        stats = engine.train_step(micro, step)
        stats["step"] = step + 1
        stats["elapsed_s"] = time.perf_counter() - t0
        history.append(stats)
        postfix = {"loss": f"{stats['loss']:.3f}"}
        if "expected_ratio" in stats:
            postfix["size"] = f"{stats['expected_ratio']:.3f}/{stats['target_ratio']:.3f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if on_log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(step + 1, {**stats, **engine.learning_rates()})
        if not math.isfinite(stats["loss"]):
            bar.close()
            raise FloatingPointError(f"loss became {stats['loss']} at step {step + 1}; lower the learning rates")
    bar.close()
    return history
