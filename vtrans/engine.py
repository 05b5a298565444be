"""This job's processes and devices (`Processes`: rank, world size, device, and the collectives every job uses, on that
device so NCCL accepts them), and the optimisation of a module that returns (loss, stats): gradient accumulation,
clipping, separate learning rates per parameter group, on one process (`Engine`, bf16 autocast optional) or on many
with DeepSpeed ZeRO 0-3 (`DeepSpeedEngine`); and the training loop `fit`, which checkpoints and resumes. The only
module allowed to import the distributed stack."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import hostmem
from .cluster import dist_env, export_dist_env

log = logging.getLogger("vtrans")
DEFAULT_WEIGHT_DECAY = 0.01  # torch AdamW's default, for groups that set none
REPLICATED_FILE = "replicated.pt"  # a DeepSpeed checkpoint's whole part: masks, multipliers and their optimizer


def _strip_names(groups: list[dict]) -> tuple[list[str], list[dict]]:
    groups = [g for g in groups if g["params"]]
    names = [g.get("name", str(i)) for i, g in enumerate(groups)]
    return names, [{k: v for k, v in g.items() if k not in ("name", "replicated")} for g in groups]


def _rows(batch) -> int:
    t = batch if isinstance(batch, torch.Tensor) else next(v for v in batch.values() if v is not None)
    return t.shape[0]


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# processes and devices

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: cuda:<local rank> when CUDA is present, else the CPU; cuda: the same GPU, an error without CUDA."""
    if spec not in DEVICES:
        raise ValueError(f"device={spec!r} is not accepted; choose one of {list(DEVICES)}")
    if spec == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is available (torch.cuda.is_available() is False); "
                           "use device=auto or device=cpu")
    if spec == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


class Processes:
    """The processes of this job and its device: rank, world size, and the collectives the jobs use (evaluation split
    over the ranks, the decisions every rank must agree on). Tensors are reduced on `device` (NCCL takes no CPU
    tensors); with one process every collective is the identity."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1):
        self.device, self.rank, self.world_size = device, rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items (the first ranks take one more when n does not divide)."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks (a new tensor on t's device)."""
        if not self.distributed:
            return t
        x = t.detach().to(self.device, copy=True)
        torch.distributed.all_reduce(x)
        return x.to(t.device)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        total = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device))
        return dict(zip(keys, (total / self.world_size).tolist()))

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on some rank (so that every rank takes the same branch)."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(bool(f)) for f in flags], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(x) for x in t.tolist())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj, src: int = 0):
        """Rank `src`'s value of `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    @torch.no_grad()
    def broadcast_tensors(self, tensors, src: int = 0) -> None:
        """Overwrite `tensors` in place with rank `src`'s values (replicated state every rank must hold alike)."""
        if not self.distributed:
            return
        for t in tensors:
            x = t.data.to(self.device)
            torch.distributed.broadcast(x, src=src)
            if x is not t.data:
                t.data.copy_(x)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


_PROCESSES: Processes | None = None


