"""The structural shape of a (possibly pruned) transformer: what accounting, budgets and materialisation share.

A `ModelShape` says how many hidden channels, heads, KV heads and FFN neurons each layer keeps, and carries the
family's traits that change the parameter count (biases, gated FFN, norm kind, post-norm sub-blocks), so the
accounting needs no family names. Counts may be ints (a real model) or float tensors (expected counts during mask
training): accounting only uses arithmetic on them, so the same formulas give exact sizes and differentiable budgets.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

STRUCTURES = ("hidden", "heads", "attention", "neurons", "ffn")  # what can carry a mask


@dataclass
class LayerShape:
    heads: Any  # query heads kept; 0 = attention block removed
    kv_heads: Any  # key/value heads kept (== heads without grouped-query attention)
    intermediate: Any  # FFN neurons kept; 0 = FFN block removed

    @property
    def present(self) -> bool:
        return bool(self.heads) or bool(self.intermediate)


@dataclass
class ModelShape:
    family: str  # the model family's name (for reports; accounting reads the traits below)
    vocab_size: int
    hidden: Any  # residual-stream channels kept
    head_dim: int
    layers: list[LayerShape]
    max_positions: int = 0  # learned absolute position embeddings; 0 for rotary
    type_vocab: int = 0  # token-type embeddings (bert/roberta)
    tied_embeddings: bool = True
    head: str = "lm"  # "lm" | "cls" | "qa" | "none"
    num_labels: int = 0
    pooler_dim: int = 0  # width of a pooler / classification dense layer (bert/roberta; not pruned); 0 = none
    causal: bool = True
    post_norm: bool = False  # norms after each block: a removed block takes its norm and biases with it
    gated_mlp: bool = False  # two FFN input projections (gate and up)
    norm_params: int = 1  # parameters per channel of a norm: 1 (RMSNorm) or 2 (LayerNorm)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(l) for l in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        d = dict(d)
        d["layers"] = [LayerShape(**l) for l in d["layers"]]
        return cls(**d)

    def with_counts(self, hidden, layers) -> "ModelShape":
        return replace(self, hidden=hidden, layers=list(layers))

    def summary(self) -> dict:
        """Per-layer counts as plain ints, for logs and saved configs."""
        return {
            "hidden": int(self.hidden),
            "layers": len(self.layers),
            "heads": [int(l.heads) for l in self.layers],
            "kv_heads": [int(l.kv_heads) for l in self.layers],
            "intermediate": [int(l.intermediate) for l in self.layers],
        }
