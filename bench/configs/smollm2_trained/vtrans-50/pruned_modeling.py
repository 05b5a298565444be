"""Config and model classes for structurally pruned llama/bert/roberta/gpt2 checkpoints, each layer sized by
`config.vtrans_layers`, plus Auto registration and `save_pruned`. Copied verbatim into every saved checkpoint,
so it imports only the standard library, torch and transformers (and its huggingface_hub dependency)."""

import contextlib
import json
import operator
import os
import shutil
import warnings

import torch
from huggingface_hub.dataclasses import strict  # transformers' own config decorator (a hard dependency of it)
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    RobertaConfig,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaModel,
)
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaPreTrainedModel
from transformers.pytorch_utils import Conv1D

LAYER_KEYS = ("heads", "kv_heads", "intermediate")

# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


def _as_count(value):
    """`value` as a plain non-negative int (numpy / 0-d tensor ints accepted), else None."""
    if isinstance(value, bool):
        return None
    try:
        count = operator.index(value)
    except TypeError:
        return None
    return count if count >= 0 else None


def check_vtrans_layers(layers, num_layers: int, grouped_kv: bool) -> list:
    """Return `layers` with plain-int counts; raise ValueError naming the offending entry if it is not a valid
    per-layer shape list (one {"heads", "kv_heads", "intermediate"} dict per layer)."""
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"vtrans_layers must be a list of dicts, got {type(layers).__name__}: {layers!r}")
    if len(layers) != num_layers:
        raise ValueError(f"vtrans_layers has {len(layers)} entries but num_hidden_layers is {num_layers}")
    checked = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ValueError(f"vtrans_layers[{i}] must be a dict, got {layer!r}")
        if set(layer) != set(LAYER_KEYS):
            raise ValueError(f"vtrans_layers[{i}] must have exactly the keys {LAYER_KEYS}, got {sorted(layer)}")
        counts = {key: _as_count(layer[key]) for key in LAYER_KEYS}
        for key, count in counts.items():
            if count is None:
                raise ValueError(f"vtrans_layers[{i}][{key!r}] must be a non-negative int, got {layer[key]!r}")
        heads, kv_heads = counts["heads"], counts["kv_heads"]
        if (heads == 0) != (kv_heads == 0):
            raise ValueError(
                f"vtrans_layers[{i}]: kv_heads={kv_heads} and heads={heads} must be zero together (heads=0 removes "
                "the attention block)"
            )
        if heads and heads % kv_heads:
            raise ValueError(f"vtrans_layers[{i}]: kv_heads={kv_heads} does not divide heads={heads}")
        if not grouped_kv and kv_heads != heads:
            raise ValueError(
                f"vtrans_layers[{i}]: kv_heads={kv_heads} must equal heads={heads} (no grouped-query attention)"
            )
        checked.append(counts)
    return checked


class _VTransConfigMixin:
    """Fills and checks `vtrans_layers` and `head_dim`; replaces the stock `hidden % heads` architecture check."""

    _vtrans_grouped_kv = False

    def _vtrans_full_counts(self) -> tuple:
        """(heads, kv_heads, intermediate) of an unpruned layer under this config's stock fields."""
        return self.num_attention_heads, self.num_attention_heads, self.intermediate_size

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.vtrans_layers is None:
            heads, kv_heads, intermediate = self._vtrans_full_counts()
            self.vtrans_layers = [
                {"heads": heads, "kv_heads": kv_heads, "intermediate": intermediate}
                for _ in range(self.num_hidden_layers)
            ]
        # Checked here too so that a bad shape raises a plain ValueError at construction (the strict-dataclass
        # validator below wraps its errors in StrictDataclassClassValidationError).
        self.validate_architecture()
        self.vtrans_layers = check_vtrans_layers(self.vtrans_layers, self.num_hidden_layers, self._vtrans_grouped_kv)

    def validate_architecture(self):
        """Part of `@strict` validation: per-layer shapes instead of the stock `hidden % heads == 0`."""
        if not _as_count(self.head_dim):
            raise ValueError(f"head_dim must be a positive int, got {self.head_dim!r}")
        if not _as_count(self.hidden_size):
            raise ValueError(f"hidden_size must be a positive int, got {self.hidden_size!r}")
        check_vtrans_layers(self.vtrans_layers, self.num_hidden_layers, self._vtrans_grouped_kv)


