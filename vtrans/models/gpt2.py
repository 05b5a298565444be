"""GPT-2: pre-norm decoder with a fused q|k|v projection and Conv1D weights stored [in, out]: where its structures
live, and its pruned config and model classes, each layer sized by `config.vtrans_layers`. Copied into every saved
pruned GPT-2 checkpoint: imports only torch, transformers and `.common`."""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from .common import Family, PrunedConfigMixin, PrunedModelMixin, conv1d, layer_counts, mark_for_init, zero_head_step


def _scaling(config, head_dim: int, layer_idx: int) -> float:
    scaling = head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scaling /= float(layer_idx + 1)
    return scaling


class ZeroHeadGPT2Attention(GPT2Attention):
    """A GPT-2 attention block with no heads: c_attn has zero outputs, c_proj zero inputs; output is c_proj's bias."""

    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = 0
        self.head_dim = config.head_dim
        self.split_size = 0
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention = False
        self.layer_idx = layer_idx
        self.scaling = _scaling(config, self.head_dim, layer_idx)
        self.c_attn = conv1d(0, self.embed_dim)
        self.c_proj = conv1d(self.embed_dim, 0)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.is_causal = True

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("encoder_attention_mask", None)
        kwargs.pop("output_attentions", None)
        weights = zero_head_step(cache, self.layer_idx, hidden_states, kwargs)
        return self.resid_dropout(self.c_proj(hidden_states[..., :0])), weights


def resize_gpt2(model, config) -> None:
    hidden, head_dim = config.hidden_size, config.head_dim
    for idx, (block, (heads, _, intermediate)) in enumerate(zip(model.base_model.h, layer_counts(config))):
        if heads == 0:
            block.attn = ZeroHeadGPT2Attention(config, idx)
        else:
            attn = block.attn
            attn.num_heads = heads
            attn.head_dim = head_dim
            attn.split_size = heads * head_dim
            attn.scaling = _scaling(config, head_dim, idx)
            attn.c_attn = conv1d(3 * heads * head_dim, hidden)
            attn.c_proj = conv1d(hidden, heads * head_dim)
            mark_for_init(attn)
        block.mlp.c_fc = conv1d(intermediate, hidden)
        block.mlp.c_proj = conv1d(hidden, intermediate)
        mark_for_init(block.mlp)


class GPT2Family(Family):
    def intermediate(self, config) -> int:
        return config.n_inner if config.n_inner is not None else 4 * config.n_embd


# ----------------------------------------------------------------------------------------------------------------


@strict
class VTransGPT2Config(PrunedConfigMixin, GPT2Config):
    model_type = "vtrans_gpt2"

    head_dim: int | None = None
    vtrans_layers: list[dict] | None = None


class VTransGPT2Model(PrunedModelMixin, GPT2Model):
    config_class = VTransGPT2Config


class VTransGPT2LMHeadModel(PrunedModelMixin, GPT2LMHeadModel):
    config_class = VTransGPT2Config


class VTransGPT2ForSequenceClassification(PrunedModelMixin, GPT2ForSequenceClassification):
    config_class = VTransGPT2Config


GPT2 = GPT2Family(
    name="gpt2",
    model_types=("gpt2",),
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
    head_inputs=("lm_head", "score"),
    conv1d=True,
    hidden_field="n_embd",
    layers_field="n_layer",
    heads_field="n_head",
    intermediate_field="n_inner",
    positions_field="n_positions",
    shrunk_fields=("n_head", "n_inner"),
    pruned_config=VTransGPT2Config,
    pruned_models={"none": VTransGPT2Model, "lm": VTransGPT2LMHeadModel, "cls": VTransGPT2ForSequenceClassification},
    stock_config=GPT2Config,
    stock_models={"none": GPT2Model, "lm": GPT2LMHeadModel, "cls": GPT2ForSequenceClassification},
    resize=resize_gpt2,
)
