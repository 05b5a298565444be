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
    if s.post_norm:  # bert / roberta: a removed sub-block has no parameters at all
        attn = _present(H) * ((3 * d * H * dh + 3 * H * dh) + (H * dh * d + d) + 2 * d)
        ffn = _present(I) * ((d * I + I) + (I * d + d) + 2 * d)
        return attn + ffn
    soft = isinstance(H, torch.Tensor) or isinstance(I, torch.Tensor)
    present = 1 if soft or H or I else 0
    if s.family == "gpt2":
        attn = (3 * d * H * dh + 3 * H * dh) + H * dh * d + present * d
        ffn = (d * I + I) + I * d + present * d
        norms = present * 4 * d
        return attn + ffn + norms
    # llama family: gated FFN, optional biases, RMSNorm without bias
    attn = d * H * dh + 2 * d * K * dh + H * dh * d
    if s.attention_bias:
        attn = attn + H * dh + 2 * K * dh + present * d
    ffn = 3 * d * I
    if s.mlp_bias:
        ffn = ffn + 2 * I + present * d
    return attn + ffn + present * 2 * d


def other_params(s: ModelShape):
    """Embedding / final norms and task heads."""
    d, C = s.hidden, s.num_labels
    n = 0
    if s.family == "llama":
        n += d  # final RMSNorm
    elif s.family == "gpt2":
        n += 2 * d  # ln_f
    else:
        n += 2 * d  # embedding LayerNorm
    if s.head == "cls":
        if s.family in ("llama", "gpt2"):
            n += d * C
        else:  # bert pooler + classifier, or roberta's dense + out_proj: the pooled width stays unpruned
            P = s.pooler_dim or d
            n += (d * P + P) + (P * C + C)
    elif s.head == "qa":
        n += d * 2 + 2
    elif s.head == "none" and s.post_norm:
        P = s.pooler_dim or d
        n += d * P + P  # pooler of the bare encoder
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
        kv = K if s.family == "llama" else H
        proj = d * H * dh + 2 * d * kv * dh + H * dh * d
        ffn = (3 if s.gated_mlp else 2) * d * I
        total = total + 2 * (proj + ffn) + 4 * H * dh * ctx
    if s.head == "lm":
        total = total + 2 * s.vocab_size * d
    elif s.head == "cls":
        P = s.pooler_dim or d
        pooled = (d * P + P * s.num_labels) if s.post_norm else d * s.num_labels
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
        n += p.numel()
    return n
