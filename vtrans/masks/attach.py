"""Attaching structure masks to a Hugging Face model from its architecture table.

Masks become submodules of the modules they gate and act through forward hooks, so the model's own
forward is unchanged and no mask state is threaded through it. Norms compute their statistics over the
kept hidden channels only, so a hard-masked model computes exactly what the materialised model does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.spec import SPECS, ArchSpec, base_model, get_module, shape_of
from ..shape import LayerShape, ModelShape
from .vib import StructureMask

STRUCTURES = ("hidden", "heads", "attention", "neurons", "ffn")


@dataclass
class MaskInit:
    method: str = "vib"
    mu: float = 1.0
    mu_std: float = 0.01
    log_sigma2: float = -9.0
    log_sigma2_std: float = 0.01
    k: float = 10.0


@dataclass
class LayerMasks:
    heads: StructureMask | None = None
    attention: StructureMask | None = None
    neurons: StructureMask | None = None
    ffn: StructureMask | None = None


@dataclass
class MaskedModel:
    """Handle on a model with masks attached: the masks, the dense shape, and the hooks."""
    model: nn.Module
    spec: ArchSpec
    dense: ModelShape
    hidden: StructureMask | None
    layers: list[LayerMasks]
    group: int  # query heads per mask unit (grouped-query attention: one unit per KV head)
    enabled: bool = True
    handles: list = field(default_factory=list)

    # ----- iteration -----
    def masks(self) -> dict[str, StructureMask]:
        out = {}
        if self.hidden is not None:
            out["hidden"] = self.hidden
        for i, lm in enumerate(self.layers):
            for kind in ("heads", "attention", "neurons", "ffn"):
                m = getattr(lm, kind)
                if m is not None:
                    out[f"layers.{i}.{kind}"] = m
        return out

    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.masks().values() for p in m.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def disabled(self):
        """Run the unmasked (teacher) model with the same weights."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for name, m in list(self.masks().items()):
            for parent in self.model.modules():
                for cname, child in list(parent.named_children()):
                    if child is m:
                        delattr(parent, cname)

    # ----- statistics gathered in the last forward (ZeRO-3 safe: computed inside the masks' forward) -----
    def kl_terms(self) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for name, m in self.masks().items():
            if m.last_kl is None:
                raise RuntimeError(f"mask {name} has no statistics: run a forward pass with masks enabled first")
            terms[m.kind] = terms.get(m.kind, 0) + m.last_kl
        return terms

    def expected_shape(self) -> ModelShape:
        """Soft kept counts from the last forward, as a shape for differentiable accounting."""
        hidden = self.hidden.last_soft.sum() if self.hidden is not None else float(self.dense.hidden)
        layers = []
        for dense, lm in zip(self.dense.layers, self.layers):
            heads, kv, inter = _soft_counts(dense, lm, self.group)
            layers.append(LayerShape(heads, kv, inter))
        return self.dense.with_counts(hidden, layers)

    def kept_shape(self) -> ModelShape:
        """The hard (decided or thresholded) shape, as ints, with empty layers dropped."""
        hidden = int(self.hidden.kept().sum()) if self.hidden is not None else self.dense.hidden
        layers = []
        for dense, lm in zip(self.dense.layers, self.layers):
            heads, kv, inter = _hard_counts(dense, lm, self.group)
            if heads or inter:
                layers.append(LayerShape(heads, kv, inter))
        return self.dense.with_counts(hidden, layers)


def _soft_counts(dense: LayerShape, lm: LayerMasks, group: int):
    kv = lm.heads.last_soft.sum() if lm.heads is not None else torch.tensor(float(dense.kv_heads))
    if lm.attention is not None:
        kv = kv * lm.attention.last_soft.sum()
    inter = lm.neurons.last_soft.sum() if lm.neurons is not None else torch.tensor(float(dense.intermediate))
    if lm.ffn is not None:
        inter = inter * lm.ffn.last_soft.sum()
    return kv * group, kv, inter


def _hard_counts(dense: LayerShape, lm: LayerMasks, group: int):
    kv = int(lm.heads.kept().sum()) if lm.heads is not None else dense.kv_heads
    if lm.attention is not None and not bool(lm.attention.kept().all()):
        kv = 0
    inter = int(lm.neurons.kept().sum()) if lm.neurons is not None else dense.intermediate
    if lm.ffn is not None and not bool(lm.ffn.kept().all()):
        inter = 0
    return kv * group, kv, inter


# ---------------------------------------------------------------------------------------------------------
# hooks


def _units(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)


