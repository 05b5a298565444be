"""Deciding which units are kept so the pruned model meets its budget exactly.

Units of every masked structure are ranked together by importance (VIB: -log_alpha). Starting from the
threshold rule (keep when log_alpha < 0), the least important kept units are removed until the size is at
or under the target, then the most important removed units that still fit are added back, so the final
size lands at or under the target and as close to it as the unit sizes allow. With `multiple_of` the hidden width and
the per-layer FFN widths are kept at multiples and the budget is refitted around them (see `decide`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..accounting import flops_per_token, param_count
from ..decision import Decision, layer_shape
from ..shape import LayerShape, ModelShape
from .attach import MaskedModel

KIND_CODES = {"hidden": 0, "heads": 1, "attention": 2, "neurons": 3, "ffn": 4}


@dataclass
class Budget:
    """What the pruned model must meet: `kind` is "params" (absolute), "params_ratio" or "flops"."""
    kind: str
    target: float
    embeddings: bool = True  # do embeddings count in the parameter budget
    seq_len: int = 512  # FLOPs per token are measured at this sequence length

    def size(self, shape: ModelShape):
        if self.kind == "flops":
            return flops_per_token(shape, self.seq_len)
        return param_count(shape, embeddings=self.embeddings)

    def target_size(self, dense: ModelShape) -> float:
        if self.kind == "params_ratio":
            return self.target * float(self.size(dense))
        if self.kind == "flops" and self.target < 1:
            return self.target * float(self.size(dense))  # a ratio of the dense FLOPs
        return float(self.target)


class _Units:
    """All mask units flattened: kind, layer, index, importance; and counts of a keep vector."""

    def __init__(self, mm: MaskedModel):
        self.mm, self.dense = mm, mm.dense
        kinds, layers, imp, allowed, self.slices = [], [], [], [], {}
        start = 0
        for name, m in mm.masks().items():
            n = m.n
            layer = -1 if name == "hidden" else int(name.split(".")[1])
            kinds.append(np.full(n, KIND_CODES[m.kind]))
            layers.append(np.full(n, layer))
            imp.append(m.importance().detach().float().cpu().numpy())
            allowed.append(m.decided.cpu().numpy() if bool(m.has_decision) else np.ones(n, dtype=bool))
            self.slices[name] = (start, start + n)
            start += n
        self.kind = np.concatenate(kinds)
        self.layer = np.concatenate(layers)
        self.importance = np.concatenate(imp)
        self.allowed = np.concatenate(allowed).astype(bool)  # not cut by an earlier decision
        self.n = start

    def counts(self, keep: np.ndarray) -> np.ndarray:
        """Kept units per (kind, layer): row = kind code, column = layer (hidden in column 0)."""
        L = len(self.dense.layers)
        c = np.zeros((5, L), dtype=np.int64)
        np.add.at(c, (self.kind[keep], np.maximum(self.layer[keep], 0)), 1)
        return c

    def shape_from_counts(self, c: np.ndarray) -> ModelShape:
        d, present = self.dense, self.mm.masks()
        hidden = int(c[0, 0]) if "hidden" in present else d.hidden
        layers = []
        for i, ls in enumerate(d.layers):
            masked = lambda kind: f"layers.{i}.{kind}" in present  # noqa: E731
            l = layer_shape(int(c[1, i]) if masked("heads") else ls.kv_heads, not masked("attention") or c[2, i] > 0,
                            int(c[3, i]) if masked("neurons") else ls.intermediate, not masked("ffn") or c[4, i] > 0,
                            self.mm.group)
            if l.present:
                layers.append(l)
        return d.with_counts(hidden, layers)

    def shape(self, keep: np.ndarray) -> ModelShape:
        return self.shape_from_counts(self.counts(keep))


def minimum_shape(mm: MaskedModel) -> ModelShape:
    """The smallest shape the masked structures can reach (one hidden channel is always kept)."""
    units = _Units(mm)
    keep = np.zeros(units.n, dtype=bool)
    if "hidden" in units.slices:
        keep[units.slices["hidden"][0]] = True
    return units.shape(keep)


def check_reachable(mm: MaskedModel, budget: Budget) -> None:
    target = budget.target_size(mm.dense)
    lo = float(budget.size(minimum_shape(mm)))
    hi = float(budget.size(mm.dense))
    if not target < hi:
        raise ValueError(f"budget target {budget.target} ({budget.kind}) = {target:.4g} is not below the dense "
                         f"size {hi:.4g}: nothing to prune")
    if target < lo:
        raise ValueError(
            f"budget target {budget.target} ({budget.kind}) = {target:.4g} is not reachable with the masked "
            f"structures {sorted({m.kind for m in mm.masks().values()})}: the smallest reachable size is "
            f"{lo:.4g} ({lo / hi:.1%} of dense). Mask more structures or raise the target.")


def decide(mm: MaskedModel, budget: Budget, use_threshold: bool = True, monotone: bool = False,
           multiple_of: int = 1) -> Decision:
    """Choose the kept units, store them in the masks, and return the Decision (`fit` says how the budget was met). With `monotone`, units cut by
    an earlier decision (iterative pruning) stay cut: they were trained without, so they cannot re-enter.
    `multiple_of` > 1 keeps the hidden channels and each layer's FFN neurons at a multiple of it (counts below it
    stay), so the pruned matrices keep shapes that GPU matrix units run efficiently: the hidden count goes to the
    nearest multiple and the other units are refitted to the budget around it, then each layer's neurons are rounded
    down (least important out) and the freed budget is refilled with whole chunks of neurons and single heads, most
    important first."""
    check_reachable(mm, budget)
    units = _Units(mm)
    target = budget.target_size(mm.dense)
    order = np.argsort(units.importance, kind="stable")  # least important first
    if use_threshold and all(m.method == "vib" for m in mm.masks().values()):
        keep = units.importance > 0
    else:
        keep = np.ones(units.n, dtype=bool)
    if monotone:
        keep &= units.allowed
    if "hidden" in units.slices and not keep[slice(*units.slices["hidden"])].any():
        keep[units.slices["hidden"][0] + int(np.argmax(units.importance[slice(*units.slices["hidden"])]))] = True
    threshold_size = float(budget.size(units.shape(keep)))
    fixed = np.zeros(units.n, dtype=bool)
    _fit(units, keep, fixed, order, budget, target, monotone)
    if multiple_of > 1:
        _fit_multiples(units, keep, fixed, order, budget, target, monotone, multiple_of)
    for name, m in mm.masks().items():
        a, b = units.slices[name]
        m.decide(torch.from_numpy(keep[a:b].copy()))
    decision = mm.decision()
    decision.fit = {"target": target, "size": float(budget.size(decision.shape())), "threshold_size": threshold_size,
                    "dense_size": float(budget.size(mm.dense))}
    return decision


def _fit(units: _Units, keep: np.ndarray, fixed: np.ndarray, order: np.ndarray, budget: Budget, target: float,
         monotone: bool) -> None:
    """Bring `keep` to the budget in place, leaving the `fixed` units as they are: remove the least important kept
    units until the size is at or under the target, then add back the most important removed units that fit."""
    size = lambda k: float(budget.size(units.shape(k)))  # noqa: E731
    # 1. remove the least important kept units until the budget is met (binary search on the prefix)
    if size(keep) > target:
        removable = [u for u in order if keep[u] and not fixed[u]]
        if "hidden" in units.slices:  # never remove the last hidden channel
            hs, he = units.slices["hidden"]
            best_hidden = max((u for u in removable if hs <= u < he), key=lambda u: units.importance[u], default=None)
            removable = [u for u in removable if u != best_hidden]
        lo, hi = 0, len(removable)
        while lo < hi:
            mid = (lo + hi) // 2
            k = keep.copy()
            k[removable[:mid]] = False
            if size(k) <= target:
                hi = mid
            else:
                lo = mid + 1
        keep[removable[:lo]] = False
    # 2. add back the most important removed units that still fit
    counts = units.counts(keep)
    current = size(keep)
    inner = {KIND_CODES["attention"]: KIND_CODES["heads"], KIND_CODES["ffn"]: KIND_CODES["neurons"]}
    for u in order[::-1]:
        if keep[u] or fixed[u] or (monotone and not units.allowed[u]):
            continue
        if target - current < 1e-4 * target:
            break
        idx = (units.kind[u], max(units.layer[u], 0))
        counts[idx] += 1
        s = float(budget.size(units.shape_from_counts(counts)))
        if current < s <= target:
            keep[u], current = True, s
            continue
        trimmed = []
        if s > target and units.kind[u] in inner:
            # a whole block re-enters with only as many of its heads / neurons as fit, least important out first
            sub = [v for v in order if keep[v] and units.kind[v] == inner[units.kind[u]]
                   and units.layer[v] == units.layer[u]]
            sub_idx = (inner[units.kind[u]], units.layer[u])
            while s > target and len(trimmed) < len(sub) - 1:
                trimmed.append(sub[len(trimmed)])
                counts[sub_idx] -= 1
                s = float(budget.size(units.shape_from_counts(counts)))
        if current < s <= target:
            keep[u], current = True, s
            keep[trimmed] = False
        else:
            counts[idx] -= 1
            if trimmed:
                counts[sub_idx] += len(trimmed)


def _fit_multiples(units: _Units, keep: np.ndarray, fixed: np.ndarray, order: np.ndarray, budget: Budget,
                   target: float, monotone: bool, m: int) -> None:
    """Hidden channels and per-layer neurons at multiples of m, the budget refitted around them (see decide)."""
    may_keep = units.allowed if monotone else np.ones(units.n, dtype=bool)
    ranked = lambda idx: sorted(idx, key=lambda u: -units.importance[u])  # noqa: E731  most important first
    if "hidden" in units.slices:  # the hidden width costs the most per unit (embeddings, every layer): round to the
        a, b = units.slices["hidden"]  # nearest multiple, then refit the other units to the budget around it
        h = int(keep[a:b].sum())
        fixed[a:b] = True
        if h > m and h % m:
            candidates = ranked([u for u in range(a, b) if may_keep[u]])
            down, up = h - h % m, h - h % m + m
            widths = [up, down] if (up - h < h - down and up <= len(candidates)) else [down]
            before = keep.copy()
            for width in widths:  # rounding up may not fit even with every other unit refitted: then down
                keep[:] = before
                keep[a:b] = False
                keep[candidates[:width]] = True
                _fit(units, keep, fixed, order, budget, target, monotone)
                if float(budget.size(units.shape(keep))) <= target:
                    break
        else:
            _fit(units, keep, fixed, order, budget, target, monotone)
    layers = {}  # layer -> its neuron units
    for name, (a, b) in units.slices.items():
        if name.endswith(".neurons"):
            kept = ranked([u for u in range(a, b) if keep[u]])
            if len(kept) > m and len(kept) % m:
                keep[kept[len(kept) - len(kept) % m:]] = False
            layers[int(name.split(".")[1])] = (a, b)
    # refill the freed budget: whole chunks of neurons (up to the layer's next multiple) and single heads, most
    # important first; blocks removed by the fit stay removed
    counts = units.counts(keep)
    current = float(budget.size(units.shape_from_counts(counts)))

    def block_kept(block: str, i: int) -> bool:
        return f"layers.{i}.{block}" not in units.slices or counts[KIND_CODES[block], i] > 0

    free_heads = [u for u in order[::-1] if units.kind[u] == KIND_CODES["heads"] and not keep[u] and may_keep[u]
                  and block_kept("attention", units.layer[u])]
    free_neurons = {i: ranked([u for u in range(a, b) if not keep[u] and may_keep[u]])
                    for i, (a, b) in layers.items() if block_kept("ffn", i)}
    while target - current >= 1e-4 * target:
        options = [(units.importance[u], [u], (KIND_CODES["heads"], units.layer[u])) for u in free_heads]
        for i, free in free_neurons.items():
            need = m - int(counts[KIND_CODES["neurons"], i]) % m  # up to the layer's next multiple
            if len(free) >= need:
                chunk = free[:need]
                options.append((float(np.mean(units.importance[chunk])), chunk, (KIND_CODES["neurons"], i)))
        for _, add, idx in sorted(options, key=lambda o: -o[0]):
            counts[idx] += len(add)
            s = float(budget.size(units.shape_from_counts(counts)))
            if s <= target:
                keep[add], current = True, s
                if idx[0] == KIND_CODES["heads"]:
                    free_heads.remove(add[0])
                else:
                    del free_neurons[idx[1]][:len(add)]
                break
            counts[idx] -= len(add)
        else:
            break


def uniform_conflicts(family, structures) -> str:
    """Why masking `structures` of a `family` model cannot give a uniform stock export ("" when it can)."""
    if family.explicit_head_dim:
        return ""
    extra = sorted(set(structures) - {"neurons", "ffn", "attention"})
    if not extra:
        return ""
    return (f"a uniform export of a {family.name} model can only prune FFN neurons (stock {family.name} configs derive "
            f"head_dim from hidden / heads); masked structures {extra} would need the vtrans classes: drop them from "
            "mask.structures or export the non-uniform model")


def decide_uniform(mm: MaskedModel, budget: Budget) -> Decision:
    """A uniform decision: every layer keeps the same number of heads and FFN neurons (no block or layer is
    removed), so the pruned model loads with the stock transformers classes. Counts shrink greedily, each
    step taking the move (one head unit per layer, one neuron per layer, or hidden channels) whose dropped
    units have the lowest mean importance, until the budget is met; then neurons are added back while they fit.
    Stock configs with an explicit head_dim (the LLaMA lineage) still need hidden % heads == 0, so the hidden size
    is rounded down to a multiple of the kept query heads; stock configs that derive head_dim = hidden / heads
    (BERT, GPT-2) allow only FFN neurons to shrink uniformly (see `uniform_conflicts`)."""
    check_reachable(mm, budget)
    d = mm.dense
    conflict = uniform_conflicts(mm.family, {m.kind for m in mm.masks().values()})
    if conflict:
        raise ValueError(conflict)
    L = len(d.layers)

    def ranked(kind):
        """Per layer, unit indices sorted most important first (None if the structure is not masked)."""
        out = []
        for lm in mm.layers:
            m = getattr(lm, kind)
            if m is None:
                return None
            out.append(torch.argsort(m.importance(), descending=True))
        return out

    heads_r, neurons_r = ranked("heads"), ranked("neurons")
    hidden_r = torch.argsort(mm.hidden.importance(), descending=True) if mm.hidden is not None else None
    kv, n, h = d.layers[0].kv_heads, d.layers[0].intermediate, d.hidden
    group = mm.group

    def shape(kv, n, h):
        return d.with_counts(h, [LayerShape(kv * group, kv, n) for _ in range(L)])

    def drop_score(kind, k):
        if kind == "heads":
            return float(sum(mm.layers[i].heads.importance()[heads_r[i][k - 1]] for i in range(L))) / L
        if kind == "neurons":
            return float(sum(mm.layers[i].neurons.importance()[neurons_r[i][k - 1]] for i in range(L))) / L
        return float(mm.hidden.importance()[hidden_r[k - 1]])

    target = budget.target_size(d)
    size = lambda kv, n, h: float(budget.size(shape(kv, n, h)))  # noqa: E731
    while size(kv, n, h) > target:
        moves = []
        if heads_r is not None and kv > 1:
            moves.append((drop_score("heads", kv), "heads"))
        if neurons_r is not None and n > 1:
            moves.append((drop_score("neurons", n), "neurons"))
        if hidden_r is not None and h > kv * group:
            moves.append((drop_score("hidden", h), "hidden"))
        if not moves:
            raise ValueError(f"budget target {target:.4g} is not reachable with a uniform shape")
        _, kind = min(moves)
        kv, n, h = kv - (kind == "heads"), n - (kind == "neurons"), h - (kind == "hidden")
    if hidden_r is not None:
        h -= h % (kv * group)
    while neurons_r is not None and n < d.layers[0].intermediate and size(kv, n + 1, h) <= target:
        n += 1
    with torch.no_grad():
        for i, lm in enumerate(mm.layers):
            for kind, ranks, k in (("heads", heads_r, kv), ("neurons", neurons_r, n)):
                m = getattr(lm, kind)
                if m is not None:
                    keep = torch.zeros(m.n, dtype=torch.bool)
                    keep[ranks[i][:k].cpu()] = True
                    m.decide(keep)
            for kind in ("attention", "ffn"):
                m = getattr(lm, kind)
                if m is not None:
                    m.decide(torch.ones(1, dtype=torch.bool))
        if mm.hidden is not None:
            keep = torch.zeros(mm.hidden.n, dtype=torch.bool)
            keep[hidden_r[:h].cpu()] = True
            mm.hidden.decide(keep)
    decision = mm.decision()
    decision.fit = {"target": target, "size": float(budget.size(decision.shape())), "threshold_size": float("nan"),
                    "dense_size": float(budget.size(d))}
    return decision
