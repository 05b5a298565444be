"""One-shot scoring baselines on tiny models: every method fills every mask with finite, seeded scores and leaves
the model as it was; the scores prune through decide + materialise exactly; magnitude ranks a zeroed unit last;
and on a tiny trained LM, calibrated scores (activation, taylor) prune far better than random ones."""
import pytest
import torch

from tests.tiny import make_tiny
from vtrans.masks.attach import MaskInit, attach_masks
from vtrans.masks.decide import Budget, decide
from vtrans.masks.materialize import materialize
from vtrans.masks.scoring import METHODS, score_masks, warm_start
from vtrans.objectives import lm_loss

CASES = [("llama", "lm"), ("llama", "cls"), ("gpt2", "lm"), ("gpt2", "cls"), ("bert", "cls"), ("bert", "qa"),
         ("roberta", "cls")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(head: str, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 90, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0  # padding is skipped by the statistics
        b = {"input_ids": ids, "attention_mask": mask}
        if head == "cls":
            b["labels"] = torch.randint(0, 3, (3,), generator=g)
        if head == "qa":
            b["start_positions"] = torch.randint(0, 8, (3,), generator=g)
            b["end_positions"] = torch.randint(0, 8, (3,), generator=g)
        out.append(b)
    return out


def _outputs(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if hasattr(out, "logits"):
        return out.logits
    return torch.cat([out.start_logits, out.end_logits], -1)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _scored(family, head, method, seed=0, structures=None):
    model = make_tiny(family, head)
    mm = attach_masks(model, init=MaskInit(method="score"), **({"structures": structures} if structures else {}))
    score_masks(mm, method, _batches(head), seed=seed)
    return model, mm


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family,head", CASES)
def test_scores_prune_through_decide_and_materialise_exactly(family, head, method):
    model = make_tiny(family, head)
    mm = attach_masks(model, init=MaskInit(method="score"))
    batch = _batches(head)[0]
    ref = _outputs(model, batch)
    hooks, grads = _hook_count(model), [p.requires_grad for p in model.parameters()]
    score_masks(mm, method, _batches(head), seed=0)
    # every mask gets finite scores of its length, not all equal
    for name, m in mm.masks().items():
        assert m.scores.shape == (m.n,), name
        assert torch.isfinite(m.scores).all(), name
    units = torch.cat([m.scores for m in mm.masks().values()])
    assert units.std() > 0
    # nothing else changed: same outputs, hooks, gradient flags, mode; no decision taken
    assert _hook_count(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not model.training and mm.enabled
    assert not any(bool(m.has_decision) for m in mm.masks().values())
    torch.testing.assert_close(_outputs(model, batch), ref)
    # decide meets the budget; the materialised model computes what the hard-masked model computes
    budget = Budget("params_ratio", 0.6)
    d = decide(mm, budget)
    assert d.fit["size"] <= d.fit["target"] and d.fit["size"] >= 0.98 * d.fit["target"]
    masked = _outputs(model, batch)
    pruned = materialize(mm)
    torch.testing.assert_close(_outputs(pruned, batch), masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_scores_are_deterministic(method):
    _, a = _scored("llama", "lm", method, seed=3)
    _, b = _scored("llama", "lm", method, seed=3)
    for (name, ma), mb in zip(a.masks().items(), b.masks().values()):
        torch.testing.assert_close(ma.scores, mb.scores, msg=name)
    if method == "random":
        _, c = _scored("llama", "lm", method, seed=4)
        assert not torch.equal(a.hidden.scores, c.hidden.scores)


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_warm_start_orders_vib_masks_as_the_scorer_does(method):
    model = make_tiny("llama", "lm")
    mm = attach_masks(model, init=MaskInit(method="vib", mu_std=0.0, log_sigma2_std=0.0))
    score_masks(mm, method, _batches("lm"), seed=0)
    scores = torch.cat([m.scores.clone() for m in mm.masks().values()])
    warm_start(mm, spread=3.0)
    importance = torch.cat([m.importance() for m in mm.masks().values()])
    log_sigma2 = torch.cat([m.log_sigma2.detach() for m in mm.masks().values()])
    # the VIB ranking (-log_alpha) is the scorer's ranking; every unit still kept; spread as asked, centred
    assert torch.equal(torch.argsort(importance, stable=True), torch.argsort(scores, stable=True)) or \
        torch.corrcoef(torch.stack([importance.argsort().argsort().float(),
                                    scores.argsort().argsort().float()]))[0, 1] > 0.999
    assert all(bool(m.kept().all()) for m in mm.masks().values())
    assert log_sigma2.max() - log_sigma2.min() == pytest.approx(3.0, abs=1e-4)
    assert log_sigma2.mean() == pytest.approx(-9.0, abs=0.05)
    assert all(not m.scores.any() for m in mm.masks().values())
    # a warm-started decision prunes what the scorer's own decision prunes
    ref = make_tiny("llama", "lm")
    ref_mm = attach_masks(ref, init=MaskInit(method="score"))
    score_masks(ref_mm, method, _batches("lm"), seed=0)
    budget = Budget("params_ratio", 0.6)
    decide(mm, budget)
    decide(ref_mm, budget)
    for (name, a), b in zip(mm.masks().items(), ref_mm.masks().values()):
        assert torch.equal(a.decided, b.decided), name


def test_warm_start_gives_equal_scores_equal_starts():
    model = make_tiny("llama", "lm")
    mm = attach_masks(model, init=MaskInit(method="vib", mu_std=0.0, log_sigma2_std=0.0))
    for m in mm.masks().values():
        m.scores.fill_(1.0)
    warm_start(mm, spread=2.0)
    values = torch.cat([m.log_sigma2.detach() for m in mm.masks().values()])
    torch.testing.assert_close(values, torch.full_like(values, -9.0))


def test_some_structures_only():
    model, mm = _scored("gpt2", "lm", "taylor", structures=["heads", "ffn"])
    assert set(mm.masks()) == {f"layers.{i}.{k}" for i in range(3) for k in ("heads", "ffn")}
    d = decide(mm, Budget("params_ratio", 0.8))
    assert d.fit["size"] <= d.fit["target"]


def _lowest(mm, name, index):
    """The unit's score is strictly below every other unit's."""
    target = float(mm.masks()[name].scores[index])
    others = [float(s) for n, m in mm.masks().items() for i, s in enumerate(m.scores) if (n, i) != (name, index)]
    assert target < min(others), (name, index, target, min(others))


@torch.no_grad()
def test_magnitude_ranks_a_zeroed_unit_last():
    # llama (GQA): head unit 1 of layer 1 = query heads 3-5 (channels 24-47) and KV head 1 (channels 8-15)
    model = make_tiny("llama", "lm")
    attn = model.model.layers[1].self_attn
    attn.q_proj.weight[24:48] = 0
    attn.k_proj.weight[8:16] = 0
    attn.v_proj.weight[8:16] = 0
    attn.o_proj.weight[:, 24:48] = 0
    mm = attach_masks(model, init=MaskInit(method="score"))
    score_masks(mm, "magnitude", None)
    _lowest(mm, "layers.1.heads", 1)

    # gpt2 (Conv1D stores [in, out]): neuron 7 of layer 2
    model = make_tiny("gpt2", "lm")
    mlp = model.transformer.h[2].mlp
    mlp.c_fc.weight[:, 7] = 0
    mlp.c_fc.bias[7] = 0
    mlp.c_proj.weight[7, :] = 0
    mm = attach_masks(model, init=MaskInit(method="score"))
    score_masks(mm, "magnitude", None)
    _lowest(mm, "layers.2.neurons", 7)

    # llama: hidden channel 5, in the (tied) embedding and every projection reading or writing the stream
    model = make_tiny("llama", "lm")
    model.model.embed_tokens.weight[:, 5] = 0
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                    layer.mlp.up_proj):
            lin.weight[:, 5] = 0
        layer.self_attn.o_proj.weight[5] = 0
        layer.mlp.down_proj.weight[5] = 0
    mm = attach_masks(model, init=MaskInit(method="score"))
    score_masks(mm, "magnitude", None)
    _lowest(mm, "hidden", 5)


def test_bad_method_or_missing_data_is_rejected():
    model = make_tiny("llama", "lm")
    mm = attach_masks(model, init=MaskInit(method="score"))
    with pytest.raises(ValueError, match=r"unknown scoring method 'wanda'.*accepted: \['random', 'magnitude'"):
        score_masks(mm, "wanda", _batches("lm"))
    for method in ("activation", "taylor"):
        with pytest.raises(ValueError, match=f"scoring method '{method}' needs calibration batches"):
            score_masks(mm, method, None)
        with pytest.raises(ValueError, match="no calibration"):
            score_masks(mm, method, [])
    cls = attach_masks(make_tiny("bert", "cls"), init=MaskInit(method="score"))
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in _batches("cls")]
    with pytest.raises(ValueError, match="needs labels"):
        score_masks(cls, "taylor", no_labels)


# ----- quality: a tiny LM trained on a repetitive sequence ---------------------------------------------------

_SUCCESSOR = torch.randperm(97, generator=torch.Generator().manual_seed(123))


def _repetitive(g: torch.Generator, n: int, length: int = 32) -> torch.Tensor:
    """Each token is followed by its fixed successor (80 %) or a random token."""
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, 97, (n,), generator=g)
    jump = torch.randint(0, 97, (n, length), generator=g)
    follow = torch.rand(n, length, generator=g) < 0.8
    for t in range(1, length):
        x[:, t] = torch.where(follow[:, t], _SUCCESSOR[x[:, t - 1]], jump[:, t])
    return x


@pytest.fixture(scope="module")
def trained_llama():
    model = make_tiny("llama", "lm", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(50):
        x = _repetitive(g, 16)
        loss = lm_loss(model(input_ids=x).logits, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in (_repetitive(g, 8) for _ in range(2))]
    held_out = [_repetitive(g, 16) for _ in range(2)]
    return model, calib, held_out


@torch.no_grad()
def _loss(model, held_out):
    return sum(float(lm_loss(model(input_ids=x).logits, x)) for x in held_out) / len(held_out)


def test_calibrated_scores_prune_better_than_random(trained_llama):
    model, calib, held_out = trained_llama
    dense = _loss(model, held_out)
    mm = attach_masks(model, init=MaskInit(method="score"))

    def pruned_loss(method, seed=0):
        score_masks(mm, method, calib, seed=seed)
        decide(mm, Budget("params_ratio", 0.7))
        loss = _loss(model, held_out)
        for m in mm.masks().values():
            m.reset_decision()
        return loss

    random = sum(pruned_loss("random", s) for s in range(3)) / 3
    assert random > dense + 0.1  # random pruning to 70 % hurts
    for method in ("activation", "taylor"):
        loss = pruned_loss(method)
        # and a calibrated score undoes at least half of that damage
        assert loss < random - 0.5 * (random - dense), (method, loss, random, dense)


def test_model_labels_draw_from_the_predictions_and_are_seeded_by_the_tokens():
    from vtrans.masks.scoring import model_labels
    ids = torch.tensor([[5, 6, 7, 8]])
    one_hot = torch.full((1, 3, 10), -1e4)
    one_hot[0, :, 4] = 0.0
    assert model_labels(one_hot, ids, seed=0).tolist() == [[4, 4, 4]]  # a certain prediction is its label
    two = torch.log(torch.tensor([0.2, 0.8])).expand(1, 20000, 2).contiguous()
    draws = model_labels(two, torch.arange(20001).unsqueeze(0), seed=0)
    assert draws.float().mean().item() == pytest.approx(0.8, abs=0.01)  # drawn at the predicted frequencies
    logits = torch.randn(1, 50, 30)
    assert torch.equal(model_labels(logits, ids, 3), model_labels(logits, ids, 3))
    assert not torch.equal(model_labels(logits, ids, 3), model_labels(logits, ids, 4))
    assert not torch.equal(model_labels(logits, ids, 3), model_labels(logits, ids + 1, 3))


def test_fisher_labels_model_does_not_depend_on_how_sequences_are_batched():
    """The draws are seeded per sequence, so ranks sharing the calibration batches differently agree."""
    rows = torch.cat([b["input_ids"] for b in _batches("lm", n=2)])
    together = [{"input_ids": rows, "attention_mask": torch.ones_like(rows)}]
    apart = [{"input_ids": rows[i:i + 2], "attention_mask": torch.ones_like(rows[i:i + 2])} for i in (0, 2, 4)]
    scores = []
    for batches in (together, apart):
        mm = attach_masks(make_tiny("llama", "lm"), init=MaskInit(method="score"))
        score_masks(mm, "taylor", batches, seed=1, fisher_labels="model")
        scores.append(torch.cat([m.scores for m in mm.masks().values()]))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-6)


def test_fisher_labels_model_estimates_the_fisher_of_the_models_own_predictions():
    """With labels drawn from the model, 1/2 E[(dL/dz)^2] estimates the Fisher, sum over positions and tokens of
    p (d log p / dz)^2 (the curvature of the KL from the ungated model), computed here exactly over the vocabulary;
    the text's own labels estimate something else."""
    from vtrans.masks.scoring import _Geometry, _scoring_state, _taylor
    mm = attach_masks(make_tiny("llama", "lm"), init=MaskInit(method="score"))
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    geo = _Geometry(mm)
    o = geo.o(0)
    kv = geo.dense.layers[0].kv_heads

    def log_probs(z):  # the heads of layer 0 gated by z, as the scorer gates them
        def pre(module, args):
            x = args[0]
            return (x.reshape(*x.shape[:-1], kv, -1) * z.unsqueeze(-1)).reshape(x.shape),
        h = o.register_forward_pre_hook(pre)
        try:
            return torch.log_softmax(mm.model(input_ids=ids).logits[0, :-1].float(), -1)
        finally:
            h.remove()

    with _scoring_state(mm):
        jac = torch.autograd.functional.jacobian(log_probs, torch.ones(kv))  # [positions, vocab, kv]
        p = log_probs(torch.ones(kv)).exp().detach()
        positions = p.shape[0]
        exact = 0.5 * (p.unsqueeze(-1) * jac.pow(2)).sum((0, 1)) / positions ** 2  # the loss is a mean over positions
        draws = torch.stack([_taylor(geo, batch, None, "model", seed).heads[0] for seed in range(400)]).mean(0)
        data = _taylor(geo, batch, None, "data", 0).heads[0]
    torch.testing.assert_close(draws, exact, rtol=0.2, atol=0)
    assert not torch.allclose(data, exact, rtol=0.2, atol=0)


def test_fisher_labels_are_checked():
    mm = attach_masks(make_tiny("llama", "lm"), init=MaskInit(method="score"))
    with pytest.raises(ValueError, match=r"unknown fisher_labels 'teacher'; accepted: \['data', 'model'\]"):
        score_masks(mm, "taylor", _batches("lm"), fisher_labels="teacher")
    cls = attach_masks(make_tiny("llama", "cls"), init=MaskInit(method="score"))
    with pytest.raises(ValueError, match=r"fisher_labels='model' draws next tokens from a causal LM.*'cls'"):
        score_masks(cls, "taylor", _batches("cls"), fisher_labels="model")
