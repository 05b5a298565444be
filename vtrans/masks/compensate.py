"""Output compensation: after units are removed, refit the projection that reads them so that each block's output
stays what the unpruned block would give, on calibration text (closed form, no training).

A block's output projection (attention's `o`, the FFN's `ffn_out`) is linear in the units it reads: y = x W^T. Cut
to the kept units S, the removed units R take their share x_R W_R^T with them. Given the block's input, the kept
units compute exactly what they computed before, so the least-squares refit of W_S against the whole block needs
only the Gram matrix G = X^T X of every unit's output on calibration inputs:

    W_S'^T = W_S^T + (G_SS + lambda I)^-1 G_SR W_R^T

(the structured optimal-brain-surgeon update, as in ZipLM / SlimGPT; lambda = damp x mean(diag G_SS) as in
SparseGPT). The inputs are the pruned model's own, layer after layer (each refit sees what the refits before it
left), and the whole units are computed by the dense block's weights on those inputs. The reference weights W are
the dense projection's, its output in the pruned model's coordinates (kept hidden channels, the block and hidden
scales materialisation folds in); the kept units' own mask scales are replaced by the refit.

Family-generic through the adapter's module paths: the module owning the q/k/v projections and the one owning the
FFN input projections are run whole (a copy of the dense one, inputs cut to the kept hidden channels) on the inputs
the pruned model's module receives. Needs the dense layers whole in this process (not ZeRO-3 partitioned).

Stream correction (`correct` = gamma > 0, pre-norm families): the block-local refit reproduces each dense block on the
pruned model's inputs, so the error every earlier cut left in the residual stream stays. With gamma the target of a
block's output y becomes (1 - gamma) x W^T + gamma (t - h - b): t the dense model's own stream after the block (run on
its own inputs, in the pruned model's coordinates: kept hidden channels times the hidden mask's scale), h the pruned
model's stream before it, b the projection's bias; gamma = 1 asks the block to put the stream back where the dense
model has it. Its least squares with the same ridge towards the reference's kept columns W_S:

    W_S'^T = (G_SS + lambda I)^-1 ((1 - gamma) G_S: W^T + gamma X_S^T (t - h - b) + lambda W_S^T)

(gamma = 0 is the formula above). The target is the dense model as given: a variant that trained its weights no
longer holds it, so the job allows the correction only where the weights are the dense model's."""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from ..decision import Decision
from ..models import base_model, family_of, get_module
from .materialize import block_out_scale, query_channels

log = logging.getLogger("vtrans")


class _Caught(Exception):
    pass


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _weight_out_in(module: nn.Module, conv1d: bool) -> torch.Tensor:
    return module.weight.t() if conv1d else module.weight


def _set_weight(module: nn.Module, w_out_in: torch.Tensor, conv1d: bool) -> None:
    w = (w_out_in.t() if conv1d else w_out_in).contiguous().to(module.weight.dtype)
    module.weight.data.copy_(w)


def _cut_inputs(module: nn.Module, paths, rel: str, keep: torch.Tensor, conv1d: bool) -> None:
    """In a copy owning the projections `paths` (layer-relative; `rel` is the copy's own path), keep only the input
    channels `keep` (the kept hidden channels)."""
    for path in paths:
        lin = get_module(module, path[len(rel) + 1:] if rel else path)
        w = lin.weight.data
        w = w.index_select(0, keep) if conv1d else w.index_select(1, keep)
        lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        if hasattr(lin, "in_features"):
            lin.in_features = int(keep.numel())


def _reference(layer: nn.Module, path: str, in_paths, hidden: torch.Tensor, full_hidden: int, conv1d: bool):
    """A hook-free copy of the dense layer's module at `path` with its inputs cut to the kept hidden channels."""
    ref = copy.deepcopy(get_module(layer, path) if path else layer)
    for m in ref.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if hasattr(m, "_forward_hooks_with_kwargs"):
            m._forward_hooks_with_kwargs.clear()
        if hasattr(m, "_forward_pre_hooks_with_kwargs"):
            m._forward_pre_hooks_with_kwargs.clear()
    ref.eval().requires_grad_(False)
    if hidden.numel() < full_hidden:
        _cut_inputs(ref, in_paths, path, hidden, conv1d)
    return ref


