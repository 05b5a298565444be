"""What every model family shares: the `Family` adapter (where a family keeps its heads, FFN neurons, hidden
dimension and norms, which config fields hold their counts, its pruned and stock classes), the pruned config and
model mixins that size every layer from `config.vtrans_layers`, and the small layer builders they use.

Copied with the family's own file into every saved pruned checkpoint (`save_pruned`), so it imports only the
standard library, torch and transformers (and its huggingface_hub dependency)."""

import contextlib
import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.pytorch_utils import Conv1D

LAYER_KEYS = ("heads", "kv_heads", "intermediate")
HEAD_KINDS = ("none", "lm", "cls", "qa")  # bare model, causal LM, sequence classifier, extractive QA
FAMILIES: dict = {}  # family name -> Family (filled as the family files are imported)


# ----------------------------------------------------------------------------------------------------------------
# The family adapter
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One model family as vtrans sees it. Module paths are relative to the base model (`base` names the attribute
    of a task model that holds it) or to one layer. Counts are read from (and pruned configs written to) the named
    config fields. `pruned_models` / `stock_models` map a head kind (HEAD_KINDS) to a class."""

    name: str
    model_types: tuple  # the Hugging Face model_type values this family handles
    base: tuple
    layers: str
    embeddings: tuple  # lookup tables whose columns are the hidden dimension
    embed_norm: str | None  # post-norm: the norm after the embedding sum
    final_norm: str | None  # pre-norm: the norm before the task head
    qkv: tuple  # q, k, v projections; or one fused q|k|v projection
    o: str  # attention output projection: its input is the concatenated heads
    ffn_in: tuple  # projections into the FFN neurons
    ffn_out: str  # FFN output projection: its input is the neurons
    norms: tuple  # a layer's two norms (pre-norm: before each block; post-norm: after each block)
    attn_container: str  # module owning a layer's attention (holds the attention masks' names)
    ffn_container: str
    head_inputs: tuple  # task-head modules reading the hidden dimension (paths inside the base model are relative to it)
    pruned_config: type
    pruned_models: dict
    stock_config: type
    stock_models: dict
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    post_norm: bool = False  # norms after each block; a removed block is skipped (input passes through)
    grouped_kv: bool = False  # grouped-query attention: a head unit is one KV head with its query heads
    explicit_head_dim: bool = False  # the stock config states head_dim (else it derives hidden / heads)
    norm_params: int = 2  # parameters per channel of a norm: 2 (LayerNorm) or 1 (RMSNorm)
    hidden_field: str = "hidden_size"
    layers_field: str = "num_hidden_layers"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str | None = None
    intermediate_field: str = "intermediate_size"
    positions_field: str | None = "max_position_embeddings"  # learned absolute positions; None: rotary
    type_vocab_field: str | None = None
    pooled: bool = False  # classifier / bare model pool the first token through a dense layer (bert / roberta)
    causal: bool = True  # decoder (attends to earlier tokens only) or bidirectional encoder
    shrunk_fields: tuple = ()  # stock config fields set to 1 while a pruned model's stock tree is built
    resize: object = None  # (base model, pruned config) -> None: sizes every layer to config.vtrans_layers
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        FAMILIES[self.name] = self
        for cls in [self.pruned_config, *self.pruned_models.values()]:
            cls.vtrans_family = self

    # --- reading a config ---
    def intermediate(self, config) -> int:
        return getattr(config, self.intermediate_field)

    def counts(self, config) -> dict:
        """hidden, head_dim and the per-layer (heads, kv_heads, intermediate) of a stock or pruned config."""
        hidden = getattr(config, self.hidden_field)
        heads = getattr(config, self.heads_field)
        kv = getattr(config, self.kv_heads_field, None) if self.kv_heads_field else None
        kv = kv or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        per_layer = getattr(config, "vtrans_layers", None)
        if per_layer:
            layers = [(l["heads"], l["kv_heads"], l["intermediate"]) for l in per_layer]
        else:
            layers = [(heads, kv, self.intermediate(config))] * getattr(config, self.layers_field)
        return {"hidden": hidden, "head_dim": head_dim, "layers": layers}

    def biases(self, config) -> dict:
        """Which projections carry a bias: q/k/v, o, FFN (in and out)."""
        return {"qkv": True, "o": True, "mlp": True}

    def shape_fields(self, config, head: str) -> dict:
        """Everything a model shape needs besides the counts: sizes of the lookup tables and the family's traits."""
        pooler = 0
        if self.pooled and head in ("cls", "none"):
            pooler = getattr(config, "vtrans_pooler_dim", None) or getattr(config, self.hidden_field)
        return {
            "family": self.name,
            "vocab_size": config.vocab_size,
            "max_positions": getattr(config, self.positions_field, 0) if self.positions_field else 0,
            "type_vocab": getattr(config, self.type_vocab_field, 0) if self.type_vocab_field else 0,
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", True)),
            "head": head,
            "num_labels": config.num_labels if head == "cls" else 0,
            "pooler_dim": pooler,
            "causal": self.causal,
            "post_norm": self.post_norm,
            "gated_mlp": len(self.ffn_in) == 2,
            "norm_params": self.norm_params,
            **{f"{k}_bias": v for k, v in self.biases(config).items()},
        }

    # --- writing configs ---
    def pruned_config_for(self, config, hidden: int, layers: list, kept_layers: list, pooler_dim: int = 0):
        """The pruned model's config: `config` (a stock or pruned config) with the kept hidden width, the kept layers
        (dense indices `kept_layers`) and their (heads, kv_heads, intermediate) counts."""
        values = _plain_values(config)
        values["head_dim"] = self.counts(config)["head_dim"]
        values["vtrans_layers"] = [dict(zip(LAYER_KEYS, map(int, l))) for l in layers]
        values[self.hidden_field] = int(hidden)
        values[self.layers_field] = len(layers)
        if self.pooled and pooler_dim:
            values["vtrans_pooler_dim"] = int(pooler_dim)
        if values.get("layer_types") is not None:
            values["layer_types"] = [values["layer_types"][i] for i in kept_layers]
        return self.pruned_config(**values)

    def uniform_problems(self, config) -> list:
        """Why a pruned config has no stock equivalent (empty when it has one)."""
        layers = config.vtrans_layers
        problems = []
        distinct = {tuple(l[k] for k in LAYER_KEYS) for l in layers}
        if len(distinct) > 1:
            problems.append(f"layers differ in (heads, kv_heads, intermediate): {sorted(distinct)}")
        if any(l["heads"] == 0 for l in layers):
            problems.append("some layers have no attention heads left")
        if any(l["intermediate"] == 0 for l in layers):
            problems.append("some layers have no FFN neurons left")
        hidden = getattr(config, self.hidden_field)
        heads = layers[0]["heads"] if layers else 0
        if heads and hidden % heads:
            problems.append(f"hidden size {hidden} is not a multiple of the {heads} heads (stock config check)")
        if not self.explicit_head_dim and heads and heads * config.head_dim != hidden:
            problems.append(f"{self.name} derives head size as hidden / heads: {heads} heads x head_dim "
                            f"{config.head_dim} != hidden {hidden}")
        pooler = getattr(config, "vtrans_pooler_dim", None)
        if self.pooled and pooler and pooler != hidden:
            problems.append(f"the pooler keeps width {pooler} while hidden is {hidden}")
        return problems

    def stock_config_for(self, config):
        """The stock transformers config of a uniform pruned config (see uniform_problems)."""
        problems = self.uniform_problems(config)
        if problems:
            raise ValueError(f"the pruned {self.name} shape has no stock equivalent: " + "; ".join(problems))
        values = _plain_values(config)
        for key in ("vtrans_layers", "vtrans_pooler_dim"):
            values.pop(key, None)
        layer = config.vtrans_layers[0]
        values[self.heads_field] = layer["heads"]
        if self.kv_heads_field:
            values[self.kv_heads_field] = layer["kv_heads"]
        if not self.explicit_head_dim:
            values.pop("head_dim", None)
        values[self.intermediate_field] = layer["intermediate"]
        return self.stock_config(**values)

    def auto_map(self, module: str) -> dict:
        """Auto class name -> "<module>.<class>" for a saved config.json."""
        names = {"none": "AutoModel", "lm": "AutoModelForCausalLM", "cls": "AutoModelForSequenceClassification",
                 "qa": "AutoModelForQuestionAnswering"}
        out = {"AutoConfig": f"{module}.{self.pruned_config.__name__}"}
        for head, cls in self.pruned_models.items():
            out[names[head]] = f"{module}.{cls.__name__}"
        return out


