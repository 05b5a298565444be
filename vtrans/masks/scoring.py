"""One-shot importance scores for structure masks: the random, magnitude, activation (FLAP / Wanda-sp style)
and Taylor (LLM-Pruner style) baselines. `score_masks` fills every mask's `scores` buffer on one scale, so
`decide` ranks the units of all structures together and the baselines prune through the same path as VIB.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..accounting import param_count
from ..models import base_model, get_module, has_module
from ..objectives import lm_loss
from ..shape import LayerShape
from .attach import MaskedModel

METHODS = ("random", "magnitude", "activation", "taylor")
FISHER_LABELS = ("data", "model")  # taylor's labels: the text's next tokens | drawn from the model's own predictions
NEEDS_DATA = ("activation", "taylor")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LABEL_KEYS = ("labels", "start_positions", "end_positions")


def score_masks(mm: MaskedModel, method: str, batches: Iterable[dict] | None = None, seed: int = 0,
                procs=None, fisher_labels: str = "data") -> None:
    """Fill `scores` (higher = keep) of every mask of `mm` by `method`; the model and masks are otherwise left
    as they were. A head unit is one KV head with its query heads; a block is a layer's attention or FFN.

    Per-unit estimates:
    - random: uniform in [0, 1), drawn from `seed`.
    - magnitude: L2 norm of the weights the unit owns: a head's q/k/v rows (with biases) and o-projection
      columns; a neuron's FFN-input rows (with biases) and FFN-output column; a hidden channel's embedding
      columns, the input columns of every projection reading the residual stream (q/k/v, FFN input, task head)
      and the output rows (with biases) of every projection writing it (o, FFN output). Norm scales excluded.
    - activation: the damage removing the unit does to the residual stream, measured on the calibration tokens
      as relative squared perturbation summed over the points where the stream is read (pre-norm: every norm's
      input; post-norm: every norm, where it is rescaled). A head writes E||W_o[:, u] x_u||^2 (exact, from the
      unit's input covariance), a neuron E[x_i^2] ||W_out[:, i]||^2 (FLAP's fluctuation metric with the mean
      kept: the materialised model has no bias compensation to put a removed mean back), a block E||output||^2;
      a hidden channel takes away its share E[h_c^2] / E||h||^2 of the stream at every read point. Relative,
      because residual norms grow with depth: absolute output energy scores early layers as unimportant.
    - taylor: the loss change of setting a gate z on the unit from 1 to 0 (z multiplies exactly what the mask
      multiplies), to second order: 1/2 E_s[(dL_s/dz)^2], the empirical Fisher over calibration sequences s
      (LLM-Pruner's second-order option; the mask Fisher of Kwon et al. 2022, "A Fast Post-Training Pruning
      Framework for Transformers"). The first-order term |E dL/dz| is dropped: at a trained model it averages
      to ~0, and on tiny trained LMs it ranked units far worse than the Fisher term (no better than random on
      GPT-2). A block's estimate is its own gate's Fisher (the joint removal of its units). Loss: next-token
      cross-entropy for causal LMs; the model's own loss from `labels` (or QA positions) otherwise.
      `fisher_labels` (causal LMs): "data" takes the text's next tokens (the empirical Fisher: the damage to the
      next-token loss on that text); "model" draws each position's label from the model's own prediction there (the
      Fisher itself: 1/2 dz^2 F is the KL between the model before and after the gate moves, to second order, the
      damage a distillation objective measures; Kunstner et al. 2019 on the difference). One draw per position, seeded by
      `seed` and the sequence's tokens, so the scores do not depend on how sequences are shared among ranks.

    Normalisation (decide ranks every unit of every kind against each other): activation and taylor give
    damage in one unit across kinds, so a unit's score is its damage per parameter its removal saves (from the
    accounting, embeddings counted): the greedy knapsack order that decide's remove-then-add-back loop follows
    (Kwon et al. rank by importance per cost the same way). Random and magnitude scores are not in a common
    unit (a norm of 3 * hidden weights vs one of 4 * hidden * head_dim), so each unit kind (hidden, heads,
    neurons) is divided by its median over all layers: units at their kind's median tie and layers still compete
    within a kind (FLAP standardises per structure for the same reason; a median keeps scores positive and is
    not set by a few outlier channels). A block there scores the mean of its units: it goes when its average
    unit would.

    `batches`: dicts with input_ids and attention_mask (token_type_ids; labels for classifiers under taylor),
    needed by activation and taylor. Scores describe the model as its masks leave it: identity before a decision.
    With `procs` (vtrans.engine.Processes: several processes) each rank passes its own share of the calibration
    batches and the statistics are summed over the ranks: the scores of one process that saw them all.
    """
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}; accepted: {list(METHODS)}")
    if fisher_labels not in FISHER_LABELS:
        raise ValueError(f"unknown fisher_labels {fisher_labels!r}; accepted: {list(FISHER_LABELS)}")
    if fisher_labels == "model" and mm.dense.head != "lm":
        raise ValueError(f"fisher_labels='model' draws next tokens from a causal LM's predictions, but the model's "
                         f"head is {mm.dense.head!r}; accepted there: 'data'")
    if method in NEEDS_DATA and batches is None:
        raise ValueError(f"scoring method {method!r} needs calibration batches; methods without data: "
                         f"{[m for m in METHODS if m not in NEEDS_DATA]}")
    if not mm.masks():
        return
    geo = _Geometry(mm)
    if method == "random":
        est = _random(geo, seed)
    elif method == "magnitude":
        est = _magnitude(geo)
    else:
        with _scoring_state(mm):
            if method == "activation":
                est = _activation(geo, batches, procs)
            else:
                est = _taylor(geo, batches, procs, fisher_labels, seed)
    scores = _per_parameter(geo, est) if est.comparable else _per_kind_median(geo, est)
    scale = torch.cat([s.flatten() for s in scores.values()]).median()
    if scale > 0:  # one factor for all: the ranking is unchanged, the numbers readable
        scores = {name: s / scale for name, s in scores.items()}
    masks = mm.masks()
    for name, s in scores.items():
        masks[name].scores.copy_(torch.nan_to_num(s.float(), nan=0.0).to(masks[name].scores.device))


@dataclass
class _Estimates:
    """Per-unit estimates; blocks (one value per layer) are None where only their units are estimated."""
    hidden: torch.Tensor  # [hidden]
    heads: list[torch.Tensor]  # per layer, [kv heads]
    neurons: list[torch.Tensor]  # per layer, [intermediate]
    attention: list[torch.Tensor] | None
    ffn: list[torch.Tensor] | None
    comparable: bool  # one unit of damage across kinds


# ---------------------------------------------------------------------------------------------------------
# normalisation


def _per_parameter(geo: _Geometry, est: _Estimates) -> dict[str, torch.Tensor]:
    d = geo.dense
    dense_size = float(param_count(d))

    def saved(hidden: int | None = None, layer: int | None = None, kv: int | None = None,
              inter: int | None = None) -> float:
        layers = list(d.layers)
        if layer is not None:
            ls = layers[layer]
            kv = ls.kv_heads if kv is None else kv
            layers[layer] = LayerShape(kv * geo.mm.group, kv, ls.intermediate if inter is None else inter)
        shape = d.with_counts(d.hidden if hidden is None else hidden, layers)
        return max(dense_size - float(param_count(shape)), 1.0)

    out = {}
    for name, m in geo.mm.masks().items():
        if name == "hidden":
            out[name] = est.hidden / saved(hidden=d.hidden - 1)
            continue
        i, ls = _layer(name), d.layers[_layer(name)]
        if m.kind == "heads":
            out[name] = est.heads[i] / saved(layer=i, kv=ls.kv_heads - 1)
        elif m.kind == "neurons":
            out[name] = est.neurons[i] / saved(layer=i, inter=ls.intermediate - 1)
        elif m.kind == "attention":
            out[name] = est.attention[i].reshape(1) / saved(layer=i, kv=0)
        else:
            out[name] = est.ffn[i].reshape(1) / saved(layer=i, inter=0)
    return out


def _per_kind_median(geo: _Geometry, est: _Estimates) -> dict[str, torch.Tensor]:
    hidden = _by_median([est.hidden])[0]
    heads, neurons = _by_median(est.heads), _by_median(est.neurons)
    out = {}
    for name, m in geo.mm.masks().items():
        if name == "hidden":
            out[name] = hidden
            continue
        units = {"heads": heads, "attention": heads, "neurons": neurons, "ffn": neurons}[m.kind][_layer(name)]
        out[name] = units if m.kind in ("heads", "neurons") else units.mean().reshape(1)
    return out


def _by_median(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide a kind's scores (all layers together) by their median (the mean if that is 0)."""
    flat = torch.cat([p.flatten().float() for p in parts])
    scale = flat.median()
    if not scale > 0:
        scale = flat.mean()
    if not scale > 0:
        scale = torch.ones(())
    return [p.float() / scale for p in parts]