class _Gram:
    """X^T X of the unit outputs read by a projection, accumulated in float64; with `add_cross`, X^T R too (R the
    stream correction's residual target, one row per token)."""

    def __init__(self):
        self.g, self.c, self.n = None, None, 0

    def add_cross(self, x: torch.Tensor, r: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        xr = x.t() @ r.detach().reshape(-1, r.shape[-1]).double()
        self.c = xr if self.c is None else self.c.add_(xr)

    def add(self, x: torch.Tensor) -> None:
        # one batch's product in the activations' own precision (a few thousand rows: float32 holds it to about
        # 1e-6), the running sum over batches in float64 (it grows with every batch); a float64 product costs
        # twice the time for no measurable change in the refit
        x = x.detach().reshape(-1, x.shape[-1])
        xx = (x.t() @ x).double() if x.dtype == torch.float32 else x.double().t() @ x.double()
        self.g = xx if self.g is None else self.g.add_(xx)
        self.n += x.shape[0]


def _refit(w_ref: torch.Tensor, g: torch.Tensor, kept: torch.Tensor, damp: float, cross: torch.Tensor | None = None,
           correct: float = 0.0) -> torch.Tensor:
    """W_S' [out, |S|] from the reference W [out, n] and the units' Gram matrix (see the module docstring); with
    `correct` > 0, `cross` [n, out] is X^T (t - h - b), the stream correction's term."""
    if correct > 0:
        return _refit_corrected(w_ref, g, kept, damp, cross, correct)
    n = w_ref.shape[1]
    removed = torch.ones(n, dtype=torch.bool)
    removed[kept] = False
    rem = removed.nonzero().flatten()
    w = w_ref.double()
    w_s = w.index_select(1, kept)
    if rem.numel() == 0 or kept.numel() == 0:
        return w_s
    g_ss = g.index_select(0, kept).index_select(1, kept)
    g_sr = g.index_select(0, kept).index_select(1, rem)
    lam = damp * g_ss.diagonal().mean().clamp_min(1e-12)
    g_ss = g_ss + lam * torch.eye(len(kept), dtype=g.dtype, device=g.device)
    delta = torch.linalg.solve(g_ss, g_sr @ w.index_select(1, rem).t())  # [|S|, out]
    return w_s + delta.t()


def _refit_corrected(w_ref, g, kept, damp, cross, correct: float) -> torch.Tensor:
    w = w_ref.double()
    w_s = w.index_select(1, kept)
    if kept.numel() == 0:
        return w_s
    g_s = g.index_select(0, kept)
    g_ss = g_s.index_select(1, kept)
    lam = damp * g_ss.diagonal().mean().clamp_min(1e-12)
    rhs = (1 - correct) * (g_s @ w.t()) + correct * cross.index_select(0, kept).to(g.dtype) + lam * w_s.t()
    g_ss = g_ss + lam * torch.eye(len(kept), dtype=g.dtype, device=g.device)
    return torch.linalg.solve(g_ss, rhs).t()


def mask_scales(mm) -> list[tuple]:
    """Per dense layer of a MaskedModel: its KV-head and neuron masks' scales (`mu`, kept and removed units alike;
    None where a structure is not masked), as `compensate` takes them."""
    def mu(mask):
        return None if mask is None else mask.mu.detach().float().cpu().clone()
    return [(mu(lm.heads), mu(lm.neurons)) for lm in mm.layers]


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}