def _plain_values(config) -> dict:
    values = config.to_dict()
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        values.pop(key, None)
    return values


def get_module(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def has_module(root: nn.Module, path: str) -> bool:
    try:
        get_module(root, path)
        return True
    except (AttributeError, IndexError):
        return False


def head_kind(model: nn.Module) -> str:
    """"lm", "cls", "qa" or "none" (a bare base model), from the model class."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "lm"
    if name.endswith("ForSequenceClassification"):
        return "cls"
    if name.endswith("ForQuestionAnswering"):
        return "qa"
    if name.endswith("Model"):
        return "none"
    raise ValueError(f"model class {name} is not supported: use a base model, *ForCausalLM, "
                     "*ForSequenceClassification or *ForQuestionAnswering")


# ----------------------------------------------------------------------------------------------------------------
# Pruned configs
# ----------------------------------------------------------------------------------------------------------------


def as_count(value):
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
        counts = {key: as_count(layer[key]) for key in LAYER_KEYS}
        for key, count in counts.items():
            if count is None:
                raise ValueError(f"vtrans_layers[{i}][{key!r}] must be a non-negative int, got {layer[key]!r}")
        heads, kv_heads = counts["heads"], counts["kv_heads"]
        if (heads == 0) != (kv_heads == 0):
            raise ValueError(f"vtrans_layers[{i}]: kv_heads={kv_heads} and heads={heads} must be zero together "
                             "(heads=0 removes the attention block)")
        if heads and heads % kv_heads:
            raise ValueError(f"vtrans_layers[{i}]: kv_heads={kv_heads} does not divide heads={heads}")
        if not grouped_kv and kv_heads != heads:
            raise ValueError(f"vtrans_layers[{i}]: kv_heads={kv_heads} must equal heads={heads} (no grouped-query "
                             "attention)")
        checked.append(counts)
    return checked


class PrunedConfigMixin:
    """Fills and checks `vtrans_layers` and `head_dim`; replaces the stock `hidden % heads` architecture check.
    The family's config class sets `vtrans_family` (done by Family)."""

    def _full_counts(self) -> tuple:
        """(heads, kv_heads, intermediate) of an unpruned layer under this config's stock fields."""
        fam = self.vtrans_family
        heads = getattr(self, fam.heads_field)
        kv = getattr(self, fam.kv_heads_field, None) if fam.kv_heads_field else None
        return heads, kv or heads, fam.intermediate(self)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        fam = self.vtrans_family
        if getattr(self, "head_dim", None) is None:
            self.head_dim = getattr(self, fam.hidden_field) // getattr(self, fam.heads_field)
        if self.vtrans_layers is None:
            heads, kv_heads, intermediate = self._full_counts()
            self.vtrans_layers = [{"heads": heads, "kv_heads": kv_heads, "intermediate": intermediate}
                                  for _ in range(getattr(self, fam.layers_field))]
        # Checked here too so that a bad shape raises a plain ValueError at construction (the strict-dataclass
        # validator wraps its errors in StrictDataclassClassValidationError).
        self.validate_architecture()
        self.vtrans_layers = check_vtrans_layers(self.vtrans_layers, getattr(self, fam.layers_field),
                                                 fam.grouped_kv)

    def validate_architecture(self):
        """Part of `@strict` validation: per-layer shapes instead of the stock `hidden % heads == 0`."""
        fam = self.vtrans_family
        if not as_count(self.head_dim):
            raise ValueError(f"head_dim must be a positive int, got {self.head_dim!r}")
        if not as_count(getattr(self, fam.hidden_field)):
            raise ValueError(f"{fam.hidden_field} must be a positive int, got {getattr(self, fam.hidden_field)!r}")
        check_vtrans_layers(self.vtrans_layers, getattr(self, fam.layers_field), fam.grouped_kv)


# ----------------------------------------------------------------------------------------------------------------
# Pruned models
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_empty_init():
    """nn.Linear's kaiming init warns on zero-element weights; empty projections are intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


def linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    with quiet_empty_init():
        return nn.Linear(in_features, out_features, bias=bias)


class ZeroInputConv1D(Conv1D):
    """GPT-2's Conv1D, also for zero input features (the stock `x.view(-1, 0)` is ambiguous)."""

    def forward(self, x):
        size_out = x.shape[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.reshape(x.shape[:-1].numel(), self.nx), self.weight)
        return x.view(size_out)


def conv1d(nf: int, nx: int) -> Conv1D:
    return Conv1D(nf, nx) if nx else ZeroInputConv1D(nf, nx)


def layer_counts(config) -> list:
    return [(l["heads"], l["kv_heads"], l["intermediate"]) for l in config.vtrans_layers]


def mark_for_init(*modules) -> None:
    """Let the next post_init() run the model's _init_weights on modules whose children were replaced."""
    for module in modules:
        module._is_hf_initialized = False


def zero_head_step(cache, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
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


@contextlib.contextmanager
def shrunk_build(config, fields):
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


class PrunedModelMixin:
    """Builds the stock model, then resizes every layer in place to `config.vtrans_layers` (the family's `resize`).

    Parameter names stay those of the stock model, so a sliced stock state dict loads with strict=True.
    """

    def __init__(self, config, *args, **kwargs):
        fam = self.vtrans_family
        if getattr(config, "add_cross_attention", False):
            raise ValueError("vtrans pruned models do not support cross-attention (add_cross_attention=True)")
        with shrunk_build(config, fam.shrunk_fields):
            self._build_stock(config, *args, **kwargs)
        fam.resize(self, config)
        self.post_init()  # initialises the new (unflagged) modules only, re-ties embeddings

    def _build_stock(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
