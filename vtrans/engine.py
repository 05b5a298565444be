"""Runs optimisation of a module that returns (loss, stats): gradient accumulation, clipping, separate learning rates
per parameter group, on one process (`Engine`) or on many with DeepSpeed ZeRO 0-3 (`DeepSpeedEngine`); and the
training loop `fit`, which checkpoints and resumes. The only module allowed to import the distributed stack."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .cluster import dist_env, export_dist_env

log = logging.getLogger("vtrans")
DEFAULT_WEIGHT_DECAY = 0.01  # torch AdamW's default, for groups that set none


def _strip_names(groups: list[dict]) -> tuple[list[str], list[dict]]:
    groups = [g for g in groups if g["params"]]
    names = [g.get("name", str(i)) for i, g in enumerate(groups)]
    return names, [{k: v for k, v in g.items() if k not in ("name", "replicated")} for g in groups]


def _rows(batch) -> int:
    t = batch if isinstance(batch, torch.Tensor) else next(v for v in batch.values() if v is not None)
    return t.shape[0]


class Engine:
    """Single-process engine (plain PyTorch AdamW)."""

    rank, world_size = 0, 1

    def __init__(self, module: nn.Module, param_groups: list[dict], grad_accum: int = 1, clip: float = 1.0,
                 weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int | None = None):
        self.module = module
        self.names, groups = _strip_names(param_groups)
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        self.grad_accum, self.clip = grad_accum, clip
        self.params = [p for g in groups for p in g["params"]]
        self.device = next(module.parameters()).device
        if seed is not None:
            torch.manual_seed(seed)

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

    # --- what checkpoints and multi-process jobs need; trivial on one process ---
    def save_state(self, path: Path) -> None:
        """Module (weights, masks, multipliers) and optimizer state into the directory `path`."""
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                   Path(path) / "engine.pt")

    def state_bytes(self) -> int:
        """About how many bytes save_state writes (Adam's two moments counted before its first step too)."""
        from .checkpoint import tensor_bytes

        module = tensor_bytes(self.module.state_dict().values())
        optimizer = sum(tensor_bytes(self.optimizer.state[p].values()) if self.optimizer.state.get(p)
                        else 2 * p.numel() * p.element_size() for p in self.params)
        return module + optimizer

    def load_state(self, path: Path) -> None:
        state = torch.load(Path(path) / "engine.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on some rank (so that every rank takes the same branch)."""
        return tuple(bool(f) for f in flags)

    def broadcast_object(self, obj):
        """Rank 0's value of `obj` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def gathered(self, params=None):
        """A context in which `params` hold their full values (they always do on one process)."""
        return contextlib.nullcontext()

    def consolidate(self) -> None:
        """After training: leave `module` a plain module holding its full trained parameters (a no-op here)."""

    def close(self) -> None:
        pass


class DeepSpeedEngine(Engine):
    """The same interface on DeepSpeed: ZeRO stage 0-3, bf16 or fp32, optimizer / parameter offload to CPU.

    Every rank is given the same global micro-batches and trains on its own slice of each, so a run sees the same
    global batch whatever the number of ranks. A frozen teacher (`teacher`, or the module's own separate teacher)
    is sharded like the student under ZeRO-3. `overrides` are merged into the generated DeepSpeed config.
    """

    def __init__(self, module: nn.Module, param_groups: list[dict], *, stage: int = 0, bf16: bool = False,
                 offload_optimizer: bool = False, offload_params: bool = False, grad_accum: int = 1,
                 clip: float = 1.0, weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int | None = None,
                 teacher: nn.Module | None = None, overrides: dict | None = None):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not torch.distributed.is_initialized():
            if "RANK" not in os.environ:  # not started by launch.py / torchrun: derive (srun) or run alone
                export_dist_env(dist_env())
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if offload_params and stage != 3:
            raise ValueError(f"deepspeed.offload_params needs ZeRO stage 3 (deepspeed.stage={stage})")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank)) % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.module, self.grad_accum, self.clip, self.stage, self.bf16 = module, grad_accum, clip, stage, bf16
        self.dtype = next(module.parameters()).dtype  # restored by consolidate()
        if seed is not None:  # independent VIB noise on every rank
            torch.manual_seed(seed + self.rank)
        # replicated groups (masks, multipliers: tiny, float32, whole on every rank, outside the module tree) get a
        # plain AdamW of their own, their gradients averaged over the ranks here; DeepSpeed shards the rest
        replicated = [g for g in param_groups if g.get("replicated")]
        self.names, groups = _strip_names([g for g in param_groups if not g.get("replicated")])
        self.replicated_names, replicated = _strip_names(replicated)
        for g in groups + replicated:
            g.setdefault("weight_decay", weight_decay)
        self.config = _deep_merge(self._config(stage, bf16, offload_optimizer, offload_params, grad_accum, clip,
                                               weight_decay), overrides or {})
        module.to(self.device)  # the replicated tensors follow the module (see PruningModule)
        self.replicated = [p for g in replicated for p in g["params"]]
        self.replicated_optimizer = torch.optim.AdamW(replicated, betas=(0.9, 0.999), eps=1e-8,
                                                      weight_decay=weight_decay) if replicated else None
        optimizer = None
        if groups and not offload_optimizer:  # DeepSpeed's CPU Adam is needed (and compiled) only for offloading
            optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        if not groups:  # nothing for DeepSpeed to optimise (e.g. Faster-VTrans): it only shards the frozen model
            self.config.pop("optimizer", None)
            self.config["zero_optimization"].pop("offload_optimizer", None)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                             model_parameters=groups or None, config=self.config)
        self.params = [p for g in groups for p in g["params"]]
        self.teacher = teacher if teacher is not None else _separate_teacher(module)
        self.teacher_engine = None
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval()
            if stage == 3:  # shard the frozen teacher too: an optimizer-less ZeRO-3 engine partitions it
                tconf = {k: v for k, v in self.config.items() if k not in ("optimizer", "gradient_clipping")}
                tconf["zero_optimization"] = {k: v for k, v in tconf["zero_optimization"].items()
                                              if k != "offload_optimizer"}
                self.teacher_engine = deepspeed.initialize(model=self.teacher, config=tconf)[0]
            else:
                self.teacher.to(device=self.device, dtype=torch.bfloat16 if bf16 else None)

    def _config(self, stage, bf16, offload_optimizer, offload_params, grad_accum, clip, weight_decay) -> dict:
        zero: dict = {"stage": stage}
        if offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {
            "train_micro_batch_size_per_gpu": 1,  # the real size is whatever train_step is given
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": clip,
            "zero_optimization": zero,
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
            "steps_per_print": 2 ** 31,
            "wall_clock_breakdown": False,
        }
        if offload_optimizer:
            config["optimizer"] = {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8,
                                                               "weight_decay": weight_decay}}
        return config

    def learning_rates(self) -> dict[str, float]:
        rates = {}
        if self.optimizer is not None:
            rates.update({f"lr/{n}": g["lr"] for n, g in zip(self.names, self.optimizer.param_groups)})
        if self.replicated_optimizer is not None:
            rates.update({f"lr/{n}": g["lr"]
                          for n, g in zip(self.replicated_names, self.replicated_optimizer.param_groups)})
        return rates

    def local_slice(self, batch):
        """This rank's rows of a global batch."""
        n = _rows(batch)
        if n % self.world_size:
            raise ValueError(f"a batch of {n} rows cannot be split over {self.world_size} ranks; make optim.batch_size "
                             f"a multiple of the number of processes")
        per = n // self.world_size
        rows = slice(self.rank * per, (self.rank + 1) * per)
        if isinstance(batch, torch.Tensor):
            return batch[rows].to(self.device)
        return {k: v[rows].to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"DeepSpeed was configured for {self.grad_accum} micro-batches per step, "
                             f"got {len(micro_batches)}")
        self.ds.train()
        totals: dict[str, float] = {}
        for batch in micro_batches:
            loss, stats = self.ds(self.local_slice(batch), step)
            if self.optimizer is not None:
                self.ds.backward(loss)  # scaled by 1 / grad_accum; gradients averaged over ranks
                self.ds.step()  # an optimizer step at the accumulation boundary only
            else:  # a frozen, sharded model: only the replicated tensors learn
                (loss / len(micro_batches)).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        if self.replicated_optimizer is not None:
            totals.update(self._step_replicated())
        totals = self._mean_over_ranks(totals)  # every rank logs (and tests for divergence) the global values
        norm = self.ds.get_global_grad_norm() if self.optimizer is not None else None
        if self.clip > 0 and norm is not None:
            totals["grad_norm"] = float(norm)
        return totals

    def _step_replicated(self) -> dict[str, float]:
        """Average the replicated gradients over the ranks, clip them, step their optimizer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(self.replicated, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
            offset += g.numel()
        stats = {}
        if self.clip > 0:
            stats["grad_norm_replicated"] = float(torch.nn.utils.clip_grad_norm_(self.replicated, self.clip))
        self.replicated_optimizer.step()
        self.replicated_optimizer.zero_grad(set_to_none=True)
        return stats

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, (t / self.world_size).tolist()))

    def save_state(self, path: Path) -> None:
        """DeepSpeed's own checkpoint (module with its masks and multipliers, optimizer shards) and, from rank 0, the
        replicated optimizer's state; a collective call."""
        self.ds.save_checkpoint(str(path), tag="deepspeed", save_latest=False)
        if self.replicated_optimizer is not None and self.is_main:
            torch.save(self.replicated_optimizer.state_dict(), Path(path) / "replicated_optimizer.pt")

    def state_bytes(self) -> int:
        """About how many bytes all ranks' save_state write together: the module in its dtype (whole, also under
        ZeRO-3), and for each trainable weight fp32 Adam moments (+ an fp32 master copy under bf16)."""
        module = trainable = 0
        for p in self.module.parameters():
            n = getattr(p, "ds_numel", p.numel())
            module += n * p.element_size()
            trainable += n if p.requires_grad else 0
        module += sum(b.numel() * b.element_size() for b in self.module.buffers())
        return module + trainable * (12 if self.bf16 else 8)

    def load_state(self, path: Path) -> None:
        load_path, _ = self.ds.load_checkpoint(str(path), tag="deepspeed",
                                               load_optimizer_states=self.optimizer is not None,
                                               load_lr_scheduler_states=self.optimizer is not None)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")
        if self.replicated_optimizer is not None:
            state = torch.load(Path(path) / "replicated_optimizer.pt", map_location=self.device, weights_only=True)
            self.replicated_optimizer.load_state_dict(state)

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        t = torch.tensor([float(bool(f)) for f in flags])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(x) for x in t.tolist())

    def broadcast_object(self, obj):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        torch.distributed.barrier()

    @contextlib.contextmanager
    def gathered(self, params=None):
        """Full values of `params` (default: all of the module's) on every rank inside the block (ZeRO-3 shards
        them outside their module's forward); read-only."""
        import deepspeed

        params = list(self.module.parameters()) if params is None else list(params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3):
            yield

    def consolidate(self) -> None:
        """Gather the trained shards back into full tensors on every rank (one tensor at a time), remove DeepSpeed's
        hooks, and cast back to the dtype the module was loaded in (trainable tensors from the fp32 master copies
        under bf16). `module` is then a plain module: decide / materialise / evaluate / export read it as usual."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        if self.ds is None:
            return
        full = {}
        for name, p in self.module.named_parameters():
            master = safe_get_full_fp32_param(p) if (self.bf16 and p.requires_grad) else None
            if master is not None:
                full[name] = master.detach().clone()
            elif self.stage == 3:
                with deepspeed.zero.GatheredParameters([p]):
                    full[name] = p.data.detach().clone()
            else:
                full[name] = p.data
        self.ds.destroy()
        for name, p in self.module.named_parameters():
            p.data = full[name]
        self.module.to(dtype=self.dtype)
        if self.teacher_engine is not None:
            self.teacher_engine.destroy()
        self.ds = self.teacher_engine = self.optimizer = None

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _separate_teacher(module: nn.Module) -> nn.Module | None:
    """The frozen teacher a PruningModule keeps outside its module tree (VTrans with a separate teacher)."""
    held = getattr(module, "_teacher", None)
    return held[0] if isinstance(held, list) and held else None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def distributed_world_size() -> int:
    """The number of processes of this job as torch.distributed / the launcher sees it."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def make_engine(module: nn.Module, param_groups: list[dict], cfg) -> Engine:
    """The engine the config asks for: DeepSpeed when `deepspeed.enabled`, else the single-process engine."""
    ds, oc = cfg.deepspeed, cfg.optim
    common = dict(grad_accum=oc.grad_accum, clip=oc.clip, weight_decay=oc.weight_decay, seed=oc.seed)
    if ds.enabled:
        return DeepSpeedEngine(module, param_groups, stage=ds.stage, bf16=ds.bf16,
                               offload_optimizer=ds.offload_optimizer, offload_params=ds.offload_params, **common)
    world = distributed_world_size()
    if world > 1:
        raise ValueError(f"this job runs as {world} processes but deepspeed.enabled=false; choose a DeepSpeed "
                         "config (e.g. deepspeed=zero2 or deepspeed=zero3) or run a single process")
    return Engine(module, param_groups, **common)


# ---------------------------------------------------------------------------------------------------------------
# the training loop


def fit(engine: Engine, batches: Iterator[dict] | Callable[[int], Iterator[dict]], steps: int, grad_accum: int,
        on_log: Callable[[int, dict], None] | None = None, log_every: int = 10, progress: bool = True,
        desc: str = "prune", checkpointer=None, on_step: Callable[[int], None] | None = None,
        end_reserve: int = 0) -> list[dict]:
    """Run `steps` optimizer steps of `grad_accum` micro-batches; returns the per-step stats.

    `batches` is an iterator of global micro-batches, or a function of a sample offset returning one (so that a
    resumed run continues at its data position). With a `checkpointer` (vtrans.checkpoint.Checkpointer) the run
    resumes from its latest checkpoint, saves every N steps, at the end, and on SIGTERM / SIGINT / SIGUSR1 (at the
    next step boundary; SIGTERM / SIGINT then end the run with `Preempted`). The end-of-training checkpoint only
    spares a rerun the training when the job stops before its results are written: it is saved only when the disk
    also keeps `end_reserve` bytes free (room for the model), and a failure to save it is a warning, not an error.
    Logging and the progress bar are on rank 0 only. `on_step(step)` runs on every rank after each optimizer step
    (iterative pruning decisions).
    """
    from tqdm.auto import tqdm

    from . import checkpoint as ckpt

    state = checkpointer.restore(engine) if checkpointer is not None else None
    start, samples = (state.step, state.samples) if state is not None else (0, 0)
    history = list(state.history) if state is not None else []
    if callable(batches):
        batches = batches(samples)
    elif samples:  # an iterator cannot seek: skip what was already consumed
        skipped = 0
        while skipped < samples:
            skipped += _rows(next(batches))
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (progress and engine.is_main), dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in range(start, steps):
        micro = [next(batches) for _ in range(grad_accum)]
        samples += sum(_rows(b) for b in micro)
        stats = engine.train_step(micro, step)
        if on_step is not None:  # e.g. an iterative pruning decision; before the checkpoint, so a resume sees it
            on_step(step + 1)
        stats["step"] = step + 1
        stats["elapsed_s"] = time.perf_counter() - t0
        history.append(stats)
        postfix = {"loss": f"{stats['loss']:.3f}"}
        if "expected_ratio" in stats:
            postfix["size"] = f"{stats['expected_ratio']:.3f}/{stats['target_ratio']:.3f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if on_log is not None and engine.is_main and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(step + 1, {**stats, **engine.learning_rates()})
        if not math.isfinite(stats["loss"]):
            bar.close()
            raise FloatingPointError(f"loss became {stats['loss']} at step {step + 1}; lower the learning rates")
        if checkpointer is None:
            continue
        save_now, stop_now = engine.any_rank(*ckpt.signal_requests())
        if save_now or stop_now or checkpointer.due(step + 1) or step + 1 == steps:
            reason = "signal" if (save_now or stop_now) else "periodic" if checkpointer.due(step + 1) else "end"
            checkpointer.save(engine, ckpt.TrainState(step=step + 1, samples=samples, history=history), reason,
                              required=reason != "end", reserve=end_reserve if reason == "end" else 0)
            ckpt.clear_save_request()
        if stop_now:
            bar.close()
            signum = ckpt.stop_signal() or signal.SIGTERM  # a rank the signal did not reach stops as if by SIGTERM
            ckpt.clear_requests()
            raise ckpt.Preempted(step + 1, signum)
    bar.close()
    return history
