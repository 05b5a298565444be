"""Exact parameter and FLOP accounting of a `ModelShape`, dense or pruned.

Counts in the shape may be ints (exact sizes, checked against `numel` in the tests) or float tensors
(expected counts from soft masks: the same formulas then give a differentiable budget).
"Embeddings" are the token / position / token-type lookup tables and the LM output projection
(tied or not); everything else is a non-embedding parameter.
"""
from __future__ import annotations

import torch

from .shape import LayerShape, ModelShape


def _present(x) -> int:
    """1 for a kept unit count; soft counts are treated as present (the terms they gate are tiny)."""
    if isinstance(x, torch.Tensor):
        return 1
    return 1 if x else 0


def embedding_params(s: ModelShape):
    d = s.hidden
    n = s.vocab_size * d + s.max_positions * d + s.type_vocab * d
    if s.head == "lm" and not s.tied_embeddings:
        n = n + s.vocab_size * d
    return n


def layer_params(s: ModelShape, l: LayerShape):
    d, dh = s.hidden, s.head_dim
    H, K, I = l.heads, l.kv_heads, l.intermediate
    n_in = 2 if s.gated_mlp else 1
    qkv = d * H * dh + 2 * d * K * dh + s.qkv_bias * (H * dh + 2 * K * dh)
    o = H * dh * d
    ffn = (n_in + 1) * d * I + s.mlp_bias * n_in * I
    norm = s.norm_params * d
    if s.post_norm:  # a removed sub-block takes its projections, output bias and norm with it
        return (_present(H) * (qkv + o + s.o_bias * d + norm)
                + _present(I) * (ffn + s.mlp_bias * d + norm))
    # pre-norm: a present layer keeps both norms and both output biases (zero-head / zero-width blocks included)
    soft = isinstance(H, torch.Tensor) or isinstance(I, torch.Tensor)
    present = 1 if soft or H or I else 0
    return qkv + o + ffn + present * ((s.o_bias + s.mlp_bias) * d + 2 * norm)


def other_params(s: ModelShape):
    """The embedding (post-norm) or final (pre-norm) norm, a pooler, and the task head."""
    d, C, P = s.hidden, s.num_labels, s.pooler_dim
    n = s.norm_params * d
    if P:  # bert / roberta pooler or classification dense layer: its output width stays unpruned
        n += d * P + P
    if s.head == "cls":
        n += (P * C + C) if P else d * C
    elif s.head == "qa":
        n += d * 2 + 2
    return n


def param_count(s: ModelShape, embeddings: bool = True):
    n = other_params(s) + sum(layer_params(s, l) for l in s.layers)
    if embeddings:
        n = n + embedding_params(s)
    return n


def flops_per_token(s: ModelShape, seq_len: int):
    """Forward FLOPs per token for sequences of `seq_len` tokens.

    2 FLOPs per multiply-add of every matmul a token goes through (projections, FFN, the LM head),
    plus attention scores and the weighted sum: 4 * heads * head_dim * context, where context is
    seq_len for bidirectional encoders and (seq_len + 1) / 2 on average for causal decoders.
    Norms, softmax, activations and embedding lookups are not counted (they are O(hidden), not O(hidden^2)).
    A classification head runs once per sequence, so it is spread over the seq_len tokens.
    """
    d, dh = s.hidden, s.head_dim
    ctx = (seq_len + 1) / 2 if s.causal else seq_len
    total = 0
    for l in s.layers:
        H, K, I = l.heads, l.kv_heads, l.intermediate
        proj = d * H * dh + 2 * d * K * dh + H * dh * d
        ffn = (3 if s.gated_mlp else 2) * d * I
        total = total + 2 * (proj + ffn) + 4 * H * dh * ctx
    if s.head == "lm":
        total = total + 2 * s.vocab_size * d
    elif s.head == "cls":
        P = s.pooler_dim
        pooled = (d * P + P * s.num_labels) if P else d * s.num_labels
        total = total + 2 * pooled / seq_len
    elif s.head == "qa":
        total = total + 2 * d * 2
    return total


def model_numel(model: torch.nn.Module, embeddings: bool = True) -> int:
    """Counted parameters of a real model (tied tensors once), for checking the formulas."""
    seen, n = set(), 0
    emb = set()
    if not embeddings:
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                emb.add(id(m.weight))
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None:
            emb.add(id(out.weight))
    for p in model.parameters():
        if id(p) in seen or id(p) in emb:
            continue
        seen.add(id(p))
        n += getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 shard knows its full size
    return n
