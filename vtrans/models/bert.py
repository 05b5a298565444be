"""The BERT family (post-norm encoders; roberta.py shares this layout): where its structures live, and its pruned
config and model classes, each layer sized by `config.vtrans_layers`. A removed attention or FFN sub-block is
skipped (its input passes through, CoFi); the pooler and classification dense layer keep their width. Copied into
every saved pruned BERT / RoBERTa checkpoint: imports only torch, transformers and `.common`."""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertModel

from .common import (Family, PrunedConfigMixin, PrunedModelMixin, layer_counts, linear, mark_for_init,
                     zero_head_step)

POST_NORM_PATHS = dict(
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
    post_norm=True,
    pooled=True,
    causal=False,
    type_vocab_field="type_vocab_size",
    shrunk_fields=("num_attention_heads", "intermediate_size"),
)


class SkippedAttention(nn.Module):
    """Stands in for a removed post-norm attention sub-block: returns its input unchanged.

    Same calling convention as BertAttention: `(hidden_states, attention_mask, ..., cache=...) -> (output, weights)`.
    A decoder cache still advances (see `zero_head_step`) so the layer's cache index stays valid.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is not None:
            zero_head_step(cache, self.layer_idx, hidden_states, kwargs)
        return hidden_states, None


class SkippedIntermediate(nn.Module):
    """Stands in for a removed post-norm FFN's first half: passes its input through."""

    def forward(self, hidden_states):
        return hidden_states


class SkippedOutput(nn.Module):
    """Stands in for a removed post-norm FFN's second half (dense + residual + LayerNorm): returns the residual."""

    def forward(self, hidden_states, input_tensor):
        return input_tensor


def resize_post_norm(model, config) -> None:
    hidden, head_dim = config.hidden_size, config.head_dim
    for idx, (layer, (heads, _, intermediate)) in enumerate(zip(model.base_model.encoder.layer,
                                                                layer_counts(config))):
        if heads == 0:
            layer.attention = SkippedAttention(idx)
        else:
            attn = layer.attention.self
            attn.num_attention_heads = heads
            attn.attention_head_size = head_dim
            attn.all_head_size = heads * head_dim
            attn.scaling = head_dim**-0.5
            attn.query = linear(hidden, heads * head_dim, True)
            attn.key = linear(hidden, heads * head_dim, True)
            attn.value = linear(hidden, heads * head_dim, True)
            layer.attention.output.dense = linear(heads * head_dim, hidden, True)
            mark_for_init(attn, layer.attention.output)
        if intermediate == 0:
            layer.intermediate = SkippedIntermediate()
            layer.output = SkippedOutput()
        else:
            layer.intermediate.dense = linear(hidden, intermediate, True)
            layer.output.dense = linear(intermediate, hidden, True)
            mark_for_init(layer.intermediate, layer.output)
    _resize_pooled_heads(model, config)


def _resize_pooled_heads(model, config) -> None:
    """The pooler (and classification dense layer) keep their unpruned output width."""
    width = getattr(config, "vtrans_pooler_dim", None)
    if not width:
        return
    hidden = config.hidden_size
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        pooler.dense = linear(hidden, width, True)
        mark_for_init(pooler)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):  # bert: the classifier reads the pooled output
        model.classifier = linear(width, classifier.out_features, True)
        mark_for_init(model)
    elif classifier is not None and hasattr(classifier, "out_proj"):  # roberta's classification head
        classifier.dense = linear(hidden, width, True)
        classifier.out_proj = linear(width, classifier.out_proj.out_features, True)
        mark_for_init(classifier)


# ----------------------------------------------------------------------------------------------------------------


@strict
class VTransBertConfig(PrunedConfigMixin, BertConfig):
    model_type = "vtrans_bert"

    head_dim: int | None = None
    vtrans_layers: list[dict] | None = None
    vtrans_pooler_dim: int | None = None  # width of the pooler / classification dense layer (kept when hidden is pruned)


class VTransBertModel(PrunedModelMixin, BertModel):
    config_class = VTransBertConfig


class VTransBertForSequenceClassification(PrunedModelMixin, BertForSequenceClassification):
    config_class = VTransBertConfig


class VTransBertForQuestionAnswering(PrunedModelMixin, BertForQuestionAnswering):
    config_class = VTransBertConfig


BERT = Family(
    name="bert",
    model_types=("bert",),
    base=("bert",),
    head_inputs=("pooler.dense", "qa_outputs"),
    pruned_config=VTransBertConfig,
    pruned_models={"none": VTransBertModel, "cls": VTransBertForSequenceClassification,
                   "qa": VTransBertForQuestionAnswering},
    stock_config=BertConfig,
    stock_models={"none": BertModel, "cls": BertForSequenceClassification, "qa": BertForQuestionAnswering},
    resize=resize_post_norm,
    **POST_NORM_PATHS,
)