@torch.no_grad()
def compensate(pruned: nn.Module, dense_model: nn.Module, decision: Decision, batches: list[dict],
               damp: float = 0.01, check=None, unit_scales=None, correct: float = 0.0, unmasked=None) -> dict:
    """Refit the attention and FFN output projections of `pruned` (materialised from `dense_model` by `decision`)
    in place on `batches` (model-input dicts) so each pruned block reproduces its dense block; returns what it did
    (blocks refitted, tokens, seconds). `dense_model` is only read (its mask hooks, if any, are not run). `check`,
    when given, is called before each layer (a job's stop check: it raises to end the refit there).

    `unit_scales` (one (kv-head scales, neuron scales) pair per dense layer, either None for 1; `mask_scales` reads
    them off a MaskedModel) makes the reference the masked block: every unit, kept or removed, at its mask's scale.
    The refit then reproduces the block the masks trained and its ridge pulls towards the materialised weights (the
    kept units at their scales), so that a large `damp` returns the materialised model. Without them the reference
    is the unmasked block and the kept units' scales are replaced (a large `damp` gives the cut at scale 1).

    `correct` (gamma in [0, 1], pre-norm families) blends in the stream correction of the module docstring: the
    dense model is run whole on the same batches, under `unmasked()` (a context in which its forward is the dense
    model's, e.g. MaskedModel.disabled; None: it carries no mask hooks)."""
    import time

    if not 0 <= correct <= 1:
        raise ValueError(f"correct={correct} must lie in [0, 1] (0: the block-local refit, 1: the full stream "
                         "correction)")
    t0 = time.perf_counter()
    fam = family_of(dense_model)
    dense_layers = get_module(base_model(dense_model, fam), fam.layers)
    layers = get_module(base_model(pruned, fam), fam.layers)
    kept_layers = decision.kept_layers()
    if len(layers) != len(kept_layers):
        raise ValueError(f"the pruned model has {len(layers)} layers, the decision keeps {len(kept_layers)}")
    device = next(pruned.parameters()).device
    hk, hmu = decision.hidden.index, decision.hidden.scale.float()
    full_hidden = decision.dense.hidden
    post = fam.post_norm
    dh, group = decision.dense.head_dim, decision.group
    attn_path, ffn_path = _parent(fam.qkv[0]), _parent(fam.ffn_in[0])

    with _inference(pruned), _inference(dense_model):  # eval mode, no KV cache; restored however it ends
        caught = _layer_inputs(pruned, layers[0], batches)
        tokens = sum(_hidden_of(a, k).shape[:-1].numel() for a, k in caught)
        teacher = _Teacher(dense_model, dense_layers, fam, batches, hk, hmu, unmasked) if correct > 0 else None

        def gram_of(layer, ref, path, proj_path, states, stream_path=None, targets=None, bias=None) -> _Gram:
            """Run `layer` on `states` up to its module at `path`, whose inputs go to `ref` instead; the input of ref's
            `proj_path` (or ref's output when the projection sits outside it) is added to the Gram matrix. The layer
            stops there: what follows the module (the pruned block itself, the rest of the layer) does not change the
            Gram matrix, and the layer runs whole once its projections are refitted. With `targets` (the dense model's
            stream after the block, one per batch), X^T (target - h - bias) is added too, h the pruned layer's stream
            where it enters its module at `stream_path` (the block's norm)."""
            gram = _Gram()
            inside = proj_path.startswith(path + ".") if path else True
            hooks, cur = [], {}

            def take(x):
                gram.add(x)
                if targets is not None:
                    r = targets[cur["k"]] - cur["h"]
                    gram.add_cross(x, r if bias is None else r - bias)

            if inside:
                proj = get_module(ref, proj_path[len(path) + 1:] if path else proj_path)
                hooks.append(proj.register_forward_pre_hook(lambda m, args: take(args[0])))
            if targets is not None:
                hooks.append(get_module(layer, stream_path).register_forward_pre_hook(
                    lambda m, args: cur.__setitem__("h", args[0])))

            def feed(module, args, kwargs):
                out = ref(*args, **kwargs)
                if not inside:
                    take(out[0] if isinstance(out, tuple) else out)
                raise _Caught

            hooks.append(get_module(layer, path).register_forward_pre_hook(feed, with_kwargs=True))
            try:
                for k, (args, kwargs) in enumerate(states):
                    cur["k"] = k
                    try:
                        layer(*args, **kwargs)
                    except _Caught:
                        pass
            finally:
                for h in hooks:
                    h.remove()
            return gram

        def bias_of(module):
            b = getattr(module, "bias", None)
            return None if b is None else b.detach()

        refitted = {"attention": 0, "ffn": 0}
        states = caught
        for j, (layer, i) in enumerate(zip(layers, kept_layers)):
            if check is not None:
                check()
            ld, dense_layer = decision.layers[i], dense_layers[i]
            a, f = ld.attention_scale, ld.ffn_scale
            heads, neurons = ld.heads, ld.neurons
            n_heads_dense = decision.dense.layers[i].kv_heads
            n_neurons_dense = decision.dense.layers[i].intermediate
            t_mid, t_out = teacher.layer(i) if teacher is not None else (None, None)
            if 0 < len(heads) < n_heads_dense:
                ref = _reference(dense_layer, attn_path, fam.qkv, hk, full_hidden, fam.conv1d).to(device)
                gram = gram_of(layer, ref, attn_path, fam.o, states, fam.norms[0], t_mid,
                               bias_of(get_module(layer, fam.o)))
                q_ch = query_channels(heads.index, group, dh)
                out_scale = block_out_scale(post, hmu, a, ld.attention_gain, hk)
                w_ref = _weight_out_in(get_module(dense_layer, fam.o), fam.conv1d).detach().float().cpu()
                w_ref = w_ref.index_select(0, hk) * out_scale.unsqueeze(1)
                # each KV head's scale on its query channels
                if unit_scales is not None and unit_scales[i][0] is not None:
                    w_ref = w_ref * unit_scales[i][0].float().cpu().repeat_interleave(group * dh).unsqueeze(0)
                w_new = _refit(w_ref, gram.g.cpu(), q_ch, damp, _cpu(gram.c), correct)
                _set_weight(get_module(layer, fam.o), w_new.float().to(device), fam.conv1d)
                refitted["attention"] += 1
                del ref, gram
            if 0 < len(neurons) < n_neurons_dense:
                ref = _reference(dense_layer, ffn_path, fam.ffn_in, hk, full_hidden, fam.conv1d).to(device)
                gram = gram_of(layer, ref, ffn_path, fam.ffn_out, states, fam.norms[1], t_out,
                               bias_of(get_module(layer, fam.ffn_out)))
                out_scale = block_out_scale(post, hmu, f, ld.ffn_gain, hk)
                w_ref = _weight_out_in(get_module(dense_layer, fam.ffn_out), fam.conv1d).detach().float().cpu()
                w_ref = w_ref.index_select(0, hk) * out_scale.unsqueeze(1)
                if unit_scales is not None and unit_scales[i][1] is not None:
                    w_ref = w_ref * unit_scales[i][1].float().cpu().unsqueeze(0)
                w_new = _refit(w_ref, gram.g.cpu(), neurons.index, damp, _cpu(gram.c), correct)
                _set_weight(get_module(layer, fam.ffn_out), w_new.float().to(device), fam.conv1d)
                refitted["ffn"] += 1
                del ref, gram
            if j + 1 < len(layers):
                states = _next_states(states, _run_layer(layer, states))
    seconds = time.perf_counter() - t0
    log.info("compensated %d attention and %d FFN output projections on %d tokens in %.1f s",
             refitted["attention"], refitted["ffn"], tokens, seconds)
    out = {"compensated_attention": refitted["attention"], "compensated_ffn": refitted["ffn"],
           "compensation_tokens": tokens, "compensation_s": seconds}
    if correct > 0:
        out["compensation_correct"] = correct
    return out