@strict
class VTransLlamaConfig(_VTransConfigMixin, LlamaConfig):
    model_type = "vtrans_llama"
    _vtrans_grouped_kv = True

    vtrans_layers: list[dict] | None = None

    def _vtrans_full_counts(self) -> tuple:
        return self.num_attention_heads, self.num_key_value_heads, self.intermediate_size


@strict
class VTransBertConfig(_VTransConfigMixin, BertConfig):
    model_type = "vtrans_bert"

    head_dim: int | None = None
    vtrans_layers: list[dict] | None = None
    vtrans_pooler_dim: int | None = None  # width of the pooler / classification dense layer (kept when hidden is pruned)


@strict
class VTransRobertaConfig(_VTransConfigMixin, RobertaConfig):
    model_type = "vtrans_roberta"

    head_dim: int | None = None
    vtrans_layers: list[dict] | None = None
    vtrans_pooler_dim: int | None = None  # width of the pooler / classification dense layer (kept when hidden is pruned)


@strict
class VTransGPT2Config(_VTransConfigMixin, GPT2Config):
    model_type = "vtrans_gpt2"

    head_dim: int | None = None
    vtrans_layers: list[dict] | None = None

    def _vtrans_full_counts(self) -> tuple:
        intermediate = self.n_inner if self.n_inner is not None else 4 * self.n_embd
        return self.n_head, self.n_head, intermediate


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_empty_init():
    """nn.Linear's kaiming init warns on zero-element weights; empty projections are intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    with _quiet_empty_init():
        return nn.Linear(in_features, out_features, bias=bias)


class VTransConv1D(Conv1D):
    """GPT-2's Conv1D, also for zero input features (the stock `x.view(-1, 0)` is ambiguous)."""

    def forward(self, x):
        size_out = x.shape[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.reshape(x.shape[:-1].numel(), self.nx), self.weight)
        return x.view(size_out)


def _conv1d(nf: int, nx: int) -> Conv1D:
    return Conv1D(nf, nx) if nx else VTransConv1D(nf, nx)


