"""Qwen2: the LLaMA layout with biases on the q/k/v projections (none on o_proj or the FFN) and optional
sliding-window layers (`layer_types`, filtered to the kept layers). Its pruned config and model classes, each layer
sized by `config.vtrans_layers`. Copied into every saved pruned Qwen2 checkpoint."""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2PreTrainedModel

from .common import PrunedConfigMixin, PrunedModelMixin
from .llama import LINEAGE_PATHS, LineageFamily, classifier_build, resize_lineage, zero_head_attention


@strict
class VTransQwen2Config(PrunedConfigMixin, Qwen2Config):
    model_type = "vtrans_qwen2"

    head_dim: int | None = None
    vtrans_layers: list[dict] | None = None


class VTransQwen2Model(PrunedModelMixin, Qwen2Model):
    config_class = VTransQwen2Config


class VTransQwen2ForCausalLM(PrunedModelMixin, Qwen2ForCausalLM):
    config_class = VTransQwen2Config


class VTransQwen2ForSequenceClassification(PrunedModelMixin, Qwen2ForSequenceClassification):
    config_class = VTransQwen2Config
    _build_stock = classifier_build(Qwen2Model, Qwen2PreTrainedModel)


class Qwen2Family(LineageFamily):
    def biases(self, config) -> dict:
        return {"qkv": True, "o": False, "mlp": False}


QWEN2 = Qwen2Family(
    name="qwen2",
    model_types=("qwen2",),
    pruned_config=VTransQwen2Config,
    pruned_models={"none": VTransQwen2Model, "lm": VTransQwen2ForCausalLM, "cls": VTransQwen2ForSequenceClassification},
    stock_config=Qwen2Config,
    stock_models={"none": Qwen2Model, "lm": Qwen2ForCausalLM, "cls": Qwen2ForSequenceClassification},
    resize=resize_lineage(zero_head_attention(Qwen2Attention)),
    **LINEAGE_PATHS,
)
