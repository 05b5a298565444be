"""The LLaMA family (LLaMA-2/3, SmolLM2, and the lineage that shares its module layout: see mistral.py, qwen2.py):
where its structures live, and its pruned config and model classes, each layer sized by `config.vtrans_layers`.
Copied into every saved pruned checkpoint of the lineage: imports only torch, transformers and `.common`."""

from huggingface_hub.dataclasses import strict  # transformers' own config decorator (a hard dependency of it)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaPreTrainedModel

from .common import Family, PrunedConfigMixin, PrunedModelMixin, layer_counts, linear, mark_for_init, zero_head_step

LINEAGE_PATHS = dict(
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
    head_inputs=("lm_head", "score", "qa_outputs"),
    grouped_kv=True,
    explicit_head_dim=True,
    norm_params=1,  # RMSNorm: a weight per channel
    kv_heads_field="num_key_value_heads",
    positions_field=None,  # rotary positions
    shrunk_fields=("num_attention_heads", "num_key_value_heads", "intermediate_size"),
)


class LineageFamily(Family):
    """A family with LLaMA's module layout; biases as the config says (`attention_bias`, `mlp_bias`)."""

    def biases(self, config) -> dict:
        attention = bool(getattr(config, "attention_bias", False))
        return {"qkv": attention, "o": attention, "mlp": bool(getattr(config, "mlp_bias", False))}


def zero_head_attention(stock_attention: type) -> type:
    """The family's attention class with no heads: q/k/v keep their names with zero output features and o_proj zero
    input features, so the layer (and its KV cache index) still exists; its output is o_proj's bias (zeros without
    a bias) at every position. A subclass of the stock attention, so transformers still records its (empty) weights
    for `output_attentions`."""

    class ZeroHeadAttention(stock_attention):
        def __init__(self, config, layer_idx: int, bias: dict):
            nn.Module.__init__(self)
            self.config = config
            self.layer_idx = layer_idx
            self.head_dim = config.head_dim
            self.num_heads = 0
            self.num_key_value_heads = 0
            self.num_key_value_groups = 1
            self.scaling = self.head_dim**-0.5
            self.attention_dropout = config.attention_dropout
            self.is_causal = True
            hidden = config.hidden_size
            self.q_proj = linear(hidden, 0, bias["q_proj"])
            self.k_proj = linear(hidden, 0, bias["k_proj"])
            self.v_proj = linear(hidden, 0, bias["v_proj"])
            self.o_proj = linear(0, hidden, bias["o_proj"])

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
            if cache is None:
                cache = kwargs.pop("past_key_values", None)
            weights = zero_head_step(cache, self.layer_idx, hidden_states, kwargs)
            return self.o_proj(hidden_states[..., :0]), weights

    ZeroHeadAttention.__name__ = ZeroHeadAttention.__qualname__ = f"VTransZeroHead{stock_attention.__name__}"
    return ZeroHeadAttention


def resize_lineage(zero_head_class: type):
    """The resize function of a LLaMA-lineage family: every projection keeps the bias the stock tree gave it."""

    def resize(model, config) -> None:
        hidden, head_dim = config.hidden_size, config.head_dim
        for idx, (layer, (heads, kv_heads, intermediate)) in enumerate(zip(model.base_model.layers,
                                                                           layer_counts(config))):
            attn = layer.self_attn
            bias = {n: getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            if heads == 0:
                layer.self_attn = zero_head_class(config, idx, bias)
            else:
                attn.head_dim = head_dim
                attn.scaling = head_dim**-0.5
                attn.num_heads = heads
                attn.num_key_value_heads = kv_heads
                attn.num_key_value_groups = heads // kv_heads
                attn.q_proj = linear(hidden, heads * head_dim, bias["q_proj"])
                attn.k_proj = linear(hidden, kv_heads * head_dim, bias["k_proj"])
                attn.v_proj = linear(hidden, kv_heads * head_dim, bias["v_proj"])
                attn.o_proj = linear(heads * head_dim, hidden, bias["o_proj"])
                mark_for_init(attn)
            mlp = layer.mlp
            mlp_bias = mlp.gate_proj.bias is not None
            mlp.intermediate_size = intermediate
            mlp.gate_proj = linear(hidden, intermediate, mlp_bias)
            mlp.up_proj = linear(hidden, intermediate, mlp_bias)
            mlp.down_proj = linear(intermediate, hidden, mlp_bias)
            mark_for_init(mlp)

    return resize


def classifier_build(base_class: type, pretrained_class: type):
    """`_build_stock` of a lineage sequence classifier: the stock __init__ builds its body through
    AutoModel.from_config, which would build the pruned body when the vtrans classes are registered; build the same
    stock tree directly instead."""

    def _build_stock(self, config):
        pretrained_class.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = base_class(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)

    return _build_stock


# ----------------------------------------------------------------------------------------------------------------


@strict
class VTransLlamaConfig(PrunedConfigMixin, LlamaConfig):
    model_type = "vtrans_llama"

    vtrans_layers: list[dict] | None = None


class VTransLlamaModel(PrunedModelMixin, LlamaModel):
    config_class = VTransLlamaConfig


class VTransLlamaForCausalLM(PrunedModelMixin, LlamaForCausalLM):
    config_class = VTransLlamaConfig


class VTransLlamaForSequenceClassification(PrunedModelMixin, LlamaForSequenceClassification):
    config_class = VTransLlamaConfig
    _build_stock = classifier_build(LlamaModel, LlamaPreTrainedModel)


LLAMA = LineageFamily(
    name="llama",
    model_types=("llama",),
    pruned_config=VTransLlamaConfig,
    pruned_models={"none": VTransLlamaModel, "lm": VTransLlamaForCausalLM, "cls": VTransLlamaForSequenceClassification},
    stock_config=LlamaConfig,
    stock_models={"none": LlamaModel, "lm": LlamaForCausalLM, "cls": LlamaForSequenceClassification},
    resize=resize_lineage(zero_head_attention(LlamaAttention)),
    **LINEAGE_PATHS,
)
