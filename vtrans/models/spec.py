"""Per-architecture tables: where heads, FFN neurons, the hidden dimension and the norms live in a
Hugging Face model, so masks attach and models materialise without editing transformers' code."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..shape import FAMILIES, LayerShape, ModelShape


@dataclass(frozen=True)
class ArchSpec:
    family: str
    base: tuple[str, ...]  # attribute of the task model holding the base model (first that exists)
    layers: str  # ModuleList of layers, relative to the base model
    embeddings: tuple[str, ...]  # lookup tables whose columns are the hidden dim (relative to base)
    embed_norm: str | None  # post-norm models: LayerNorm after the embedding sum
    final_norm: str | None  # pre-norm models: norm before the head
    # relative to a layer
    qkv: tuple[str, ...]  # separate q, k, v projections; or one fused projection (gpt2)
    o: str  # attention output projection (its input is the concatenated heads)
    ffn_in: tuple[str, ...]  # projections into the FFN neurons
    ffn_out: str  # FFN output projection (its input is the neurons)
    norms: tuple[str, ...]  # the layer's norms (pre-norm: before each block; post-norm: after each block)
    attn_container: str  # module that owns the head and attention-block masks
    ffn_container: str  # module that owns the neuron and FFN-block masks
    conv1d: bool = False  # weights stored [in, out] (GPT-2 Conv1D)

    @property
    def post_norm(self) -> bool:
        return self.family in ("bert", "roberta")


_BERT = dict(
    layers="encoder.layer",
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    embed_norm="embeddings.LayerNorm",
    final_norm=None,
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    o="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    attn_container="attention",
    ffn_container="intermediate",
)

SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        family="llama",
        base=("model",),
        layers="layers",
        embeddings=("embed_tokens",),
        embed_norm=None,
        final_norm="norm",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        o="self_attn.o_proj",
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
        norms=("input_layernorm", "post_attention_layernorm"),
        attn_container="self_attn",
        ffn_container="mlp",
    ),
    "bert": ArchSpec(family="bert", base=("bert",), **_BERT),
    "roberta": ArchSpec(family="roberta", base=("roberta",), **_BERT),
    "gpt2": ArchSpec(
        family="gpt2",
        base=("transformer",),
        layers="h",
        embeddings=("wte", "wpe"),
        embed_norm=None,
        final_norm="ln_f",
        qkv=("attn.c_attn",),
        o="attn.c_proj",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        norms=("ln_1", "ln_2"),
        attn_container="attn",
        ffn_container="mlp",
        conv1d=True,
    ),
}

# Hugging Face `model_type` -> family. LLaMA-lineage decoders share LlamaForCausalLM's module layout.
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "vtrans_llama": "llama",
    "bert": "bert",
    "vtrans_bert": "bert",
    "roberta": "roberta",
    "vtrans_roberta": "roberta",
    "gpt2": "gpt2",
    "vtrans_gpt2": "gpt2",
}


def family_of(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in MODEL_TYPES:
        raise ValueError(
            f"model family {mt!r} is not supported; supported Hugging Face model types: {sorted(MODEL_TYPES)}"
        )
    return MODEL_TYPES[mt]


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part) if not part.isdigit() else m[int(part)]
    return m


def base_model(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.Module:
    for name in spec.base:
        if hasattr(model, name):
            return getattr(model, name)
    return model  # already the base model


def head_kind(model: torch.nn.Module, spec: ArchSpec) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "lm"
    if name.endswith("ForSequenceClassification"):
        return "cls"
    if name.endswith("ForQuestionAnswering"):
        return "qa"
    if base_model(model, spec) is model:
        return "none"
    raise ValueError(f"model class {name} is not supported: use a base model, *ForCausalLM, "
                     "*ForSequenceClassification or *ForQuestionAnswering")


def shape_of(model: torch.nn.Module) -> ModelShape:
    """The shape of a (stock or vtrans-pruned) Hugging Face model, read from its config."""
    c = model.config
    fam = family_of(c)
    spec = SPECS[fam]
    head = head_kind(model, spec)
    if fam == "gpt2":
        hidden, n_layers, heads = c.n_embd, c.n_layer, c.n_head
        inter = c.n_inner or 4 * c.n_embd
        kv = heads
    else:
        hidden, n_layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
        inter = c.intermediate_size
        kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    per_layer = getattr(c, "vtrans_layers", None)
    if per_layer:
        layers = [LayerShape(l["heads"], l["kv_heads"], l["intermediate"]) for l in per_layer]
    else:
        layers = [LayerShape(heads, kv, inter) for _ in range(n_layers)]
    positions = {"llama": 0, "gpt2": getattr(c, "n_positions", 0)}.get(fam, getattr(c, "max_position_embeddings", 0))
    pooler = 0
    if fam in ("bert", "roberta") and head in ("cls", "none"):
        pooler = getattr(c, "vtrans_pooler_dim", None) or hidden
    return ModelShape(
        family=fam,
        vocab_size=c.vocab_size,
        hidden=hidden,
        head_dim=head_dim,
        layers=layers,
        max_positions=positions,
        type_vocab=getattr(c, "type_vocab_size", 0) if fam in ("bert", "roberta") else 0,
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        attention_bias=bool(getattr(c, "attention_bias", fam != "llama")),
        mlp_bias=bool(getattr(c, "mlp_bias", fam != "llama")),
        head=head,
        num_labels=c.num_labels if head == "cls" else 0,
        pooler_dim=pooler,
        causal=fam in ("llama", "gpt2"),
    )


assert set(SPECS) == set(FAMILIES)