def processes(device: str = "auto", timeout_minutes: float = 120.0) -> Processes:
    """This job's Processes (made once): the device (see `resolve_device`) and, when several processes run (torchrun,
    the DeepSpeed launcher, srun), the process group: NCCL on GPUs, gloo on CPUs, with a `timeout_minutes` long enough
    for work that one rank does while the others wait (saving, lm-eval)."""
    global _PROCESSES
    env = dist_env()
    if _PROCESSES is not None and _PROCESSES.world_size == env.world_size and _PROCESSES.rank == env.rank:
        return _PROCESSES
    dev = resolve_device(device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if env.world_size > 1 and not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # not started by launch.py / torchrun: derive (srun)
            export_dist_env(env)
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    _PROCESSES = Processes(dev, env.rank, env.world_size)
    return _PROCESSES


class Engine:
    """Single-process engine (plain PyTorch AdamW) on the module's device, with optional bf16 autocast."""

    def __init__(self, module: nn.Module, param_groups: list[dict], grad_accum: int = 1, clip: float = 1.0,
                 weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int | None = None, bf16_autocast: bool = False,
                 procs: Processes | None = None):
        self.module = module
        self.names, groups = _strip_names(param_groups)
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        self._base_lrs = [[g["lr"] for g in self.optimizer.param_groups]]
        self.grad_accum, self.clip = grad_accum, clip
        # gradients are clipped per side, as a DeepSpeed engine does: the replicated tensors (masks, multipliers) by
        # their own norm, the rest (weights, the distillation map) by theirs
        kept = [g for g in param_groups if g["params"]]
        self.replicated = [p for g in kept if g.get("replicated") for p in g["params"]]
        self.params = [p for g in kept if not g.get("replicated") for p in g["params"]]
        self.device = next(module.parameters()).device
        self.procs = procs or Processes(self.device)
        self.autocast = bf16_autocast
        if seed is not None:
            torch.manual_seed(seed)

    @property
    def rank(self) -> int:
        return self.procs.rank

    @property
    def world_size(self) -> int:
        return self.procs.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{n}": g["lr"] for n, g in zip(self.names, self.optimizer.param_groups)}

    def _optimizers(self) -> list:
        return [self.optimizer]

    def scale_learning_rates(self, factor: float) -> None:
        """Every group's learning rate set to `factor` times the one it was built with (a schedule's step; a
        function of the step alone, so a resumed run continues it whatever the checkpoint's optimizer held)."""
        for optimizer, base in zip(self._optimizers(), self._base_lrs):
            if optimizer is not None:
                for g, lr in zip(optimizer.param_groups, base):
                    g["lr"] = lr * factor

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def train_step(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        _check_not_released(self)
        self.module.train()
        totals: dict[str, float] = {}
        for batch in micro_batches:
            with self._autocast():
                loss, stats = self.module(to_device(batch, self.device), step)
            (loss / len(micro_batches)).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        if self.clip > 0:  # the multipliers' reversed gradient is clipped like any other
            norms = [float(torch.nn.utils.clip_grad_norm_(side, self.clip))
                     for side in (self.params, self.replicated) if side]
            totals["grad_norm"] = math.sqrt(sum(n * n for n in norms))
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
                        else 2 * p.numel() * p.element_size()
                        for g in self.optimizer.param_groups for p in g["params"])
        return module + optimizer

    def load_state(self, path: Path, world_size: int | None = None) -> None:
        state = torch.load(Path(path) / "engine.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on some rank (so that every rank takes the same branch)."""
        return self.procs.any(*flags)

    def broadcast_object(self, obj):
        """Rank 0's value of `obj` on every rank."""
        return self.procs.broadcast(obj)

    def barrier(self) -> None:
        self.procs.barrier()

    def fetch(self, params, free: bool = False) -> list[torch.Tensor] | None:
        """The full values of `params` on the main process (None on the others): what materialising reads. `free`
        (a ZeRO-3 model that is not used again) drops each partition once it is read; nothing here is partitioned."""
        return [p.detach() for p in params]

    def release_parameters(self) -> None:
        """Partition again what a forward left gathered (nothing is partitioned on one process)."""

    def consolidate(self) -> None:
        """After training: leave `module` a plain module holding its full trained parameters (a no-op here)."""

    def release(self) -> None:
        """After the last training step (before materialising): free what only training needs, the optimizer's
        state and the frozen teacher (VTrans's copy of the dense model), and hand the memory back. The module keeps
        its parameters; it is not trained again (`train_step` refuses)."""
        self.optimizer.state.clear()
        for p in self.params + self.replicated:
            p.grad = None
        _empty_teacher(_separate_teacher(self.module), keep=self.module)
        _drop_teacher(self.module)
        self.released = True
        hostmem.trim()

    def close(self) -> None:
        pass


@torch.no_grad()
def gather_to_main(params, procs: Processes, free: bool = False) -> list[torch.Tensor] | None:
    """The full values of ZeRO-3-partitioned `params`, one tensor at a time, on rank 0's CPU (None on the other
    ranks): every rank sends its partition to rank 0 (torch.distributed.gather), so the others never hold a whole
    tensor, unlike DeepSpeed's GatheredParameters (an all-gather). Parameters that are not partitioned come as they
    are. With `free`, every rank drops its partition of each tensor once it is sent (the model is not used again:
    materialising at the end of the prune job), so that rank 0 holds the dense shard it has not yet read plus the
    pruned model built so far, never both whole."""
    import torch.distributed as dist

    out: list[torch.Tensor] | None = [] if procs.is_main else None
    for p in params:
        part = getattr(p, "ds_tensor", None)
        if part is None or not dist.is_initialized():
            if out is not None:
                out.append(p.detach().cpu())
            continue
        group = getattr(p, "ds_process_group", None) or dist.group.WORLD
        world, dst = dist.get_world_size(group), dist.get_global_rank(group, 0)
        # offloaded partitions live on the CPU; NCCL gathers device tensors
        part = part.detach().to(procs.device).contiguous()
        # gloo's gather receives into a flat copy of the output first (twice the tensor on rank 0): point-to-point
        # there; NCCL's gather writes into the chunks directly
        p2p = dist.get_backend(group) == "gloo"
        if dist.get_rank() == dst:
            buf = torch.empty(world * part.numel(), dtype=part.dtype, device=part.device)
            chunks = list(buf.chunk(world))
            if p2p:
                for r, chunk in enumerate(chunks):
                    if r == dist.get_group_rank(group, dst):
                        chunk.copy_(part)
                    else:
                        dist.recv(chunk, src=dist.get_global_rank(group, r), group=group)
            else:
                dist.gather(part, gather_list=chunks, dst=dst, group=group)
            if out is not None:
                out.append(buf[:p.ds_numel].view(p.ds_shape).cpu())
        elif p2p:
            dist.send(part, dst=dst, group=group)
        else:
            dist.gather(part, dst=dst, group=group)
        if free:
            del part
            p.ds_tensor.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
    return out


def deepspeed_config(stage: int, bf16: bool = False, offload_optimizer: bool = False, offload_params: bool = False,
                     grad_accum: int = 1, clip: float = 1.0, weight_decay: float = DEFAULT_WEIGHT_DECAY) -> dict:
    """The DeepSpeed config vtrans runs with (the engine's, and zero.Init's when models are built sharded)."""
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


class ShardedBuild:
    """Building and filling models that no rank holds whole (ZeRO-3): `init()` is DeepSpeed's zero.Init (modules built
    inside get their parameters partitioned over the ranks as they are created), `write(params)` gathers parameters
    whole for rank 0 to write into and partitions them again on exit. vtrans.models.load streams a checkpoint through
    it one tensor at a time."""

    def __init__(self, cfg, procs: Processes):
        import deepspeed

        ds = cfg.deepspeed
        self.procs, self.is_main = procs, procs.is_main
        if "RANK" not in os.environ:
            export_dist_env(dist_env())
        deepspeed.init_distributed(dist_backend="nccl" if procs.device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(minutes=ds.timeout_minutes))
        self.config = deepspeed_config(3, ds.bf16, ds.offload_optimizer, ds.offload_params, cfg.optim.grad_accum,
                                       cfg.optim.clip, cfg.optim.weight_decay)
        self.config["zero_optimization"].update(ds.zero3_settings())
        loaded = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
        self.dtype = torch.bfloat16 if ds.bf16 else loaded

    @contextlib.contextmanager
    def init(self):
        """Models built inside are partitioned as they are created, without a random initialisation (their values
        come from a checkpoint next, see `write`; `init_random` for benchmarks) and with rotary frequencies kept in
        float32 (transformers' own guards for zero.Init, where this version has them)."""
        import deepspeed

        with contextlib.ExitStack() as stack:
            try:  # transformers >= 5: skip weight init, keep torch.arange's dtype (rotary buffers)
                from transformers.initialization import no_init_weights
                from transformers.integrations.deepspeed import prevent_arange_dtype_change

                stack.enter_context(no_init_weights())
                stack.enter_context(prevent_arange_dtype_change())
            except ImportError:
                pass
            init = deepspeed.zero.Init(config_dict_or_path=self.config, dtype=self.dtype)
            # DeepSpeed (0.19) drops a given dtype where the accelerator has no fp16 (`dtype or torch.float16 if
            # fp16 else torch.bfloat16 ...`): on a CPU without oneDNN fp16 (e.g. AMD EPYC) an fp32 model was built,
            # and trained, in bf16. The dtype asked for is set again before any parameter is made.
            init.dtype = self.dtype
            stack.enter_context(init)
            yield

    @torch.no_grad()
    def init_random(self, model: nn.Module, std: float = 0.02) -> None:
        """Random weights for a model built inside `init` (benchmarks): normal(0, std) matrices, unit norms."""
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                with self.write([p]):
                    if self.is_main:
                        if p.dim() > 1:
                            p.data.normal_(0.0, std)
                        else:
                            p.data.fill_(1.0 if "norm" in type(module).__name__.lower() or name == "weight" else 0.0)

    def write(self, params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)

    def fetch(self, params, free: bool = False) -> list[torch.Tensor] | None:
        """Full values of `params` on rank 0 only (materialising): see `gather_to_main`."""
        return gather_to_main(params, self.procs, free=free)

    def broadcast(self, obj):
        return self.procs.broadcast(obj)

    def barrier(self) -> None:
        self.procs.barrier()

    def forward_hooks(self, model: nn.Module):
        """Put ZeRO-3's hooks on `model` (an optimizer-less engine), so that calling it gathers each layer's
        parameters for its forward (one-shot scoring of a sharded model). Returns a handle to keep while the model
        runs; its `release()` partitions again what a backward left gathered."""
        import deepspeed

        conf = {k: v for k, v in self.config.items() if k not in ("optimizer", "gradient_clipping")}
        conf["zero_optimization"] = {k: v for k, v in conf["zero_optimization"].items() if k != "offload_optimizer"}
        ds = deepspeed.initialize(model=model, config=conf)[0]

        class Hooks:
            engine = ds

            @staticmethod
            def release() -> None:
                ds.optimizer.partition_all_parameters()

        return Hooks()


class DeepSpeedEngine(Engine):
    """The same interface on DeepSpeed: ZeRO stage 0-3, bf16 or fp32, optimizer / parameter offload to CPU.

    Every rank is given the same global micro-batches and trains on its own slice of each, so a run sees the same
    global batch whatever the number of ranks. A frozen teacher (`teacher`, or the module's own separate teacher)
    is sharded like the student under ZeRO-3. `overrides` are merged into the generated DeepSpeed config.
    """

    def __init__(self, module: nn.Module, param_groups: list[dict], *, stage: int = 0, bf16: bool = False,
                 offload_optimizer: bool = False, offload_params: bool = False, grad_accum: int = 1,
                 clip: float = 1.0, weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int | None = None,
                 teacher: nn.Module | None = None, overrides: dict | None = None, procs: Processes | None = None,
                 timeout_minutes: float = 120.0):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if offload_params and stage != 3:
            raise ValueError(f"deepspeed.offload_params needs ZeRO stage 3 (deepspeed.stage={stage})")
        self.procs = procs or processes(timeout_minutes=timeout_minutes)
        if "RANK" not in os.environ:  # alone, or not started by launch.py / torchrun: derive (srun)
            export_dist_env(dist_env())
        deepspeed.init_distributed(dist_backend="nccl" if self.procs.device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
        self.device = self.procs.device
        self.autocast = False  # DeepSpeed casts the module itself (deepspeed.bf16)
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
        self.config = _deep_merge(deepspeed_config(stage, bf16, offload_optimizer, offload_params, grad_accum, clip,
                                                   weight_decay), overrides or {})
        module.to(self.device)  # the replicated tensors follow the module (see PruningModule)
        self.replicated = [p for g in replicated for p in g["params"]]
        # every rank starts from rank 0's masks and multipliers (as DDP broadcasts its parameters): their initial
        # values come from random draws that the ranks made apart, and a sharded load uses the RNG unevenly
        self.procs.broadcast_tensors(self.replicated)
        self.replicated_optimizer = torch.optim.AdamW(replicated, betas=(0.9, 0.999), eps=1e-8,
                                                      weight_decay=weight_decay) if replicated else None
        optimizer = None
        if groups and not offload_optimizer:  # DeepSpeed's CPU Adam is needed (and compiled) only for offloading
            optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        if not groups:  # nothing for DeepSpeed to optimise (e.g. Faster-VTrans): ZeRO-3 only shards the frozen model,
            self.config.pop("optimizer", None)  # and ZeRO-1/2 (which partition optimizer states) have nothing to do
            self.config["zero_optimization"].pop("offload_optimizer", None)
            if stage in (1, 2):
                self.config["zero_optimization"]["stage"] = 0
        self.ds, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                           model_parameters=groups or None, config=self.config)
        # DeepSpeed's optimizer over its groups; None when it trains nothing (it may still hold a parameter offloader)
        self.optimizer = ds_optimizer if groups else None
        self._base_lrs = [[g["lr"] for g in o.param_groups] if o is not None else []
                          for o in self._optimizers()]
        self._offload = ds_optimizer if not groups else getattr(ds_optimizer, "parameter_offload", None)
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

    def learning_rates(self) -> dict[str, float]:
        rates = {}
        if self.optimizer is not None:
            rates.update({f"lr/{n}": g["lr"] for n, g in zip(self.names, self.optimizer.param_groups)})
        if self.replicated_optimizer is not None:
            rates.update({f"lr/{n}": g["lr"]
                          for n, g in zip(self.replicated_names, self.replicated_optimizer.param_groups)})
        return rates

    def _optimizers(self) -> list:
        return [self.optimizer, self.replicated_optimizer]

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
        _check_not_released(self)
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"DeepSpeed was configured for {self.grad_accum} micro-batches per step, "
                             f"got {len(micro_batches)}")
        self.ds.train()
        totals: dict[str, float] = {}
        for batch in micro_batches:
            if self.optimizer is not None:
                loss, stats = self.ds(self.local_slice(batch), step)
                self.ds.backward(loss)  # scaled by 1 / grad_accum; gradients averaged over ranks
                self.ds.step()  # an optimizer step at the accumulation boundary only
            else:  # frozen weights (sharded under ZeRO-3 by the hooks DeepSpeed put on every layer): only the
                loss, stats = self.module(self.local_slice(batch), step)  # replicated tensors learn
                (loss / len(micro_batches)).backward()
                self.release_parameters()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        if self.replicated_optimizer is not None:
            totals.update(self._step_replicated())
        totals = self.procs.mean(totals)  # every rank logs (and tests for divergence) the global values
        if self.clip > 0:
            norm = self.ds.get_global_grad_norm() if self.optimizer is not None else None
            replicated = totals.pop("grad_norm_replicated", None)
            parts = [float(x) for x in (norm, replicated) if x is not None]
            if parts:
                totals["grad_norm"] = math.sqrt(sum(x * x for x in parts))
        return totals

    def _step_replicated(self) -> dict[str, float]:
        """Average the replicated gradients over the ranks, clip them, step their optimizer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        flat = self.procs.sum(torch.cat([g.reshape(-1) for g in grads])) / self.world_size
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

    def save_state(self, path: Path) -> None:
        """A collective call. From rank 0, `replicated.pt`: the replicated tensors (masks, multipliers) and their
        optimizer's state, whole: it loads on any number of ranks. When DeepSpeed trains tensors of its own (weights,
        the layer-distillation map), also DeepSpeed's checkpoint (their shards and optimizer states)."""
        if self.is_main:
            torch.save({"extra": self.module.get_extra_state() if hasattr(self.module, "get_extra_state") else None,
                        "optimizer": self.replicated_optimizer.state_dict() if self.replicated_optimizer else None},
                       Path(path) / REPLICATED_FILE)
        if self.optimizer is not None:
            self.ds.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def state_bytes(self) -> int:
        """About how many bytes all ranks' save_state write together: the replicated part (masks, multipliers, their
        Adam moments) and, when DeepSpeed trains weights, the module in its dtype (whole, also under ZeRO-3) with fp32
        Adam moments for each trainable weight (+ an fp32 master copy under bf16)."""
        replicated = sum(3 * p.numel() * p.element_size() for p in self.replicated)
        if self.optimizer is None:
            return replicated
        module = trainable = 0
        for p in self.module.parameters():
            n = getattr(p, "ds_numel", p.numel())
            module += n * p.element_size()
            trainable += n if p.requires_grad else 0
        module += sum(b.numel() * b.element_size() for b in self.module.buffers())
        return replicated + module + trainable * (12 if self.bf16 else 8)

    def load_state(self, path: Path, world_size: int | None = None) -> None:
        """Load a checkpoint written by `world_size` ranks (default: this many). The replicated part loads on any
        number; DeepSpeed's shards only into as many ranks as wrote them: on another number the trained weights are
        read whole from the shards (their optimizer moments restart, with a warning)."""
        state = torch.load(Path(path) / REPLICATED_FILE, map_location=self.device, weights_only=False)
        if state["extra"] is not None:
            self.module.set_extra_state(state["extra"])
        if self.replicated_optimizer is not None and state["optimizer"] is not None:
            self.replicated_optimizer.load_state_dict(state["optimizer"])
        if self.optimizer is None:
            return
        if world_size in (None, self.world_size):
            load_path, _ = self.ds.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")
            return
        self._load_weights_from_shards(Path(path), world_size)

    def _load_weights_from_shards(self, path: Path, world_size: int) -> None:
        import deepspeed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if self.is_main:
            log.warning("checkpoint %s was written by %d ranks, this run has %d: the trained weights are read whole "
                        "from its shards; their optimizer moments restart (masks and multipliers resume exactly)",
                        path, world_size, self.world_size)
        full = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
        params = dict(self.module.named_parameters())
        for name, value in full.items():
            p = params.get(name)
            if p is None or not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.stage == 3), torch.no_grad():
                if self.is_main or self.stage != 3:
                    p.data.copy_(value.to(p.dtype).view_as(p.data))
        if hasattr(self.optimizer, "refresh_fp32_params"):  # ZeRO-3: fp32 masters from the new weights
            self.optimizer.refresh_fp32_params()
        elif hasattr(self.optimizer, "_restore_from_bit16_weights"):  # ZeRO-1/2
            self.optimizer._restore_from_bit16_weights()

    def state_on_main(self, model: nn.Module) -> dict | None:
        """`model`'s parameters and persistent buffers as whole CPU tensors on rank 0 (None elsewhere), gathered one
        tensor at a time (`fetch`): no rank holds more than one whole tensor beyond what it had, and under ZeRO-3
        only rank 0 holds even that."""
        state = {} if self.is_main else None
        for name, p in model.named_parameters():
            t = self.fetch([p])
            if state is not None:
                state[name] = t[0].to("cpu", copy=True)
        if self.is_main:  # buffers are whole on every rank
            for prefix, module in model.named_modules():
                for name, b in module.named_buffers(recurse=False):
                    if b is not None and name not in module._non_persistent_buffers_set:
                        state[f"{prefix}.{name}" if prefix else name] = b.detach().cpu()
        return state

    def release_parameters(self) -> None:
        """ZeRO-3: partition again whatever a forward or backward left gathered (layers whose post-backward hook never
        runs, such as frozen embeddings: DeepSpeed's optimizer does this after its own backward)."""
        if self.stage == 3 and self._offload is not None:
            self._offload.partition_all_parameters()

    def fetch(self, params, free: bool = False) -> list[torch.Tensor] | None:
        """Full values on rank 0 only under ZeRO-3 (`gather_to_main`, `free` as there); otherwise every rank holds
        them."""
        params = list(params)
        if self.stage == 3:
            return gather_to_main(params, self.procs, free=free)
        return [p.detach() for p in params] if self.procs.is_main else None

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

    def release(self) -> None:
        """After the last training step (before materialising): free everything only training needs, so that the
        pruned model is built next to the partitioned weights alone. DeepSpeed's engines are destroyed: with them go
        the optimizer's moments, ZeRO's fp32 master partitions and gradient buffers (trained weights) and the hooks
        that gather layers for a forward; the frozen teacher's engine and partitions go too. The parameters stay as
        they are (partitioned under ZeRO-3, in the training dtype) for `fetch` / `state_on_main`; the module is not
        run or trained again (`train_step` refuses)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # a ZeRO wrapper holds the torch optimizer
        if inner is not None and hasattr(inner, "state"):
            inner.state.clear()
        if self.replicated_optimizer is not None:
            self.replicated_optimizer.state.clear()
        self.release_parameters()  # nothing left gathered by the last forward
        # DeepSpeed keeps its optimizer reachable from every parameter (`_z3_optimizer`) and its engines from hooks
        # and closures, so dropping references frees nothing: the tensors only training used are emptied instead
        if self.ds is not None:
            self.ds.destroy()
        if self.teacher_engine is not None:
            self.teacher_engine.destroy()
        _empty_training_buffers(self.optimizer)
        _empty_teacher(self.teacher, keep=self.module)
        for p in self.params + self.replicated:
            p.grad = None
        self.ds = self.teacher_engine = self.optimizer = self._offload = self.teacher = None
        _drop_teacher(self.module)
        self.released = True
        hostmem.trim()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def auto_bucket_size(module: nn.Module, default: int = 500_000_000) -> int:
    """hidden_size^2 of the (first) transformers model inside `module`: the gradient-reduction bucket transformers'
    DeepSpeed integration uses for "auto"; DeepSpeed's own default where there is no such model."""
    for m in module.modules():
        hidden = getattr(getattr(m, "config", None), "hidden_size", None)
        if isinstance(hidden, int) and hidden > 0:
            return hidden * hidden
    return default


