"""Materialisation: a `Decision` applied to a model's weights. Each kept unit's scale (its mask's mu) is folded into
the adjacent weights, pruned rows and columns are sliced away, removed blocks and layers dropped; the result is a
plain, smaller model of the family's pruned classes (per-layer counts in its config; reloads with `from_pretrained`).

One loop for every family: it reads the family adapter's module paths (vtrans.models), as the mask hooks do
(vtrans.masks.attach), so the materialised model computes what the hard-masked model computes.

Built for scale: the weights are read one layer at a time through `fetch` (a function giving a list of parameters'
full values: the parameters themselves, or an engine's ZeRO-3 gathering to rank 0), folded in float32 and stored in
the target dtype, and the pruned model is built with its parameters on the meta device and filled with the results
(`assign=True`): the peak is the pruned model plus about one dense layer. A process that does not build takes part
in the fetching (a collective under ZeRO-3), receives nothing and keeps nothing.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..decision import Decision
from ..models import base_model, family_of, get_module, has_module, head_kind
from .attach import MaskedModel


class _Linear:
    """A projection's weight as [out, in] whatever its storage (nn.Linear or GPT-2's Conv1D [in, out])."""

    def __init__(self, sd: dict, prefix: str, conv1d: bool):
        self.prefix, self.conv1d = prefix, conv1d
        w = sd[prefix + ".weight"]
        self.w = w.t() if conv1d else w
        self.b = sd.get(prefix + ".bias")

    def select_out(self, idx, scale=None):  # index_select makes new tensors: scaling them in place copies nothing
        self.w = self.w.index_select(0, idx)
        if self.b is not None:
            self.b = self.b.index_select(0, idx)
        if scale is not None:
            self.w.mul_(scale.to(self.w.dtype).unsqueeze(1))
            if self.b is not None:
                self.b.mul_(scale.to(self.b.dtype))
        return self

    def select_in(self, idx, scale=None):
        self.w = self.w.index_select(1, idx)
        if scale is not None:
            self.w.mul_(scale.to(self.w.dtype).unsqueeze(0))
        return self

    def store(self, out: dict) -> None:
        out[self.prefix + ".weight"] = (self.w.t() if self.conv1d else self.w).contiguous()
        if self.b is not None:
            out[self.prefix + ".bias"] = self.b.contiguous()


def _whole(params) -> list[torch.Tensor]:
    return [p.detach() for p in params]


def _persistent_buffers(model: nn.Module):
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def _read(module: nn.Module, fetch) -> dict | None:
    """The module's state (parameters and persistent buffers) in float32 on the CPU, fetched whole (None on a
    process that does not build)."""
    names, params = zip(*module.named_parameters()) if any(True for _ in module.parameters()) else ((), ())
    tensors = fetch(list(params))
    if tensors is None:
        return None
    state = {n: t.float().cpu() for n, t in zip(names, tensors)}
    for n, b in _persistent_buffers(module):
        state[n] = b.detach().float().cpu() if b.is_floating_point() else b.detach().cpu()
    return state


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (buffers stay real): a model skeleton that costs
    no memory, to be filled with `load_state_dict(..., assign=True)`."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@torch.no_grad()
def materialize(model, decision: Decision | None = None, dtype: torch.dtype | None = None, fetch=None,
                build: bool = True):
    """The pruned model that `decision` cuts from `model` (a model, or a MaskedModel whose masks' decision is the
    default), in `dtype` (default: the model's), on the CPU. The model is left unchanged. `fetch(params)` gives the
    full values of a list of parameters (default: the parameters themselves; under ZeRO-3 an engine's `fetch`,
    which gathers them to rank 0 only and gives None elsewhere); a process that does not build (`build=False`, or
    fetch gives None) takes part in the fetching and returns None. See the module docstring."""
    if isinstance(model, MaskedModel):  # masks are not part of the model's state
        decision = decision or model.decision()
        model = model.model
    if decision is None:
        raise ValueError("materialize needs a decision (or a MaskedModel holding one)")
    fam = family_of(model)
    fetch = fetch or _whole
    dense = decision.dense
    target_dtype = dtype or next(model.parameters()).dtype
    base = base_model(model, fam)
    base_prefix = next((b + "." for b in fam.base if hasattr(model, b)), "")
    layers = get_module(base, fam.layers)
    layers_prefix = base_prefix + fam.layers + "."
    post = fam.post_norm
    hk, hmu = decision.hidden.index, decision.hidden.scale.float()
    out: dict[str, torch.Tensor] = {}

    # --- everything outside the layers (embeddings, the embedding / final norm, task heads), one tensor at a time
    tied_lm = dense.head == "lm" and dense.tied_embeddings
    embeddings = {base_prefix + path + ".weight" for path in fam.embeddings}
    norm = base_prefix + (fam.embed_norm if post else fam.final_norm) + "."
    head_inputs = {f"{base_prefix if has_module(base, h) and base is not model else ''}{h}.weight"
                   for h in fam.head_inputs}

    def outside_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in embeddings:  # columns are hidden channels; pre-norm folds the hidden mask into the lookup
            w = t.index_select(1, hk)
            return w if post else w.mul_(hmu.unsqueeze(0))
        if name.startswith(norm):  # post-norm: the hidden mask multiplies the norm's output; a tied LM head
            w = t.index_select(0, hk)  # (scaled with the embedding) reads the final norm's output divided by it
            if post:
                return w.mul_(hmu)
            return w.div_(hmu) if tied_lm else w
        if name in head_inputs:
            return t.index_select(1, hk)
        return t.clone()  # untouched by the hidden dimension (classifier outputs, head biases): the pruned model's own

    for name, p in model.named_parameters():
        if name.startswith(layers_prefix):
            continue
        t = fetch([p])
        if t is None:
            build = False
        elif build:
            out[name] = outside_tensor(name, t[0].float().cpu())
        del t  # before the next fetch: a vocabulary matrix is larger than a layer
    if build:
        for name, b in _persistent_buffers(model):
            if not name.startswith(layers_prefix):
                out[name] = (b.detach().float() if b.is_floating_point() else b.detach()).to("cpu", copy=True)
        if tied_lm and "lm_head.weight" in out:
            out["lm_head.weight"] = out[base_prefix + fam.embeddings[0] + ".weight"]

    # --- the layers, one at a time
    new_index = 0
    for i, (layer, ld) in enumerate(zip(layers, decision.layers)):
        if not ld.present:
            continue  # the whole layer is gone
        sd = _read(layer, fetch)
        if sd is not None and build:
            dst = f"{layers_prefix}{new_index}."
            new_index += 1
            for k, v in _slice_layer(fam, sd, ld, dense, decision.group, hk, hmu).items():
                out[dst + k] = v
        del sd  # one dense layer at a time: not this one alive while the next is fetched

    if not build:
        return None
    kept_layers = decision.kept_layers()
    shape = decision.shape()
    config = fam.pruned_config_for(model.config, shape.hidden, [(l.heads, l.kv_heads, l.intermediate)
                                                                for l in shape.layers],
                                   kept_layers, pooler_dim=dense.pooler_dim)
    with parameters_on_meta():
        pruned = fam.pruned_models[head_kind(model)](config)
    state = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in out.items()}
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if dense.tied_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"materialisation produced a state dict that does not fit the pruned model: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    if dense.tied_embeddings and dense.head == "lm":
        pruned.tie_weights()
    leftover = [n for n, p in pruned.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"materialisation left parameters unfilled: {leftover[:8]}")
    return pruned.eval()


def query_channels(kv_idx: torch.Tensor, group: int, head_dim: int) -> torch.Tensor:
    """The q-projection output channels of the kept head units (each KV head with its `group` query heads)."""
    q_heads = (kv_idx.unsqueeze(1) * group + torch.arange(group)).flatten()
    return (q_heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def block_out_scale(post: bool, hmu: torch.Tensor, block_scale: float, gain: torch.Tensor | None = None,
                    hk: torch.Tensor | None = None) -> torch.Tensor:
    """What a block's output projection is scaled by per kept hidden channel: its block mask's mu, its output gain
    (`gain`, per dense hidden channel, read at the kept channels `hk`), and under pre-norm the hidden mask's mu too
    (post-norm folds that into the norm after the block)."""
    scale = torch.full_like(hmu, block_scale) if post else block_scale * hmu
    if gain is not None:
        scale = scale * gain.float().index_select(0, hk)
    return scale


def _slice_layer(fam, sd: dict, ld, dense, group: int, hk: torch.Tensor, hmu: torch.Tensor) -> dict:
    """One kept layer's tensors, sliced and with the kept units' scales folded in (keys relative to the layer)."""
    post = fam.post_norm
    dh = dense.head_dim
    layer_out: dict[str, torch.Tensor] = {}
    kv_idx, kv_mu = ld.heads.index, ld.heads.scale.float()
    n_idx, n_mu = ld.neurons.index, ld.neurons.scale.float()
    a, f = ld.attention_scale, ld.ffn_scale
    out_scale_attn = block_out_scale(post, hmu, a, ld.attention_gain, hk)
    out_scale_ffn = block_out_scale(post, hmu, f, ld.ffn_gain, hk)

    def norm(path: str, scale=None):
        for suffix in (".weight", ".bias"):
            t = sd.get(path + suffix)
            if t is not None:
                t = t.index_select(0, hk)
                layer_out[path + suffix] = t if scale is None else t.mul_(scale)

    if len(kv_idx):
        q_ch = query_channels(kv_idx, group, dh)
        kv_ch = (kv_idx.unsqueeze(1) * dh + torch.arange(dh)).flatten()
        head_scale = kv_mu.repeat_interleave(group * dh)
        if len(fam.qkv) == 3:
            for path, ch in zip(fam.qkv, (q_ch, kv_ch, kv_ch)):
                _Linear(sd, path, fam.conv1d).select_out(ch).select_in(hk).store(layer_out)
        else:  # fused q|k|v (gpt2)
            width = sd[fam.qkv[0] + ".weight"].shape[1 if fam.conv1d else 0] // 3
            ch = torch.cat([q_ch, kv_ch + width, kv_ch + 2 * width])
            _Linear(sd, fam.qkv[0], fam.conv1d).select_out(ch).select_in(hk).store(layer_out)
        _Linear(sd, fam.o, fam.conv1d).select_in(q_ch, head_scale).select_out(hk, out_scale_attn).store(layer_out)
        if post:
            norm(fam.norms[0], hmu)
    elif not post:  # zero-head attention keeps its (empty) projections and a zero output bias
        empty = torch.zeros(0, dtype=torch.long)
        for path in fam.qkv:
            _Linear(sd, path, fam.conv1d).select_out(empty).select_in(hk).store(layer_out)
        _Linear(sd, fam.o, fam.conv1d).select_in(empty).select_out(hk, torch.zeros_like(hmu)).store(layer_out)
    if len(n_idx) or not post:
        for path in fam.ffn_in:
            _Linear(sd, path, fam.conv1d).select_out(n_idx).select_in(hk).store(layer_out)
        scale = out_scale_ffn if len(n_idx) else torch.zeros_like(hmu)
        _Linear(sd, fam.ffn_out, fam.conv1d).select_in(n_idx, n_mu).select_out(hk, scale).store(layer_out)
        if post:
            norm(fam.norms[1], hmu)
    if not post:
        for path in fam.norms:
            norm(path)
    return layer_out