def _layer(name: str) -> int:
    return int(name.split(".")[1])


# ---------------------------------------------------------------------------------------------------------
# where each unit lives in the weights


def _out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whatever its storage (GPT-2's Conv1D keeps [in, out])."""
    w = module.weight.detach().float()
    return w if isinstance(module, (nn.Linear, nn.Embedding)) else w.t()


def _rows_sq(module: nn.Module) -> torch.Tensor:
    """Squared norm of each output row, its bias included."""
    sq = _out_in(module).pow(2).sum(1)
    b = getattr(module, "bias", None)
    return sq if b is None else sq + b.detach().float().pow(2)


class _Geometry:
    """The modules of each layer, and the rows / columns each head unit owns."""

    def __init__(self, mm: MaskedModel):
        self.mm, self.family, self.dense = mm, mm.family, mm.dense
        self.base = base_model(mm.model, mm.family)
        self.layers = list(get_module(self.base, mm.family.layers))
        self.embeddings = [get_module(self.base, p) for p in mm.family.embeddings if has_module(self.base, p)]
        prefix = next((b + "." for b in mm.family.base if hasattr(mm.model, b)), "")
        self.head_inputs = [mod for name, mod in mm.model.named_modules()
                            if (name[len(prefix):] if name.startswith(prefix) else name) in mm.family.head_inputs
                            and getattr(mod, "weight", None) is not None]
        self.device = next(mm.model.parameters()).device

    def qkv(self, i: int) -> list[nn.Module]:
        return [get_module(self.layers[i], p) for p in self.family.qkv]

    def o(self, i: int) -> nn.Module:
        return get_module(self.layers[i], self.family.o)

    def ffn_in(self, i: int) -> list[nn.Module]:
        return [get_module(self.layers[i], p) for p in self.family.ffn_in]

    def ffn_out(self, i: int) -> nn.Module:
        return get_module(self.layers[i], self.family.ffn_out)

    def q_channels(self, i: int) -> torch.Tensor:
        """[units, group * head_dim]: the o-projection input channels of each head unit."""
        ls = self.dense.layers[i]
        return torch.arange(ls.kv_heads * self.mm.group * self.dense.head_dim, device=self.device) \
            .reshape(ls.kv_heads, -1)

    def qkv_rows(self, i: int) -> list[torch.Tensor]:
        """Per q/k/v projection, [units, rows]: the output rows each head unit owns."""
        ls, dh = self.dense.layers[i], self.dense.head_dim
        q = self.q_channels(i)
        kv = torch.arange(ls.kv_heads * dh, device=self.device).reshape(ls.kv_heads, dh)
        if len(self.family.qkv) == 3:
            return [q, kv, kv]
        width = ls.heads * dh  # fused q|k|v (gpt2)
        return [torch.cat([q, kv + width, kv + 2 * width], 1)]

    def stream_reads(self) -> list[nn.Module]:
        """The norms where the residual stream is read, in order: pre-norm, each layer's two norms and the
        final norm (their inputs); post-norm, the embedding norm and each layer's two norms (their outputs).
        The attention of layer i writes just before read 2i + 1, its FFN just before read 2i + 2."""
        norms = [get_module(layer, p) for layer in self.layers for p in self.family.norms]
        if self.family.post_norm:
            return [get_module(self.base, self.family.embed_norm)] + norms
        return norms + [get_module(self.base, self.family.final_norm)]


# ---------------------------------------------------------------------------------------------------------
# random and magnitude


def _random(geo: _Geometry, seed: int) -> _Estimates:
    g = torch.Generator().manual_seed(seed)
    d = geo.dense
    return _Estimates(hidden=torch.rand(d.hidden, generator=g),
                      heads=[torch.rand(ls.kv_heads, generator=g) for ls in d.layers],
                      neurons=[torch.rand(ls.intermediate, generator=g) for ls in d.layers],
                      attention=None, ffn=None, comparable=False)


@torch.no_grad()
def _magnitude(geo: _Geometry) -> _Estimates:
    heads, neurons = [], []
    for i in range(len(geo.layers)):
        sq = _out_in(geo.o(i)).pow(2).sum(0)[geo.q_channels(i)].sum(1)
        for module, rows in zip(geo.qkv(i), geo.qkv_rows(i)):
            sq = sq + _rows_sq(module)[rows].sum(1)
        heads.append(sq.sqrt())
        sq = _out_in(geo.ffn_out(i)).pow(2).sum(0)
        for module in geo.ffn_in(i):
            sq = sq + _rows_sq(module)
        neurons.append(sq.sqrt())
    hidden, seen = torch.zeros(geo.dense.hidden, device=geo.device), set()
    readers = [m for i in range(len(geo.layers)) for m in geo.qkv(i) + geo.ffn_in(i)] + geo.head_inputs
    writers = [m for i in range(len(geo.layers)) for m in (geo.o(i), geo.ffn_out(i))]
    parts = [(m, lambda m: m.weight.detach().float().pow(2).sum(0)) for m in geo.embeddings]
    parts += [(m, lambda m: _out_in(m).pow(2).sum(0)) for m in readers] + [(m, _rows_sq) for m in writers]
    for module, columns_sq in parts:
        if id(module.weight) not in seen:  # a tied tensor (embedding = LM head) counts once
            seen.add(id(module.weight))
            hidden = hidden + columns_sq(module)
    return _Estimates(hidden.sqrt(), heads, neurons, None, None, comparable=False)


# ---------------------------------------------------------------------------------------------------------
# calibration passes


@contextlib.contextmanager
def _scoring_state(mm: MaskedModel):
    """Eval mode, masks on (identity until decided), no weight gradients; all restored afterwards."""
    model = mm.model
    training, enabled = model.training, mm.enabled
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    mm.enabled = True
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        mm.enabled = enabled
        model.train(training)


def _inputs(batch: dict, device, keys=MODEL_INPUTS) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in keys and v is not None}


