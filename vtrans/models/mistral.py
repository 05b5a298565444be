"""Mistral: the LLaMA layout with sliding-window attention (kept as the config says). Its pruned config and model
classes, each layer sized by `config.vtrans_layers`. Copied into every saved pruned Mistral checkpoint."""

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig, MistralForCausalLM, MistralForSequenceClassification, MistralModel
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralPreTrainedModel

from .common import PrunedConfigMixin, PrunedModelMixin
from .llama import LINEAGE_PATHS, LineageFamily, classifier_build, resize_lineage, zero_head_attention


@strict
class VTransMistralConfig(PrunedConfigMixin, MistralConfig):
    model_type = "vtrans_mistral"

    vtrans_layers: list[dict] | None = None


class VTransMistralModel(PrunedModelMixin, MistralModel):
    config_class = VTransMistralConfig


class VTransMistralForCausalLM(PrunedModelMixin, MistralForCausalLM):
    config_class = VTransMistralConfig


class VTransMistralForSequenceClassification(PrunedModelMixin, MistralForSequenceClassification):
    config_class = VTransMistralConfig
    _build_stock = classifier_build(MistralModel, MistralPreTrainedModel)


class MistralFamily(LineageFamily):
    def biases(self, config) -> dict:
        return {"qkv": False, "o": False, "mlp": False}


MISTRAL = MistralFamily(
    name="mistral",
    model_types=("mistral",),
    pruned_config=VTransMistralConfig,
    pruned_models={"none": VTransMistralModel, "lm": VTransMistralForCausalLM,
                   "cls": VTransMistralForSequenceClassification},
    stock_config=MistralConfig,
    stock_models={"none": MistralModel, "lm": MistralForCausalLM, "cls": MistralForSequenceClassification},
    resize=resize_lineage(zero_head_attention(MistralAttention)),
    **LINEAGE_PATHS,
)
