"""Masks on tiny models of every family: identity at init, KL and soft counts, the budget decision, and
the proof of materialisation: the hard-masked model and the materialised model give the same outputs."""
import pytest
import torch

from tests.tiny import make_tiny
from vtrans.accounting import model_numel, param_count
from vtrans.masks.attach import STRUCTURES, MaskInit, attach_masks
from vtrans.masks.decide import Budget, check_reachable, decide
from vtrans.masks.materialize import materialize
from vtrans.models import shape_of

CASES = [("llama", "lm"), ("llama", "cls"), ("mistral", "lm"), ("qwen2", "lm"), ("qwen2", "cls"), ("gpt2", "lm"),
         ("gpt2", "cls"), ("bert", "cls"), ("bert", "qa"),
         ("roberta", "cls")]


def _inputs(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model, inputs):
    out = model(**inputs)
    if hasattr(out, "logits"):
        return out.logits
    return torch.cat([out.start_logits, out.end_logits], -1)


def _randomise(mm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mm.masks().values():
            m.log_sigma2.copy_(torch.randn(m.n, generator=g) * 3 - 1)
            m.mu.copy_(1 + 0.3 * torch.randn(m.n, generator=g))


@pytest.mark.parametrize("family,head", CASES)
def test_masks_at_identity_leave_outputs_unchanged(family, head):
    model = make_tiny(family, head)
    x = _inputs(family)
    ref = _outputs(model, x)
    mm = attach_masks(model)
    with torch.no_grad():
        for m in mm.masks().values():
            m.mu.fill_(1.0)
    torch.testing.assert_close(_outputs(model, x), ref)
    with mm.disabled():
        torch.testing.assert_close(_outputs(model, x), ref)


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "cls")])
def test_training_forward_gives_kl_and_soft_counts_for_every_structure(family, head):
    model = make_tiny(family, head)
    mm = attach_masks(model)
    model.train()
    _outputs(model, _inputs(family))
    kl = mm.kl_terms()
    assert set(kl) == set(STRUCTURES)
    # KL per unit at init is 0.5 * log(1 + mu^2 / sigma^2) ~ 0.5 * 9 nats
    n_units = sum(m.n for m in mm.masks().values())
    total = sum(float(v.detach()) for v in kl.values())
    assert total == pytest.approx(4.5 * n_units, rel=0.02)
    expected = param_count(mm.expected_shape())
    assert float(expected.detach()) == pytest.approx(param_count(mm.dense), rel=1e-4)
    # the budget is differentiable with respect to every mask
    expected.backward()
    for name, m in mm.masks().items():
        assert m.log_sigma2.grad is not None, name


@pytest.mark.parametrize("family,head", CASES)
@pytest.mark.parametrize("ratio", [0.7, 0.45])
def test_decide_meets_the_budget_and_materialise_is_exact(family, head, ratio):
    model = make_tiny(family, head)
    x = _inputs(family)
    mm = attach_masks(model)
    _randomise(mm)
    budget = Budget("params_ratio", ratio)
    d = decide(mm, budget)
    assert d.fit["size"] <= d.fit["target"]
    assert d.fit["size"] >= 0.99 * d.fit["target"]
    masked_out = _outputs(model, x)
    pruned = materialize(mm)
    # physically smaller, and the counted parameters equal the accounting and meet the budget
    n = model_numel(pruned)
    assert n == param_count(shape_of(pruned)) == d.fit["size"]
    assert n <= budget.target_size(mm.dense)
    torch.testing.assert_close(_outputs(pruned, x), masked_out, rtol=1e-4, atol=1e-4)


def test_removed_blocks_and_layers_materialise_exactly():
    for family, head in [("llama", "lm"), ("gpt2", "lm"), ("bert", "cls")]:
        model = make_tiny(family, head)
        x = _inputs(family)
        mm = attach_masks(model)
        with torch.no_grad():
            for m in mm.masks().values():
                m.mu.fill_(1.0)
            mm.layers[0].attention.log_sigma2.fill_(5.0)  # layer 0 attention removed
            mm.layers[1].ffn.log_sigma2.fill_(5.0)  # layer 1 FFN removed
            mm.layers[2].attention.log_sigma2.fill_(5.0)  # layer 2 removed entirely
            mm.layers[2].ffn.log_sigma2.fill_(5.0)
            mm.layers[1].heads.log_sigma2[0] = 5.0
            mm.hidden.log_sigma2[:5] = 5.0
        masked_out = _outputs(model, x)
        pruned = materialize(mm)
        s = shape_of(pruned)
        assert len(s.layers) == 2 and s.layers[0].heads == 0 and s.layers[1].intermediate == 0
        assert s.hidden == mm.dense.hidden - 5
        torch.testing.assert_close(_outputs(pruned, x), masked_out, rtol=1e-4, atol=1e-4)