def _zero_head_step(cache, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Advance a zero-head layer's KV cache entry (if any) by this step's tokens; return its (empty) attention weights.

    The cache entry holds one zero per token, shape (batch, 1, tokens, 1), not an empty-head tensor: a DynamicLayer
    whose keys have no elements reports `get_seq_length() == 0`, and `cache.get_seq_length()` reads layer 0, so an
    empty entry there would shift the positions of every later generation step.
    The weights have shape (batch, 0, tokens, key_length), so `output_attentions` still yields one entry per layer.
    """
    batch, tokens = hidden_states.shape[0], hidden_states.shape[1]
    key_length = tokens
    if cache is not None:
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        placeholder = hidden_states.new_zeros(batch, 1, tokens, 1)
        keys, _ = cache.update(placeholder, placeholder, layer_idx, kwargs=kwargs)
        key_length = keys.shape[-2]
    return hidden_states.new_zeros(batch, 0, tokens, key_length)


class VTransZeroHeadLlamaAttention(LlamaAttention):
    """A llama attention block with no heads.

    q/k/v keep their names with zero output features and o_proj zero input features, so the layer (and its KV
    cache index) still exists; its output is o_proj's bias (zeros without attention bias) at every position.
    """

    def __init__(self, config, layer_idx: int):
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
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = _linear(hidden, 0, bias)
        self.k_proj = _linear(hidden, 0, bias)
        self.v_proj = _linear(hidden, 0, bias)
        self.o_proj = _linear(0, hidden, bias)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        weights = _zero_head_step(cache, self.layer_idx, hidden_states, kwargs)
        return self.o_proj(hidden_states[..., :0]), weights


class VTransZeroHeadGPT2Attention(GPT2Attention):
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
        self.scaling = _gpt2_scaling(config, self.head_dim, layer_idx)
        self.c_attn = _conv1d(0, self.embed_dim)
        self.c_proj = _conv1d(self.embed_dim, 0)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.is_causal = True

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("encoder_attention_mask", None)
        kwargs.pop("output_attentions", None)
        weights = _zero_head_step(cache, self.layer_idx, hidden_states, kwargs)
        return self.resid_dropout(self.c_proj(hidden_states[..., :0])), weights


class VTransSkippedAttention(nn.Module):
    """Stands in for a removed post-norm (bert/roberta) attention sub-block: returns its input unchanged.

    Same calling convention as BertAttention: `(hidden_states, attention_mask, ..., cache=...) -> (output, weights)`.
    A decoder cache still advances (see `_zero_head_step`) so the layer's cache index stays valid.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is not None:
            _zero_head_step(cache, self.layer_idx, hidden_states, kwargs)
        return hidden_states, None


class VTransSkippedIntermediate(nn.Module):
    """Stands in for a removed post-norm FFN's first half: passes its input through."""

    def forward(self, hidden_states):
        return hidden_states


class VTransSkippedOutput(nn.Module):
    """Stands in for a removed post-norm FFN's second half (dense + residual + LayerNorm): returns the residual."""

    def forward(self, hidden_states, input_tensor):
        return input_tensor


def _gpt2_scaling(config, head_dim: int, layer_idx: int) -> float:
    scaling = head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scaling /= float(layer_idx + 1)
    return scaling


def _layer_counts(config) -> list:
    return [(l["heads"], l["kv_heads"], l["intermediate"]) for l in config.vtrans_layers]


def _mark_for_init(*modules) -> None:
    """Let the next post_init() run the model's _init_weights on modules whose children were replaced."""
    for module in modules:
        module._is_hf_initialized = False


# ----------------------------------------------------------------------------------------------------------------
# Per-family resizing of a freshly built stock module tree
# ----------------------------------------------------------------------------------------------------------------


def _resize_llama(base, config) -> None:
    hidden, head_dim = config.hidden_size, config.head_dim
    attn_bias, mlp_bias = config.attention_bias, config.mlp_bias
    for idx, (layer, (heads, kv_heads, intermediate)) in enumerate(zip(base.layers, _layer_counts(config))):
        if heads == 0:
            layer.self_attn = VTransZeroHeadLlamaAttention(config, idx)
        else:
            attn = layer.self_attn
            attn.head_dim = head_dim
            attn.scaling = head_dim**-0.5
            attn.num_heads = heads
            attn.num_key_value_heads = kv_heads
            attn.num_key_value_groups = heads // kv_heads
            attn.q_proj = _linear(hidden, heads * head_dim, attn_bias)
            attn.k_proj = _linear(hidden, kv_heads * head_dim, attn_bias)
            attn.v_proj = _linear(hidden, kv_heads * head_dim, attn_bias)
            attn.o_proj = _linear(heads * head_dim, hidden, attn_bias)
            _mark_for_init(attn)
        mlp = layer.mlp
        mlp.intermediate_size = intermediate
        mlp.gate_proj = _linear(hidden, intermediate, mlp_bias)
        mlp.up_proj = _linear(hidden, intermediate, mlp_bias)
        mlp.down_proj = _linear(intermediate, hidden, mlp_bias)
        _mark_for_init(mlp)


def _resize_post_norm(base, config) -> None:
    hidden, head_dim = config.hidden_size, config.head_dim
    for idx, (layer, (heads, _, intermediate)) in enumerate(zip(base.encoder.layer, _layer_counts(config))):
        if heads == 0:
            layer.attention = VTransSkippedAttention(idx)
        else:
            attn = layer.attention.self
            attn.num_attention_heads = heads
            attn.attention_head_size = head_dim
            attn.all_head_size = heads * head_dim
            attn.scaling = head_dim**-0.5
            attn.query = _linear(hidden, heads * head_dim, True)
            attn.key = _linear(hidden, heads * head_dim, True)
            attn.value = _linear(hidden, heads * head_dim, True)
            layer.attention.output.dense = _linear(heads * head_dim, hidden, True)
            _mark_for_init(attn, layer.attention.output)
        if intermediate == 0:
            layer.intermediate = VTransSkippedIntermediate()
            layer.output = VTransSkippedOutput()
        else:
            layer.intermediate.dense = _linear(hidden, intermediate, True)
            layer.output.dense = _linear(intermediate, hidden, True)
            _mark_for_init(layer.intermediate, layer.output)


def _resize_gpt2(base, config) -> None:
    hidden, head_dim = config.hidden_size, config.head_dim
    for idx, (block, (heads, _, intermediate)) in enumerate(zip(base.h, _layer_counts(config))):
        if heads == 0:
            block.attn = VTransZeroHeadGPT2Attention(config, idx)
        else:
            attn = block.attn
            attn.num_heads = heads
            attn.head_dim = head_dim
            attn.split_size = heads * head_dim
            attn.scaling = _gpt2_scaling(config, head_dim, idx)
            attn.c_attn = _conv1d(3 * heads * head_dim, hidden)
            attn.c_proj = _conv1d(hidden, heads * head_dim)
            _mark_for_init(attn)
        block.mlp.c_fc = _conv1d(intermediate, hidden)
        block.mlp.c_proj = _conv1d(hidden, intermediate)
        _mark_for_init(block.mlp)


def _resize_pooled_heads(model, config) -> None:
    """bert/roberta: the pooler (and classification dense layer) keep their unpruned output width."""
    width = getattr(config, "vtrans_pooler_dim", None)
    if not width:
        return
    hidden = config.hidden_size
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        pooler.dense = _linear(hidden, width, True)
        _mark_for_init(pooler)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):  # bert: classifier reads the pooled output
        model.classifier = _linear(width, classifier.out_features, True)
        _mark_for_init(model)
    elif classifier is not None and hasattr(classifier, "out_proj"):  # roberta classification head
        classifier.dense = _linear(hidden, width, True)
        classifier.out_proj = _linear(width, classifier.out_proj.out_features, True)
        _mark_for_init(classifier)