def _empty(t: torch.Tensor) -> None:
    t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def _empty_training_buffers(optimizer) -> None:
    """Empty what a DeepSpeed ZeRO optimizer holds for training only: fp32 master partitions where they are copies
    (bf16; in fp32 they are the weights themselves), the partitioned gradients and their flat buffers. The weights
    (the flat low-precision groups the parameters view) are kept."""
    if optimizer is None:
        return
    weights = {t.untyped_storage().data_ptr() for name in ("fp16_partitioned_groups_flat", "bit16_groups_flat")
               for t in getattr(optimizer, name, None) or [] if t.numel()}
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        for t in getattr(optimizer, name, None) or []:
            t.grad = None
            if t.numel() and t.untyped_storage().data_ptr() not in weights:
                _empty(t)
    for name in ("grad_partitions_flat_buffer", "averaged_gradients", "ipg_buffer"):
        if getattr(optimizer, name, None) is not None:
            setattr(optimizer, name, None if not isinstance(getattr(optimizer, name), dict) else {})
    grads = getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
    if isinstance(grads, dict):  # views of the flat gradient buffer: they would keep it alive
        grads.clear()
    # ZeRO-3: the parameters' partitions view the optimizer's flat weight groups; without the optimizer's own
    # references, materialise (fetch with free) releases each group once its last partition is read
    for name in ("fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat"):
        if isinstance(getattr(optimizer, name, None), list):
            setattr(optimizer, name, [])
    if getattr(optimizer, "lp_param_buffer", None) is not None:
        optimizer.lp_param_buffer = None


