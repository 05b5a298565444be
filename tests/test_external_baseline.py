"""The external baseline of bench/quality.py: Torch-Pruning (installed by scripts/setup.sh) by its LLM example's
recipe on a tiny LLaMA with GQA and tied embeddings: the budget met, the model still a working LLaMA, measured by the
same evaluation as the vtrans rows; and the bench's table rows."""
import copy
import math

import pytest
import torch

from tests.tiny import make_tiny
from vtrans.accounting import model_numel

tp = pytest.importorskip("torch_pruning")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_torch_pruning_prunes_hidden_and_ffn_widths_keeping_heads_and_tied_embeddings():
    from bench.external import prune_llama

    dense = make_tiny("llama", "lm", max_position_embeddings=128)
    pruned = prune_llama(copy.deepcopy(dense), 0.3)
    c = pruned.config
    assert c.hidden_size % 4 == 0 and c.hidden_size < 48 and c.intermediate_size % 4 == 0 and c.intermediate_size < 80
    assert (c.num_attention_heads, c.num_key_value_heads) == (6, 2)  # heads kept (see bench/external.py)
    assert pruned.lm_head.weight is pruned.get_input_embeddings().weight
    ids = torch.randint(0, 97, (2, 12))
    assert pruned(input_ids=ids).logits.shape == (2, 12, 97)
    assert model_numel(pruned) < model_numel(dense)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_the_fitted_ratio_meets_the_budget_tightly(importance):
    from bench.external import fit_ratio, prune_llama

    dense = make_tiny("llama", "lm", max_position_embeddings=128, hidden_size=96, head_dim=16, intermediate_size=192)
    target = 0.7 * model_numel(dense)
    ratio, counted = fit_ratio(dense, target, embeddings=True)
    assert counted <= target
    calibration = [{"input_ids": torch.randint(0, 97, (2, 16))}]
    pruned = prune_llama(copy.deepcopy(dense), ratio, importance, calibration)
    assert model_numel(pruned) == counted  # the count depends on the ratio, not on the importance
    looser = prune_llama(copy.deepcopy(dense), ratio - 0.02)
    assert model_numel(looser) > target  # a smaller ratio would not meet the budget (within the search tolerance)


def test_unknown_importance_names_the_accepted_ones():
    from bench.external import prune_llama

    with pytest.raises(ValueError, match=r"importance='fisher' is not accepted; choose one of \['magnitude', 'taylor'\]"):
        prune_llama(make_tiny("llama", "lm"), 0.2, "fisher")


def test_bench_rows_report_ratios_and_geometric_means():
    from bench.quality import FINAL_TEST, row

    m = {"params_pruned": 80, "param_reduction": 0.2, "ppl_dense": 10.0, "ppl_pruned": 15.0,
         "eval_domains": {"a": "x", "b": "y", FINAL_TEST: "z"}, "flops_dense": 2.0, "flops_pruned": 1.5,
         "ppl_a_dense": 4.0, "ppl_a_pruned": 8.0, "ppl_b_dense": 5.0, "ppl_b_pruned": 10.0,
         f"ppl_{FINAL_TEST}_dense": 3.0, f"ppl_{FINAL_TEST}_pruned": 12.0}
    r = row(0.8, "faster", m, 1.0, 2.0)
    assert r["ratio_calibration"] == 1.5 and r["ratio_a"] == 2.0 and r[f"ratio_{FINAL_TEST}"] == 4.0
    assert r["ratio_dev_mean"] == 2.0  # the final test is left out of the development mean
    assert r["ratio_cross_domain"] == pytest.approx(round((2 * 2 * 4) ** (1 / 3), 4))
    assert math.isclose(r["flops_ratio"], 0.75)