# family -> (config fields shrunk to 1 while the stock tree is built, resize function)
_FAMILY_SPECS = {
    "llama": (("num_attention_heads", "num_key_value_heads", "intermediate_size"), _resize_llama),
    "bert": (("num_attention_heads", "intermediate_size"), _resize_post_norm),
    "roberta": (("num_attention_heads", "intermediate_size"), _resize_post_norm),
    "gpt2": (("n_head", "n_inner"), _resize_gpt2),
}
_FAMILY_OF_MODEL_TYPE = {f"vtrans_{family}": family for family in _FAMILY_SPECS}


def _family(config) -> str:
    try:
        return _FAMILY_OF_MODEL_TYPE[config.model_type]
    except KeyError:
        raise TypeError(
            f"not a vtrans pruned config: model_type {config.model_type!r} is none of {sorted(_FAMILY_OF_MODEL_TYPE)}"
        ) from None


@contextlib.contextmanager
def _shrunk_build(config, fields):
    """Build the stock tree with 1 head / 1 FFN neuron per layer (cheap, and passes the stock `hidden % heads`
    checks); the layers are resized to their real counts right after. The config is restored on exit."""
    saved = {name: getattr(config, name) for name in fields}
    try:
        for name in fields:
            setattr(config, name, 1)
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


class _VTransModelMixin:
    """Builds the stock model, then resizes every layer in place to `config.vtrans_layers`.

    Parameter names stay those of the stock model, so a sliced stock state dict loads with strict=True.
    """

    def __init__(self, config, *args, **kwargs):
        family = _family(config)
        if getattr(config, "add_cross_attention", False):
            raise ValueError("vtrans pruned models do not support cross-attention (add_cross_attention=True)")
        shrunk_fields, resize = _FAMILY_SPECS[family]
        with _shrunk_build(config, shrunk_fields):
            self._build_stock(config, *args, **kwargs)
        resize(self.base_model, config)
        _resize_pooled_heads(self, config)
        self.post_init()  # initialises the new (unflagged) modules only, re-ties embeddings

    def _build_stock(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Model classes
# ----------------------------------------------------------------------------------------------------------------


class VTransLlamaModel(_VTransModelMixin, LlamaModel):
    config_class = VTransLlamaConfig


class VTransLlamaForCausalLM(_VTransModelMixin, LlamaForCausalLM):
    config_class = VTransLlamaConfig


class VTransLlamaForSequenceClassification(_VTransModelMixin, LlamaForSequenceClassification):
    config_class = VTransLlamaConfig

    def _build_stock(self, config):
        # The stock __init__ builds its body with AutoModel.from_config, which knows no vtrans config unless
        # registered; build the same stock tree directly instead.
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)