def test_gqa_head_units_are_kv_groups():
    model = make_tiny("llama", "lm")  # 6 query heads, 2 KV heads
    mm = attach_masks(model, ["heads"])
    assert mm.group == 3 and all(lm.heads.n == 2 for lm in mm.layers)
    with torch.no_grad():
        for lm in mm.layers:
            lm.heads.mu.fill_(1.0)
        mm.layers[0].heads.log_sigma2[1] = 5.0
    pruned = materialize(mm)
    assert pruned.config.vtrans_layers[0] == {"heads": 3, "kv_heads": 1, "intermediate": 80}


def test_unreachable_target_fails_before_training():
    model = make_tiny("llama", "lm")
    mm = attach_masks(model, ["neurons"])  # embeddings and attention cannot shrink
    with pytest.raises(ValueError, match=r"not reachable with the masked structures \['neurons'\]"):
        check_reachable(mm, Budget("params_ratio", 0.2))


def test_unknown_structure_is_rejected():
    with pytest.raises(ValueError, match="unknown mask structures"):
        attach_masks(make_tiny("llama", "lm"), ["heads", "experts"])


def test_flops_budget_is_met():
    from vtrans.accounting import flops_per_token
    model = make_tiny("gpt2", "lm")
    mm = attach_masks(model)
    _randomise(mm)
    budget = Budget("flops", 0.6, seq_len=64)
    d = decide(mm, budget)
    pruned = materialize(mm)
    f = flops_per_token(shape_of(pruned), 64)
    assert f <= budget.target_size(mm.dense) and f >= 0.99 * budget.target_size(mm.dense)


@pytest.mark.parametrize("family,head,structures", [
    ("llama", "lm", STRUCTURES), ("bert", "cls", ("neurons", "ffn")), ("gpt2", "lm", ("neurons",))])
def test_uniform_export_loads_with_stock_classes(tmp_path, family, head, structures):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from vtrans.masks.decide import decide_uniform
    from vtrans.models import to_stock
    model = make_tiny(family, head)
    x = _inputs(family)
    mm = attach_masks(model, structures)
    _randomise(mm)
    budget = Budget("params_ratio", 0.75)
    d = decide_uniform(mm, budget)
    assert d.fit["size"] <= d.fit["target"]
    masked_out = _outputs(model, x)
    stock = to_stock(materialize(mm))
    assert not type(stock).__name__.startswith("VTrans")
    stock.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path).eval()  # stock classes, no trust_remote_code
    assert type(reloaded).__name__ == type(stock).__name__
    torch.testing.assert_close(_outputs(reloaded, x), masked_out, rtol=1e-4, atol=1e-4)


def test_uniform_export_rejects_hidden_pruning_for_bert():
    from vtrans.masks.decide import decide_uniform
    mm = attach_masks(make_tiny("bert", "cls"))
    with pytest.raises(ValueError, match="uniform export of a bert model can only prune FFN neurons"):
        decide_uniform(mm, Budget("params_ratio", 0.75))


def test_monotone_decisions_never_readmit_cut_units():
    """Iterative pruning: a unit cut by an earlier decision was trained without, so a later (smaller) decision
    keeps a subset of the earlier kept set even when the cut units now rank first."""
    model = make_tiny("llama", "lm")
    mm = attach_masks(model)
    _randomise(mm)
    decide(mm, Budget("params_ratio", 0.8))
    first = {name: m.decided.clone() for name, m in mm.masks().items()}
    with torch.no_grad():  # cut units now look most informative
        for name, m in mm.masks().items():
            m.log_sigma2.copy_(torch.where(first[name], torch.zeros(m.n), torch.full((m.n,), -20.0)))
    d = decide(mm, Budget("params_ratio", 0.6), monotone=True)
    assert d.fit["size"] <= d.fit["target"]
    for name, m in mm.masks().items():
        assert not (m.decided & ~first[name]).any(), name
    decide(mm, Budget("params_ratio", 0.6))  # without monotone the cut units come back
    assert any((m.decided & ~first[name]).any() for name, m in mm.masks().items())


def test_cut_units_count_as_gone_in_the_soft_size():
    model = make_tiny("llama", "lm").train()
    mm = attach_masks(model)
    decide(mm, Budget("params_ratio", 0.7))
    model(**_inputs("llama"))
    for m in mm.masks().values():
        assert torch.equal(m.last_soft[~m.decided], torch.zeros(int((~m.decided).sum())))
    full = Budget("params_ratio", 0.7)
    ratio = float(full.size(mm.expected_shape()).detach()) / float(full.size(mm.dense))
    assert ratio <= 0.7 + 1e-3


