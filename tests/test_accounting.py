"""Parameter and FLOP accounting against counted numel and a hand-computed tiny model."""
import pytest
import torch

from tests.tiny import make_tiny
from vtrans.accounting import flops_per_token, model_numel, param_count
from vtrans.models import shape_of
from vtrans.shape import LayerShape, ModelShape

CASES = [("llama", "lm"), ("llama", "cls"), ("gpt2", "lm"), ("gpt2", "cls"), ("bert", "cls"), ("bert", "qa"),
         ("roberta", "cls")]


@pytest.mark.parametrize("family,head", CASES)
def test_param_count_matches_numel(family, head):
    model = make_tiny(family, head)
    shape = shape_of(model)
    assert param_count(shape) == model_numel(model)
    assert param_count(shape, embeddings=False) == model_numel(model, embeddings=False)


def test_llama_untied_with_biases_matches_numel():
    model = make_tiny("llama", "lm", tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    shape = shape_of(model)
    assert not shape.tied_embeddings
    assert param_count(shape) == model_numel(model)
    assert param_count(shape, embeddings=False) == model_numel(model, embeddings=False)


LLAMA = dict(family="llama", gated_mlp=True, norm_params=1)  # the family traits shape_of reads off a config
BERT = dict(family="bert", post_norm=True, norm_params=2, qkv_bias=True, o_bias=True, mlp_bias=True)


def test_hand_computed_tiny_llama():
    # hidden 4, head_dim 2, one layer with 2 query heads / 1 KV head, FFN 3, vocab 10, tied embeddings
    s = ModelShape(**LLAMA, vocab_size=10, hidden=4, head_dim=2, layers=[LayerShape(2, 1, 3)],
                   tied_embeddings=True, head="lm")
    emb = 10 * 4
    q, k, v, o = 4 * 4, 4 * 2, 4 * 2, 4 * 4
    mlp = 3 * 4 * 3
    norms = 2 * 4 + 4
    assert param_count(s) == emb + q + k + v + o + mlp + norms == 136
    assert param_count(s, embeddings=False) == 96
    # FLOPs per token at T=3 (causal: average context 2): 2*(q+k+v+o+mlp) + 4*heads*head_dim*2 + 2*V*d
    assert flops_per_token(s, 3) == 2 * (16 + 8 + 8 + 16 + 36) + 4 * 2 * 2 * 2 + 2 * 10 * 4 == 280


def test_hand_computed_tiny_bert_encoder():
    s = ModelShape(**BERT, vocab_size=10, hidden=4, head_dim=2, layers=[LayerShape(2, 2, 3)],
                   max_positions=5, type_vocab=2, head="qa", causal=False)
    emb = (10 + 5 + 2) * 4
    attn = 3 * (4 * 4 + 4) + (4 * 4 + 4) + 2 * 4
    ffn = (4 * 3 + 3) + (3 * 4 + 4) + 2 * 4
    other = 2 * 4 + (4 * 2 + 2)
    assert param_count(s) == emb + attn + ffn + other
    # bidirectional: context = T
    assert flops_per_token(s, 3) == 2 * (4 * 4 * 4 + 2 * 4 * 3) + 4 * 2 * 2 * 3 + 2 * 4 * 2


def test_removed_blocks_have_no_parameters():
    s = ModelShape(**BERT, vocab_size=10, hidden=4, head_dim=2,
                   layers=[LayerShape(0, 0, 3), LayerShape(2, 2, 0)], max_positions=5, type_vocab=2,
                   head="none", causal=False, pooler_dim=4)
    full = ModelShape(**BERT, vocab_size=10, hidden=4, head_dim=2,
                      layers=[LayerShape(2, 2, 3), LayerShape(2, 2, 3)], max_positions=5, type_vocab=2,
                      head="none", causal=False, pooler_dim=4)
    attn = 3 * (4 * 4 + 4) + (4 * 4 + 4) + 2 * 4
    ffn = (4 * 3 + 3) + (3 * 4 + 4) + 2 * 4
    assert param_count(full) - param_count(s) == attn + ffn


def test_soft_counts_are_differentiable():
    h = torch.tensor(40.0, requires_grad=True)
    s = ModelShape(**LLAMA, vocab_size=10, hidden=h, head_dim=2,
                   layers=[LayerShape(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(3.0))], head="lm")
    n = param_count(s)
    n.backward()
    assert h.grad is not None and h.grad > 0