def _empty_teacher(teacher: nn.Module | None, keep: nn.Module) -> None:
    """Empty a separate frozen teacher's tensors (its ZeRO-3 partitions too), sparing any it shares with `keep`."""
    if teacher is None:
        return
    kept = {p.untyped_storage().data_ptr() for p in keep.parameters() if p.numel()}
    for p in teacher.parameters():
        part = getattr(p, "ds_tensor", None)
        if part is not None and part.numel() and part.untyped_storage().data_ptr() not in kept:
            _empty(part)
        if p.numel() and p.untyped_storage().data_ptr() not in kept:
            _empty(p)


def _drop_teacher(module: nn.Module) -> None:
    """Let go of the frozen teacher a training module holds (PruningModule / DistillModule keep it in `_teacher`)."""
    held = getattr(module, "_teacher", None)
    if isinstance(held, list) and held:
        held[0] = None


def _check_not_released(engine) -> None:
    if getattr(engine, "released", False):
        raise RuntimeError("this engine was released after training (optimizer state and teacher freed); "
                           "make a new engine to train again")


def _separate_teacher(module: nn.Module) -> nn.Module | None:
    """The frozen teacher a PruningModule keeps outside its module tree (VTrans with a separate teacher)."""
    held = getattr(module, "_teacher", None)
    return held[0] if isinstance(held, list) and held else None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_engine(module: nn.Module, param_groups: list[dict], cfg, procs: Processes | None = None) -> Engine:
    """The engine the config asks for: DeepSpeed when `deepspeed.enabled`, else the single-process engine on the
    job's device (the module is moved there)."""
    ds, oc = cfg.deepspeed, cfg.optim
    procs = procs or processes(cfg.device, ds.timeout_minutes)
    common = dict(grad_accum=oc.grad_accum, clip=oc.clip, weight_decay=oc.weight_decay, seed=oc.seed, procs=procs)
    if ds.enabled:
        zero = ds.zero3_settings() if ds.stage == 3 else {}
        if ds.stage > 0:
            zero["reduce_bucket_size"] = ds.reduce_bucket_size or auto_bucket_size(module)
        overrides = {"zero_optimization": zero} if zero else None
        return DeepSpeedEngine(module, param_groups, stage=ds.stage, bf16=ds.bf16,
                               offload_optimizer=ds.offload_optimizer, offload_params=ds.offload_params,
                               timeout_minutes=ds.timeout_minutes, overrides=overrides, **common)
    if procs.world_size > 1:
        raise ValueError(f"this job runs as {procs.world_size} processes but deepspeed.enabled=false; choose a "
                         "DeepSpeed config (e.g. deepspeed=zero2 or deepspeed=zero3) or run a single process")
    module.to(procs.device)
    return Engine(module, param_groups, bf16_autocast=oc.bf16_autocast, **common)