class VTransBertModel(_VTransModelMixin, BertModel):
    config_class = VTransBertConfig


class VTransBertForSequenceClassification(_VTransModelMixin, BertForSequenceClassification):
    config_class = VTransBertConfig


class VTransBertForQuestionAnswering(_VTransModelMixin, BertForQuestionAnswering):
    config_class = VTransBertConfig


class VTransRobertaModel(_VTransModelMixin, RobertaModel):
    config_class = VTransRobertaConfig


class VTransRobertaForSequenceClassification(_VTransModelMixin, RobertaForSequenceClassification):
    config_class = VTransRobertaConfig


class VTransRobertaForQuestionAnswering(_VTransModelMixin, RobertaForQuestionAnswering):
    config_class = VTransRobertaConfig


class VTransGPT2Model(_VTransModelMixin, GPT2Model):
    config_class = VTransGPT2Config


class VTransGPT2LMHeadModel(_VTransModelMixin, GPT2LMHeadModel):
    config_class = VTransGPT2Config


class VTransGPT2ForSequenceClassification(_VTransModelMixin, GPT2ForSequenceClassification):
    config_class = VTransGPT2Config


# ----------------------------------------------------------------------------------------------------------------
# Auto classes and saving
# ----------------------------------------------------------------------------------------------------------------

_MODULE = "pruned_modeling"

# family -> auto_map for a saved config.json (Auto class name -> "pruned_modeling.<Class>")
AUTO_MAP = {
    "llama": {
        "AutoConfig": f"{_MODULE}.VTransLlamaConfig",
        "AutoModel": f"{_MODULE}.VTransLlamaModel",
        "AutoModelForCausalLM": f"{_MODULE}.VTransLlamaForCausalLM",
        "AutoModelForSequenceClassification": f"{_MODULE}.VTransLlamaForSequenceClassification",
    },
    "bert": {
        "AutoConfig": f"{_MODULE}.VTransBertConfig",
        "AutoModel": f"{_MODULE}.VTransBertModel",
        "AutoModelForSequenceClassification": f"{_MODULE}.VTransBertForSequenceClassification",
        "AutoModelForQuestionAnswering": f"{_MODULE}.VTransBertForQuestionAnswering",
    },
    "roberta": {
        "AutoConfig": f"{_MODULE}.VTransRobertaConfig",
        "AutoModel": f"{_MODULE}.VTransRobertaModel",
        "AutoModelForSequenceClassification": f"{_MODULE}.VTransRobertaForSequenceClassification",
        "AutoModelForQuestionAnswering": f"{_MODULE}.VTransRobertaForQuestionAnswering",
    },
    "gpt2": {
        "AutoConfig": f"{_MODULE}.VTransGPT2Config",
        "AutoModel": f"{_MODULE}.VTransGPT2Model",
        "AutoModelForCausalLM": f"{_MODULE}.VTransGPT2LMHeadModel",
        "AutoModelForSequenceClassification": f"{_MODULE}.VTransGPT2ForSequenceClassification",
    },
}


def register_auto() -> None:
    """Register every vtrans config with AutoConfig and each model with its Auto class. Safe to call repeatedly."""
    import transformers

    for entries in AUTO_MAP.values():
        config_class = globals()[entries["AutoConfig"].split(".", 1)[1]]
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, target in entries.items():
            if auto_name != "AutoConfig":
                model_class = globals()[target.split(".", 1)[1]]
                getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)


def save_pruned(model, out_dir, **save_kwargs) -> str:
    """save_pretrained `model` to `out_dir`, add this file as `pruned_modeling.py` and point `auto_map` at it.

    The result loads with `Auto*.from_pretrained(out_dir, trust_remote_code=True)` without vtrans installed.
    """
    auto_map = dict(AUTO_MAP[_family(model.config)])
    out_dir = os.fspath(out_dir)
    model.config.auto_map = auto_map
    model.save_pretrained(out_dir, **save_kwargs)
    source = os.path.abspath(__file__)
    target = os.path.join(out_dir, f"{_MODULE}.py")
    if not (os.path.exists(target) and os.path.samefile(source, target)):
        shutil.copyfile(source, target)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("auto_map") != auto_map:
        saved["auto_map"] = auto_map
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2, sort_keys=True)
            f.write("\n")
    return out_dir
