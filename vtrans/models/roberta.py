"""RoBERTa: BERT's post-norm layout (see bert.py) under `roberta`, with its own classification head. Its pruned
config and model classes, each layer sized by `config.vtrans_layers`. Copied into every saved pruned RoBERTa
checkpoint."""

from huggingface_hub.dataclasses import strict
from transformers import RobertaConfig, RobertaForQuestionAnswering, RobertaForSequenceClassification, RobertaModel

from .bert import POST_NORM_PATHS, resize_post_norm
from .common import Family, PrunedConfigMixin, PrunedModelMixin


@strict
class VTransRobertaConfig(PrunedConfigMixin, RobertaConfig):
    model_type = "vtrans_roberta"

    head_dim: int | None = None
    vtrans_layers: list[dict] | None = None
    vtrans_pooler_dim: int | None = None  # width of the pooler / classification dense layer (kept when hidden is pruned)


class VTransRobertaModel(PrunedModelMixin, RobertaModel):
    config_class = VTransRobertaConfig


class VTransRobertaForSequenceClassification(PrunedModelMixin, RobertaForSequenceClassification):
    config_class = VTransRobertaConfig


class VTransRobertaForQuestionAnswering(PrunedModelMixin, RobertaForQuestionAnswering):
    config_class = VTransRobertaConfig


ROBERTA = Family(
    name="roberta",
    model_types=("roberta",),
    base=("roberta",),
    head_inputs=("pooler.dense", "classifier.dense", "qa_outputs"),
    pruned_config=VTransRobertaConfig,
    pruned_models={"none": VTransRobertaModel, "cls": VTransRobertaForSequenceClassification,
                   "qa": VTransRobertaForQuestionAnswering},
    stock_config=RobertaConfig,
    stock_models={"none": RobertaModel, "cls": RobertaForSequenceClassification, "qa": RobertaForQuestionAnswering},
    resize=resize_post_norm,
    **POST_NORM_PATHS,
)