# ---------------------------------------------------------------------------------------------------------------
# the training loop


def lr_schedule(kind: str, steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The factor on the learning rate for the optimizer step with index `step` (0-based) of `steps`: a linear
    warm-up from 1 / warmup_steps to 1 over the first `warmup_steps`, then constant, or a linear or cosine decay that
    reaches 0 one step after the last (so the last step still moves the weights)."""
    from .config import LR_SCHEDULES

    if kind not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule {kind!r} is not one of {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def fit(engine: Engine, batches: Iterator[dict] | Callable[[int], Iterator[dict]], steps: int, grad_accum: int,
        on_log: Callable[[int, dict], None] | None = None, log_every: int = 10, progress: bool = True,
        desc: str = "prune", checkpointer=None, on_step: Callable[[int], None] | None = None,
        end_reserve: int = 0, lr_factor: Callable[[int], float] | None = None) -> list[dict]:
    """Run `steps` optimizer steps of `grad_accum` micro-batches; returns the per-step stats.

    `batches` is an iterator of global micro-batches, or a function of a sample offset returning one (so that a
    resumed run continues at its data position). With a `checkpointer` (vtrans.checkpoint.Checkpointer) the run
    resumes from its latest checkpoint, saves every N steps, at the end, and on SIGTERM / SIGINT / SIGUSR1 (at the
    next step boundary; SIGTERM / SIGINT then end the run with `Preempted`). The end-of-training checkpoint only
    spares a rerun the training when the job stops before its results are written: it is saved only when the disk
    also keeps `end_reserve` bytes free (room for the model), and a failure to save it is a warning, not an error.
    Logging and the progress bar are on rank 0 only. `on_step(step)` runs on every rank after each optimizer step
    (iterative pruning decisions). `lr_factor(step)` (e.g. `lr_schedule(...)`) scales every learning rate before
    each step.
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
        if lr_factor is not None:
            engine.scale_learning_rates(factor := lr_factor(step))
        stats = engine.train_step(micro, step)
        if lr_factor is not None:
            stats["lr_factor"] = factor
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