@pytest.mark.parametrize("m", [8, 64])
@pytest.mark.parametrize("keep", [0.8, 0.5])
def test_multiple_of_refits_the_budget_instead_of_rounding_it_away(m, keep):
    """Rounding the hidden width alone down to a multiple of 64 can cost ~10 % of a model (each hidden channel runs
    through the embeddings and every layer); the decision refits the other units around the rounded widths, so the
    size lands within 1 % of the target, with multiples everywhere and the same hidden width as without rounding up
    to the nearest multiple."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2000, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    mm = attach_masks(LlamaForCausalLM(cfg))
    _randomise(mm, seed=3)
    budget = Budget("params_ratio", keep)
    plain = decide(mm, budget, use_threshold=False)
    for mask in mm.masks().values():
        mask.reset_decision()
    d = decide(mm, budget, use_threshold=False, multiple_of=m)
    assert 0.99 * d.fit["target"] <= d.fit["size"] <= d.fit["target"]
    assert abs(d.shape().hidden - plain.shape().hidden) <= m // 2 and d.shape().hidden % m == 0
    for name, mask in mm.masks().items():
        if name.endswith(".neurons") and bool(mm.masks()[name.replace("neurons", "ffn")].decided.all()):
            c = int(mask.decided.sum())
            assert c % m == 0 or c < m, (name, c)
    # an iterative (monotone) decision at a smaller size keeps a subset and the multiples
    before = {name: mask.decided.clone() for name, mask in mm.masks().items()}
    d2 = decide(mm, Budget("params_ratio", keep - 0.1), use_threshold=False, monotone=True, multiple_of=m)
    assert d2.fit["size"] <= d2.fit["target"] and d2.shape().hidden % m == 0
    for name, mask in mm.masks().items():
        assert not (mask.decided & ~before[name]).any(), name


def test_multiple_of_rounds_the_hidden_width_down_when_up_cannot_fit():
    """With only the hidden width masked nothing else can make room: the nearest multiple above would break the
    budget, so the width goes down instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    mm = attach_masks(LlamaForCausalLM(cfg), structures=("hidden",))
    _randomise(mm, seed=4)
    budget = Budget("params_ratio", 0.999)  # 575 hidden channels fit; 576, the nearest multiple of 64, does not
    assert decide(mm, budget, use_threshold=False).shape().hidden == 575
    mm.hidden.reset_decision()
    d = decide(mm, budget, use_threshold=False, multiple_of=64)
    assert d.shape().hidden == 512 and d.fit["size"] <= d.fit["target"]


def test_multiple_of_rounds_hidden_and_neurons_and_still_materialises_exactly():
    model = make_tiny("llama", "lm")
    x = _inputs("llama")
    mm = attach_masks(model)
    _randomise(mm)
    budget = Budget("params_ratio", 0.7)
    d = decide(mm, budget, multiple_of=8)
    assert d.fit["size"] <= d.fit["target"]
    counts = {name: int(m.decided.sum()) for name, m in mm.masks().items()}
    for name, c in counts.items():
        if name == "hidden" or name.endswith(".neurons"):
            assert c % 8 == 0 or c < 8, (name, c)
    masked_out = _outputs(model, x)
    pruned = materialize(mm)
    assert model_numel(pruned) == d.fit["size"]
    torch.testing.assert_close(_outputs(pruned, x), masked_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,head", CASES)
def test_block_gains_start_as_identity_and_materialise_exactly(family, head):
    """mask.gains: each block's per-channel output gain leaves the model unchanged at 1, and a decision with random
    gains (and random unit scales) materialises into a model computing what the hard-masked model computes."""
    model = make_tiny(family, head)
    x = _inputs(family)
    mm = attach_masks(model, init=MaskInit(gains=True))
    assert len(mm.gains()) == 2 * len(mm.dense.layers) and not set(mm.gain_parameters()) & set(mm.mask_parameters())
    with torch.no_grad():
        for m in mm.masks().values():
            m.mu.fill_(1.0)
        with mm.disabled():
            ref = _outputs(model, x)
        torch.testing.assert_close(_outputs(model, x), ref)
    _randomise(mm)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for gain in mm.gains().values():
            gain.scale.copy_(1 + 0.5 * torch.randn(gain.n, generator=g))
    d = decide(mm, Budget("params_ratio", 0.6))
    assert all(ld.attention_gain is not None and ld.ffn_gain is not None for ld in d.layers)
    masked_out = _outputs(model, x)
    pruned = materialize(mm)
    torch.testing.assert_close(_outputs(pruned, x), masked_out, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the gains are in the materialised weights: unit gains give another model
        for gain in mm.gains().values():
            gain.scale.fill_(1.0)
    last = pruned(**x, output_hidden_states=True).hidden_states[-1]
    differ = (materialize(mm)(**x, output_hidden_states=True).hidden_states[-1] - last).abs().max()
    assert differ > 1e-3 * last.abs().max()  # (post-norm tiny models: blocks write little to the stream)


def test_block_gains_train_with_the_masks():
    model = make_tiny("llama", "lm")
    mm = attach_masks(model, init=MaskInit(gains=True))
    model.train()
    out = model(**_inputs("llama"))
    out.logits.float().pow(2).mean().backward()
    for name, gain in mm.gains().items():
        assert gain.scale.grad is not None and gain.scale.grad.abs().sum() > 0, name