def _cpu(t):
    return None if t is None else t.cpu()


@contextlib.contextmanager
def _inference(model: nn.Module):
    """`model` in eval mode with its KV cache off, both restored on the way out."""
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)


def _layer_inputs(model: nn.Module, layer: nn.Module, batches: list[dict]) -> list[tuple[tuple, dict]]:
    """What `layer` receives (positional and keyword args, as the model passes them) when `model` runs each batch;
    the forward stops there."""
    device = next(model.parameters()).device
    caught: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Caught

    handle = layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**{k: v.to(device) for k, v in _model_inputs(b).items()})
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _run_layer(layer: nn.Module, states) -> list[torch.Tensor]:
    outs = []
    for args, kwargs in states:
        o = layer(*args, **kwargs)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return outs


def _next_states(states, hidden: list[torch.Tensor]):
    """`states` (a layer's inputs per batch) with the hidden states replaced: the next layer's inputs."""
    return [((h, *a[1:]), kw) if a else ((), {**kw, "hidden_states": h}) for (a, kw), h in zip(states, hidden)]


class _Teacher:
    """The dense model's residual stream, layer by layer, on the refit's batches: where the stream correction points
    each pruned block. Run once, forward only; `layer(i)` gives dense layer i's stream after its attention block and
    after the whole layer, one tensor per batch, in the pruned model's coordinates (kept hidden channels times the
    hidden mask's scale). Layers are asked for in increasing order; those the decision removes are run too."""

    def __init__(self, dense_model, dense_layers, fam, batches, hk, hmu, unmasked):
        if fam.post_norm:
            raise ValueError(f"the stream correction (correct > 0) needs a pre-norm family; {fam.name} normalises "
                             "after each block: use correct=0")
        self.layers, self.fam, self.hk, self.hmu = dense_layers, fam, hk, hmu
        self.unmasked = unmasked or contextlib.nullcontext
        self.at = 0
        with self.unmasked():
            self.states = _layer_inputs(dense_model, dense_layers[0], batches)

    def _pruned(self, h: torch.Tensor) -> torch.Tensor:
        return h.index_select(-1, self.hk.to(h.device)) * self.hmu.to(h.device, h.dtype)

    def layer(self, i: int):
        while self.at <= i:
            layer, mids = self.layers[self.at], []
            handle = get_module(layer, self.fam.norms[1]).register_forward_pre_hook(lambda m, a: mids.append(a[0]))
            try:
                with self.unmasked():
                    outs = _run_layer(layer, self.states)
            finally:
                handle.remove()
            self.states = _next_states(self.states, outs)
            self.at += 1
            if self.at > i:
                return [self._pruned(m) for m in mids], [self._pruned(o) for o in outs]
        raise ValueError(f"dense layer {i} was asked for after layer {self.at - 1}: layers go in increasing order")
