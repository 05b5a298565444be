"""Attaching structure masks to a Hugging Face model from its family's adapter (vtrans.models).

Masks act through forward hooks on the modules they gate, so the model's own forward is unchanged and no mask state
is threaded through it. They are not submodules of the model: they are small, always float32 and whole on every rank
(an engine optimises them beside the model's weights and never casts or partitions them). Norms compute their
statistics over the kept hidden channels only, so a hard-masked model computes exactly what the materialised model
(vtrans.masks.materialize, reading the same adapter and the same `Decision`) computes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..decision import Decision
from ..models import Family, base_model, family_of, get_module, shape_of
from ..shape import STRUCTURES, LayerShape, ModelShape
from .vib import BlockGain, StructureMask


@dataclass
class MaskInit:
    method: str = "vib"
    mu: float = 1.0
    mu_std: float = 0.01
    log_sigma2: float = -9.0
    log_sigma2_std: float = 0.01
    k: float = 10.0
    gains: bool = False  # a trained per-channel output gain on every attention and FFN block (BlockGain)


@dataclass
class LayerMasks:
    heads: StructureMask | None = None
    attention: StructureMask | None = None
    neurons: StructureMask | None = None
    ffn: StructureMask | None = None
    attention_gain: BlockGain | None = None
    ffn_gain: BlockGain | None = None


@dataclass
class MaskedModel:
    """Handle on a model with masks attached: the masks, the dense shape, and the hooks."""
    model: nn.Module
    family: Family
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

    def scale_parameters(self) -> list[nn.Parameter]:
        """The trained masks' mu: each unit's scale, which materialising folds into the weights."""
        return [m.mu for m in self.masks().values() if m.mu.requires_grad]

    def gains(self) -> dict[str, BlockGain]:
        """The blocks' output gains (mask.gains), by name; empty without them."""
        out = {}
        for i, lm in enumerate(self.layers):
            for kind in ("attention_gain", "ffn_gain"):
                g = getattr(lm, kind)
                if g is not None:
                    out[f"layers.{i}.{kind}"] = g
        return out

    def gain_parameters(self) -> list[nn.Parameter]:
        return [g.scale for g in self.gains().values()]

    def to(self, device) -> "MaskedModel":
        """Move the masks and gains (not the model) to `device`; they keep float32."""
        for m in [*self.masks().values(), *self.gains().values()]:
            m.to(device=device)
        return self

    def decision(self) -> Decision:
        """What the masks keep now (their decision, else the threshold rule)."""
        return Decision.from_masks(self)

    def apply(self, decision: Decision) -> None:
        """Make the masks hold `decision` (kept units and, where masked, nothing else)."""
        def keep(mask, kept) -> None:
            if mask is not None:
                k = torch.zeros(mask.n, dtype=torch.bool)
                k[kept.index] = True
                mask.decide(k)

        keep(self.hidden, decision.hidden)
        for lm, ld in zip(self.layers, decision.layers):
            keep(lm.heads, ld.heads)
            keep(lm.neurons, ld.neurons)
            for block, units in ((lm.attention, ld.heads), (lm.ffn, ld.neurons)):
                if block is not None:
                    block.decide(torch.tensor([len(units) > 0]))

    @contextlib.contextmanager
    def disabled(self):
        """Run the unmasked (teacher) model with the same weights."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def detach(self) -> None:
        """Remove the hooks: the model computes as if it had never been masked."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

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
        return self.decision().shape()


def _soft_counts(dense: LayerShape, lm: LayerMasks, group: int):
    kv = lm.heads.last_soft.sum() if lm.heads is not None else torch.tensor(float(dense.kv_heads))
    if lm.attention is not None:
        kv = kv * lm.attention.last_soft.sum()
    inter = lm.neurons.last_soft.sum() if lm.neurons is not None else torch.tensor(float(dense.intermediate))
    if lm.ffn is not None:
        inter = inter * lm.ffn.last_soft.sum()
    return kv * group, kv, inter


# ---------------------------------------------------------------------------------------------------------
# hooks


def _units(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)


def _apply(mask: StructureMask, x: torch.Tensor, training: bool, n: int | None = None) -> torch.Tensor:
    """Multiply x by the mask with its units laid along the last dim (n units of x.shape[-1]/n channels); the mask
    samples (training) or applies its hard values as the gated module is in training or eval mode."""
    mask.training = training
    y, kl, soft = mask(_units(x, n or mask.n))
    mask.last_kl, mask.last_soft = kl, soft
    return y.reshape(x.shape)