class _Sums:
    """Running sums of per-token statistics over the calibration tokens (padding skipped), with counts."""

    def __init__(self):
        self.total: dict = {}
        self.count: dict = {}
        self.valid: torch.Tensor | None = None  # the current batch's real tokens, flattened

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.valid is not None and x.shape[0] == self.valid.numel():
            x = x[self.valid]
        return x

    def add(self, key, value: torch.Tensor, n: int) -> None:
        self.total[key] = value if key not in self.total else self.total[key] + value
        self.count[key] = self.count.get(key, 0) + n

    def mean(self, key) -> torch.Tensor:
        return self.total[key] / max(self.count[key], 1)


@torch.no_grad()
def _activation(geo: _Geometry, batches: Iterable[dict], procs=None) -> _Estimates:
    fam, sums, handles = geo.family, _Sums(), []
    n_layers, reads = len(geo.layers), geo.stream_reads()

    def unit_cov(key, units: int):  # sum over tokens of x_u x_u^T, for each head unit's channels x_u
        def fn(module, args):
            xu = sums.rows(args[0]).reshape(-1, units, args[0].shape[-1] // units)
            sums.add(key, torch.einsum("nuk,nul->ukl", xu, xu), xu.shape[0])
        return fn

    def energy(key, per_channel: bool, of_output: bool):  # sum over tokens of x^2 (per channel or in all)
        def fn(module, args, out=None):
            x = sums.rows(out if of_output else args[0])
            sums.add(key, x.pow(2).sum(0) if per_channel else x.pow(2).sum(), x.shape[0])
        return fn

    try:
        for i in range(n_layers):
            units = geo.dense.layers[i].kv_heads
            handles.append(geo.o(i).register_forward_pre_hook(unit_cov(("heads", i), units)))
            handles.append(geo.ffn_out(i).register_forward_pre_hook(energy(("neurons", i), True, False)))
            handles.append(geo.o(i).register_forward_hook(energy(("attention", i), False, True)))
            handles.append(geo.ffn_out(i).register_forward_hook(energy(("ffn", i), False, True)))
        for r, module in enumerate(reads):
            if fam.post_norm:
                handles.append(module.register_forward_hook(energy(("stream", r), True, True)))
                handles.append(module.register_forward_hook(energy(("norm_in", r), False, False)))
            else:
                handles.append(module.register_forward_pre_hook(energy(("stream", r), True, False)))
        n_batches = 0
        for batch in batches:
            inputs = _inputs(batch, geo.device)
            mask = inputs.get("attention_mask")
            sums.valid = mask.reshape(-1).bool() if mask is not None else None
            geo.mm.model(**inputs)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if procs is not None:  # every rank's sums and counts
        n_batches = int(procs.sum(torch.tensor(float(n_batches))))
        for key in sorted(sums.total, key=str):
            sums.total[key] = procs.sum(torch.as_tensor(sums.total[key], device=geo.device))
            sums.count[key] = int(procs.sum(torch.tensor(float(sums.count[key]))))
    if n_batches == 0:
        raise ValueError("scoring method 'activation' got no calibration batches")

    stream = [sums.mean(("stream", r)).clamp_min(0) for r in range(len(reads))]
    total = [max(float(s.sum()), 1e-12) for s in stream]

    def per_energy(r0: int) -> float:
        """Damage per unit of squared norm written just before read r0: the relative perturbation of the
        stream, summed over the reads it reaches. Post-norm: every norm rescales the stream, so the relative
        perturbation at the first norm carries on unchanged."""
        if fam.post_norm:
            return (len(reads) - r0) / max(float(sums.mean(("norm_in", r0))), 1e-12)
        return sum(1.0 / t for t in total[r0:])

    heads, neurons, attention, ffn = [], [], [], []
    for i in range(n_layers):
        wa, wf = per_energy(2 * i + 1), per_energy(2 * i + 2)
        wu = _out_in(geo.o(i))[:, geo.q_channels(i)]  # [hidden, units, k]
        gram = torch.einsum("duk,dul->ukl", wu, wu)
        heads.append((gram * sums.mean(("heads", i))).sum((1, 2)).clamp_min(0) * wa)
        attention.append(sums.mean(("attention", i)) * wa)
        col = _out_in(geo.ffn_out(i)).pow(2).sum(0)
        neurons.append(sums.mean(("neurons", i)) * col * wf)
        ffn.append(sums.mean(("ffn", i)) * wf)
    hidden = sum(s / t for s, t in zip(stream, total))
    return _Estimates(hidden, heads, neurons, attention, ffn, comparable=True)


def _sequences(batch: dict) -> list[dict]:
    """One dict per sequence of a batch (per-sequence gradients give the empirical Fisher)."""
    n = batch["input_ids"].shape[0]
    return [{k: (v[j:j + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
             for k, v in batch.items()} for j in range(n)]


def _loss(mm: MaskedModel, batch: dict, device, fisher_labels: str = "data", seed: int = 0) -> torch.Tensor | None:
    """The calibration loss of one sequence; None when it has nothing to predict. With fisher_labels="model" a causal
    LM's next tokens are drawn from its own (detached) predictions instead of read from the text."""
    inputs = _inputs(batch, device)
    if mm.dense.head == "lm":
        mask = inputs.get("attention_mask")
        if mask is not None and int(mask[:, 1:].sum()) == 0 or inputs["input_ids"].shape[1] < 2:
            return None
        logits = mm.model(**inputs).logits
        ids = inputs["input_ids"]
        if fisher_labels == "model":
            ids = torch.cat([ids[:, :1], model_labels(logits[:, :-1], ids, seed)], dim=1)
        return lm_loss(logits, ids, mask)
    labels = _inputs(batch, device, LABEL_KEYS)
    if not labels:
        raise ValueError(f"scoring method 'taylor' on a {mm.dense.head!r} model needs labels in the calibration "
                         f"batches (one of {list(LABEL_KEYS)})")
    return mm.model(**inputs, **labels).loss


def model_labels(logits: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per position drawn from softmax(logits) ([batch, positions, vocab] -> [batch, positions]), from a
    generator seeded by `seed` and the tokens `ids` (the same sequence draws the same labels on any rank)."""
    digest = hashlib.sha256(ids.detach().cpu().numpy().tobytes() + int(seed).to_bytes(8, "little", signed=True))
    g = torch.Generator(device=logits.device).manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)
    probs = torch.softmax(logits.detach().float(), dim=-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=g).reshape(logits.shape[:-1])


def _taylor(geo: _Geometry, batches: Iterable[dict], procs=None, fisher_labels: str = "data",
            seed: int = 0) -> _Estimates:
    mm, handles = geo.mm, []
    n_layers = len(geo.layers)

    def ones(n):
        return torch.ones(n, device=geo.device, requires_grad=True)

    gates = {"hidden": ones(geo.dense.hidden)}
    for i, ls in enumerate(geo.dense.layers):
        gates[("heads", i)], gates[("neurons", i)] = ones(ls.kv_heads), ones(ls.intermediate)
        gates[("attention", i)], gates[("ffn", i)] = ones(1), ones(1)
    fisher = {k: torch.zeros_like(z) for k, z in gates.items()}

    def gate_units(z):  # the projection's input [..., units * k]: unit u's channels times z[u]
        def fn(module, args):
            x = args[0]
            y = (x.reshape(*x.shape[:-1], z.numel(), -1) * z.to(x.dtype).unsqueeze(-1)).reshape(x.shape)
            return (y,) + tuple(args[1:])
        return fn

    def gate_output(z):
        return lambda module, args, out: out * z.to(out.dtype)

    def gate_hidden(z):  # the hidden mask's output [..., hidden, 1], wherever the mask multiplies the stream
        return lambda module, args, out: (out[0] * z.to(out[0].dtype).unsqueeze(-1),) + tuple(out[1:])

    try:
        for i in range(n_layers):
            handles.append(geo.o(i).register_forward_pre_hook(gate_units(gates[("heads", i)])))
            handles.append(geo.ffn_out(i).register_forward_pre_hook(gate_units(gates[("neurons", i)])))
            handles.append(geo.o(i).register_forward_hook(gate_output(gates[("attention", i)])))
            handles.append(geo.ffn_out(i).register_forward_hook(gate_output(gates[("ffn", i)])))
        if mm.hidden is not None:
            handles.append(mm.hidden.register_forward_hook(gate_hidden(gates["hidden"])))
        keys = list(gates)
        n_sequences = 0
        for batch in batches:
            for seq in _sequences(batch):
                loss = _loss(mm, seq, geo.device, fisher_labels, seed)
                if loss is None:
                    continue
                grads = torch.autograd.grad(loss, [gates[k] for k in keys], allow_unused=True)
                for k, g in zip(keys, grads):
                    if g is not None:
                        fisher[k] += g.detach().pow(2)
                n_sequences += 1
    finally:
        for h in handles:
            h.remove()
    if procs is not None:  # every rank's sums
        n_sequences = int(procs.sum(torch.tensor(float(n_sequences))))
        fisher = {k: procs.sum(v) for k, v in fisher.items()}
    if n_sequences == 0:
        raise ValueError("scoring method 'taylor' got no calibration sequences with a loss")
    damage = {k: 0.5 * v / n_sequences for k, v in fisher.items()}
    return _Estimates(damage["hidden"], [damage[("heads", i)] for i in range(n_layers)],
                      [damage[("neurons", i)] for i in range(n_layers)],
                      [damage[("attention", i)] for i in range(n_layers)],
                      [damage[("ffn", i)] for i in range(n_layers)], comparable=True)


def warm_start(mm: MaskedModel, spread: float) -> None:
    """Start VIB training from the one-shot ranking `score_masks` left in the masks' `scores`: each unit's
    log_sigma2 moves by spread * (1/2 - q), q its score's quantile among all units (0 = least important), so the
    initial log_alpha orders the units as the scorer does (spread wide) while staying where training can reorder
    them (Adam moves log_sigma2 and log mu^2 by about mask_lr per step). mu and the threshold are untouched:
    every unit starts kept. The scores are cleared afterwards (VIB ranks by -log_alpha)."""
    masks = [m for m in mm.masks().values() if m.method == "vib"]
    if not masks:
        raise ValueError("warm_start needs VIB masks (mask.method=vib)")
    flat = torch.cat([m.scores.detach().float().cpu().flatten() for m in masks])
    order = torch.argsort(flat, stable=True)
    q = torch.empty_like(flat)
    q[order] = torch.arange(flat.numel(), dtype=torch.float32) / max(flat.numel() - 1, 1)
    # ties share their mean quantile, so equal scores start equal
    _, inverse = torch.unique(flat, return_inverse=True)
    q = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, q)[inverse] / torch.bincount(inverse)[inverse]
    start = 0
    with torch.no_grad():
        for m in masks:
            part = q[start:start + m.n].to(m.log_sigma2.device, m.log_sigma2.dtype)
            m.log_sigma2.add_(spread * (0.5 - part))
            m.scores.zero_()
            start += m.n
