"""A pruning decision as a value: which hidden channels, head units (KV heads, each with its query heads), FFN
neurons and blocks every dense layer keeps, and the scale each kept unit's gate multiplies by (its mask's `mu`).

Computed once from the masks (`Decision.from_masks`) and read by everything that counts, slices, probes or exports:
the budget fit, materialisation, accounting (`shape`), the probe and the saved `vtrans_decision.json` (`record`).
The rule "a unit is gone when its block is gone" lives here, in `layer_shape`, and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .shape import LayerShape, ModelShape

DECISION_FILE = "vtrans_decision.json"  # Decision.record() saved beside a pruned model


def layer_shape(kv_heads: int, attention_kept: bool, neurons: int, ffn_kept: bool, group: int) -> LayerShape:
    """A layer's kept counts: a removed block takes all its units with it (0 heads, 0 neurons)."""
    kv = kv_heads if attention_kept else 0
    inter = neurons if ffn_kept else 0
    return LayerShape(kv * group, kv, inter)


@dataclass
class Kept:
    """Kept units of one structure: their dense indices (sorted) and the scale each one's gate multiplies by."""
    index: torch.Tensor  # int64
    scale: torch.Tensor  # float32, one per kept unit

    @classmethod
    def all(cls, n: int) -> "Kept":
        return cls(torch.arange(n), torch.ones(n))

    @classmethod
    def none(cls) -> "Kept":
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0))

    def __len__(self) -> int:
        return int(self.index.numel())

    def tolist(self) -> list[int]:
        return [int(i) for i in self.index]


@dataclass
class LayerDecision:
    heads: Kept  # head units (KV heads); empty: the attention block is removed
    neurons: Kept  # empty: the FFN block is removed
    attention_scale: float = 1.0  # the block mask's mu (1 when unmasked)
    ffn_scale: float = 1.0
    attention_gain: torch.Tensor | None = None  # the block's output gain per dense hidden channel (mask.gains; None: 1)
    ffn_gain: torch.Tensor | None = None

    @property
    def present(self) -> bool:
        return bool(len(self.heads) or len(self.neurons))


@dataclass
class Decision:
    dense: ModelShape
    group: int  # query heads per head unit
    hidden: Kept
    layers: list[LayerDecision]  # one per dense layer
    fit: dict = field(default_factory=dict)  # how the budget was met: target, size, threshold_size, dense_size

    # --- reading it ---
    def shape(self) -> ModelShape:
        """The kept shape, removed layers dropped."""
        layers = [layer_shape(len(l.heads), True, len(l.neurons), True, self.group) for l in self.layers]
        return self.dense.with_counts(len(self.hidden), [l for l in layers if l.present])

    def layer_shapes(self) -> list[LayerShape]:
        """Kept counts of every dense layer (removed layers as zeros)."""
        return [layer_shape(len(l.heads), True, len(l.neurons), True, self.group) for l in self.layers]

    def kept_layers(self) -> list[int]:
        return [i for i, l in enumerate(self.layers) if l.present]

    def query_heads(self, i: int) -> list[int]:
        return [g * self.group + j for g in self.layers[i].heads.tolist() for j in range(self.group)]

    def record(self) -> dict:
        """JSON-ready: kept query heads, head units, neurons per dense layer and the kept hidden channels."""
        return {"group": self.group,
                "kept_heads": [self.query_heads(i) for i in range(len(self.layers))],
                "kept_kv_heads": [l.heads.tolist() for l in self.layers],
                "kept_neurons": [l.neurons.tolist() for l in self.layers],
                "kept_hidden": self.hidden.tolist()}

    # --- building it ---
    @classmethod
    def from_masks(cls, mm) -> "Decision":
        """The decision the masks of a MaskedModel hold (decided, else thresholded); unmasked structures keep all."""
        dense = mm.dense

        def kept(mask, n: int) -> Kept:
            if mask is None:
                return Kept.all(n)
            keep = mask.kept().detach().cpu()
            index = keep.nonzero().flatten()
            return Kept(index, mask.hard_values().detach().float().cpu().index_select(0, index))

        def block(mask) -> tuple[bool, float]:
            if mask is None:
                return True, 1.0
            return bool(mask.kept().all()), float(mask.hard_values()[0])

        def gain(g):
            return None if g is None else g.scale.detach().float().cpu().clone()

        layers = []
        for ls, lm in zip(dense.layers, mm.layers):
            heads, neurons = kept(lm.heads, ls.kv_heads), kept(lm.neurons, ls.intermediate)
            attn_kept, attn_scale = block(lm.attention)
            ffn_kept, ffn_scale = block(lm.ffn)
            counts = layer_shape(len(heads), attn_kept, len(neurons), ffn_kept, mm.group)
            layers.append(LayerDecision(heads if counts.kv_heads else Kept.none(),
                                        neurons if counts.intermediate else Kept.none(), attn_scale, ffn_scale,
                                        gain(lm.attention_gain), gain(lm.ffn_gain)))
        return cls(dense, mm.group, kept(mm.hidden, dense.hidden), layers)

    @classmethod
    def from_record(cls, record: dict, dense: ModelShape) -> "Decision":
        """A decision read back from `record()` (scales 1: a saved model already holds them folded in)."""
        n = len(dense.layers)
        group = int(record.get("group") or (dense.layers[0].heads // max(dense.layers[0].kv_heads, 1)))
        units = record.get("kept_kv_heads") or [sorted({h // group for h in layer}) for layer in record["kept_heads"]]
        if len(units) != n or len(record["kept_neurons"]) != n:
            raise ValueError(f"the decision lists {len(units)} layers; the dense model has {n}")

        def kept(indices) -> Kept:
            index = torch.tensor(sorted(int(i) for i in indices), dtype=torch.long)
            return Kept(index, torch.ones(index.numel()))

        layers = [LayerDecision(kept(h), kept(f)) for h, f in zip(units, record["kept_neurons"])]
        return cls(dense, group, kept(record["kept_hidden"]), layers)