def _apply_channels(mask: StructureMask, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Multiply x [..., n] channel-wise (one unit per channel)."""
    mask.training = training
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
    """Attach masks over the given structures (on the model's device, float32); returns the handle."""
    init = init or MaskInit()
    bad = sorted(set(structures) - set(STRUCTURES))
    if bad:
        raise ValueError(f"unknown mask structures {bad}; accepted: {list(STRUCTURES)}")
    dense = shape_of(model)
    family = family_of(model)
    layers_mod = get_module(base_model(model, family), family.layers)
    group = dense.layers[0].heads // dense.layers[0].kv_heads

    def new(kind, n):
        return StructureMask(kind, n, method=init.method, mu_init=init.mu, mu_std=init.mu_std,
                             log_sigma2_init=init.log_sigma2, log_sigma2_std=init.log_sigma2_std, k=init.k)

    hidden = new("hidden", dense.hidden) if "hidden" in structures else None
    layer_masks = []
    for ls in dense.layers:
        layer_masks.append(LayerMasks(
            heads=new("heads", ls.kv_heads) if "heads" in structures else None,
            attention=new("attention", 1) if "attention" in structures else None,
            neurons=new("neurons", ls.intermediate) if "neurons" in structures else None,
            ffn=new("ffn", 1) if "ffn" in structures else None,
            attention_gain=BlockGain("attention_gain", dense.hidden) if init.gains else None,
            ffn_gain=BlockGain("ffn_gain", dense.hidden) if init.gains else None))
    mm = MaskedModel(model, family, dense, hidden, layer_masks, group)
    device = next(model.parameters()).device
    mm.to(device if device.type != "meta" else "cpu")
    _register_hooks(mm, base_model(model, family), layers_mod)
    return mm


def _register_hooks(mm: MaskedModel, base: nn.Module, layers_mod) -> None:
    """Where each mask multiplies (the family's module paths); vtrans.masks.materialize folds and slices the same
    places, and a test checks that the two agree for every family."""
    fam, H = mm.family, mm.hidden
    hook = mm.handles.append

    def active():
        return mm.enabled

    # hidden dimension: where the residual stream is written
    if H is not None:
        if fam.post_norm:
            emb_norm = get_module(base, fam.embed_norm)

            def refresh(module, args):  # run the hidden mask once so its kept set is current before the norm reads it
                if active():
                    _apply_channels(H, args[0], module.training)

            hook(emb_norm.register_forward_pre_hook(refresh))
        else:
            for path in fam.embeddings:
                hook(get_module(base, path).register_forward_hook(
                    lambda m, a, out: _apply_channels(H, out, m.training) if active() else None))

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
                out = _apply_channels(H, out, module.training)
            return out
        return fn

    if H is not None:
        norms = [fam.embed_norm] if fam.post_norm else [fam.final_norm]
        for path in norms:
            hook(get_module(base, path).register_forward_hook(norm_hook((), fam.post_norm)))

    for lm, layer in zip(mm.layers, layers_mod):
        o, down = get_module(layer, fam.o), get_module(layer, fam.ffn_out)
        if lm.heads is not None:
            hook(o.register_forward_pre_hook(
                lambda m, a, mk=lm.heads: ((_apply(mk, a[0], m.training),) + tuple(a[1:])) if active() else None))
        if lm.neurons is not None:
            hook(down.register_forward_pre_hook(
                lambda m, a, mk=lm.neurons: ((_apply_channels(mk, a[0], m.training),) + tuple(a[1:]))
                if active() else None))

        def block_out(block: StructureMask | None, units: StructureMask | None, gain: BlockGain | None):
            def fn(module, args, out):
                if not active():
                    return None
                if block is not None:
                    out = _apply(block, out, module.training, 1)
                if gain is not None:
                    out = gain(out)
                if units is not None and units.hard_zero():
                    out = out * 0  # a block with no heads / neurons left is removed, biases included
                if H is not None and not fam.post_norm:
                    out = _apply_channels(H, out, module.training)
                return out
            return fn

        hook(o.register_forward_hook(block_out(lm.attention, lm.heads, lm.attention_gain)))
        hook(down.register_forward_hook(block_out(lm.ffn, lm.neurons, lm.ffn_gain)))
        gates = ((lm.attention, lm.heads), (lm.ffn, lm.neurons))
        for path, g in zip(fam.norms, gates):
            if fam.post_norm or H is not None:
                hook(get_module(layer, path).register_forward_hook(norm_hook(g, fam.post_norm)))