def _apply(mask: StructureMask, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Multiply x by the mask with its units laid along the last dim (n units of x.shape[-1]/n channels)."""
    y, kl, soft = mask(_units(x, n or mask.n))
    mask.last_kl, mask.last_soft = kl, soft
    return y.reshape(x.shape)


def _apply_channels(mask: StructureMask, x: torch.Tensor) -> torch.Tensor:
    """Multiply x [..., n] channel-wise (one unit per channel)."""
    y, kl, soft = mask(x.unsqueeze(-1))
    mask.last_kl, mask.last_soft = kl, soft
    return y.squeeze(-1)


def _norm_over(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The module's norm (RMSNorm or LayerNorm) with statistics over the kept channels only; zeros elsewhere."""
    w = keep.to(torch.float32)
    n = w.sum().clamp_min(1.0)
    xf = x.to(torch.float32)
    weight = module.weight
    if isinstance(module, nn.LayerNorm):
        mean = (xf * w).sum(-1, keepdim=True) / n
        c = (xf - mean) * w
        var = c.pow(2).sum(-1, keepdim=True) / n
        y = c * torch.rsqrt(var + module.eps)
        y = y.to(x.dtype) * weight + (module.bias if module.bias is not None else 0)
        return y * w.to(y.dtype)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    var = (xf.pow(2) * w).sum(-1, keepdim=True) / n
    y = xf * torch.rsqrt(var + eps)
    return (weight * y.to(x.dtype)) * w.to(x.dtype)


def attach_masks(model: nn.Module, structures=STRUCTURES, init: MaskInit | None = None) -> MaskedModel:
    """Attach masks over the given structures; returns the handle. Call before wrapping with DeepSpeed."""
    init = init or MaskInit()
    bad = sorted(set(structures) - set(STRUCTURES))
    if bad:
        raise ValueError(f"unknown mask structures {bad}; accepted: {list(STRUCTURES)}")
    dense = shape_of(model)
    spec = SPECS[dense.family]
    base = base_model(model, spec)
    layers_mod = get_module(base, spec.layers)
    kv0 = dense.layers[0].kv_heads
    group = dense.layers[0].heads // kv0

    def new(kind, n):
        return StructureMask(kind, n, method=init.method, mu_init=init.mu, mu_std=init.mu_std,
                             log_sigma2_init=init.log_sigma2, log_sigma2_std=init.log_sigma2_std, k=init.k)

    ref = next(model.parameters())
    hidden = None
    if "hidden" in structures:
        hidden = new("hidden", dense.hidden)
        base.add_module("vib_hidden", hidden)
    layer_masks = []
    for i, (ls, layer) in enumerate(zip(dense.layers, layers_mod)):
        lm = LayerMasks()
        attn_c, ffn_c = get_module(layer, spec.attn_container), get_module(layer, spec.ffn_container)
        if "heads" in structures:
            lm.heads = new("heads", ls.kv_heads)
            attn_c.add_module("vib_heads", lm.heads)
        if "attention" in structures:
            lm.attention = new("attention", 1)
            attn_c.add_module("vib_attention", lm.attention)
        if "neurons" in structures:
            lm.neurons = new("neurons", ls.intermediate)
            ffn_c.add_module("vib_neurons", lm.neurons)
        if "ffn" in structures:
            lm.ffn = new("ffn", 1)
            ffn_c.add_module("vib_ffn", lm.ffn)
        layer_masks.append(lm)
    mm = MaskedModel(model, spec, dense, hidden, layer_masks, group)
    for m in mm.masks().values():
        m.to(device=ref.device)
        m.train(model.training)
    _register_hooks(mm, base, layers_mod)
    return mm


def _register_hooks(mm: MaskedModel, base: nn.Module, layers_mod) -> None:
    spec, H = mm.spec, mm.hidden
    hook = mm.handles.append

    def active():
        return mm.enabled

    # hidden dimension: where the residual stream is written
    if H is not None:
        if spec.post_norm:
            emb_norm = get_module(base, spec.embed_norm)

            def refresh(module, args):  # run the hidden mask once so its kept set is current before the norm reads it
                if active():
                    _apply_channels(H, args[0])

            hook(emb_norm.register_forward_pre_hook(refresh))
        else:
            for path in spec.embeddings:
                hook(get_module(base, path).register_forward_hook(
                    lambda m, a, out: _apply_channels(H, out) if active() else None))

    def norm_hook(gates: tuple, post: bool):
        def fn(module, args, out):
            if not active():
                return None
            x = args[0]
            if post and any(g is not None and g.hard_zero() for g in gates):
                return x  # a removed post-norm block is skipped entirely (CoFi): output = input
            if H is None:
                return None
            keep = H.kept_now
            if not bool(keep.all()):
                out = _norm_over(module, x, keep)
            if post:
                out = _apply_channels(H, out)
            return out
        return fn

    if H is not None:
        norms = [spec.embed_norm] if spec.post_norm else [spec.final_norm]
        for path in norms:
            hook(get_module(base, path).register_forward_hook(norm_hook((), spec.post_norm)))

    for lm, layer in zip(mm.layers, layers_mod):
        o, down = get_module(layer, spec.o), get_module(layer, spec.ffn_out)
        if lm.heads is not None:
            hook(o.register_forward_pre_hook(
                lambda m, a, mk=lm.heads: ((_apply(mk, a[0]),) + tuple(a[1:])) if active() else None))
        if lm.neurons is not None:
            hook(down.register_forward_pre_hook(
                lambda m, a, mk=lm.neurons: ((_apply_channels(mk, a[0]),) + tuple(a[1:])) if active() else None))

        def block_out(block: StructureMask | None, units: StructureMask | None):
            def fn(module, args, out):
                if not active():
                    return None
                if block is not None:
                    out = _apply(block, out, 1)
                if units is not None and units.hard_zero():
                    out = out * 0  # a block with no heads / neurons left is removed, biases included
                if H is not None and not spec.post_norm:
                    out = _apply_channels(H, out)
                return out
            return fn

        hook(o.register_forward_hook(block_out(lm.attention, lm.heads)))
        hook(down.register_forward_hook(block_out(lm.ffn, lm.neurons)))
        gates = ((lm.attention, lm.heads), (lm.ffn, lm.neurons))
        for path, g in zip(spec.norms, gates):
            if spec.post_norm or H is not None:
                hook(get_module(layer, path).register_forward_hook(norm_hook(g, spec.post_norm)))
