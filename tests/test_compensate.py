"""Output compensation (vtrans.masks.compensate, mask.compensate): the refit is the least-squares optimum, it brings
every family's pruned blocks closer to the dense ones on the calibration text (and the model's outputs on other
text), it leaves an unpruned block alone, and the prune job saves the refitted model."""
import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_prune_job import _cfg
from tests.tiny import make_tiny, save_tiny_with_tokenizer
from vtrans.config import Config, MixSource, load_config
from vtrans.jobs import run
from vtrans.masks.attach import MaskInit, attach_masks
from vtrans.masks.compensate import _refit, compensate
from vtrans.masks.decide import Budget, decide
from vtrans.masks.materialize import materialize


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from vtrans.data import load_documents
    p = tmp_path_factory.mktemp("data") / "news.txt"
    p.write_text("\n".join(d.text for d in load_documents("gensim:lee_background.cor")[:120]))
    return p


def _inputs(seed, n=8, length=16):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 90, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}


def _outputs(model, x):
    out = model(**x)
    return out.logits if hasattr(out, "logits") else torch.cat([out.start_logits, out.end_logits], -1)


def _random_masks(mm, seed: int, mu=None) -> None:
    """Spread every mask's log sigma^2 at random (so that a budget cuts a random-looking mix of units); mu 1, or
    `mu(generator, n)` per mask."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mm.masks().values():
            m.log_sigma2.copy_(torch.randn(m.n, generator=g) * 3 - 1)
            m.mu.copy_(mu(g, m.n) if mu else torch.ones(m.n))


def test_the_refit_is_the_least_squares_fit_of_the_whole_projection():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)  # [out, units]
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    new = _refit(w, x.t() @ x, kept, damp=1e-12)
    best = torch.linalg.lstsq(x[:, kept], x @ w.t()).solution.t()
    torch.testing.assert_close(new, best, rtol=1e-6, atol=1e-8)
    # the refit's error is the smallest any weights on the kept units reach; plain cutting is worse
    err = lambda ws: (x[:, kept] @ ws.t() - x @ w.t()).pow(2).sum()  # noqa: E731
    assert err(new) < err(w[:, kept])
    # a larger ridge pulls the refit back towards the plain cut
    far = _refit(w, x.t() @ x, kept, damp=1e6)
    torch.testing.assert_close(far, w[:, kept], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,head,hidden_cut", [("llama", "lm", False), ("llama", "lm", True),
                                                    ("gpt2", "lm", True), ("bert", "cls", True)])
def test_compensation_brings_every_family_closer_to_the_dense_model(family, head, hidden_cut):
    model = make_tiny(family, head).eval()
    calibration, other = [_inputs(s) for s in range(4)], _inputs(99)
    with torch.no_grad():
        dense_cal = [_outputs(model, b) for b in calibration]
        dense_other = _outputs(model, other)
    mm = attach_masks(model)
    _random_masks(mm, 1)
    if not hidden_cut:
        with torch.no_grad():
            mm.hidden.log_sigma2.fill_(-9.0)
    d = decide(mm, Budget("params_ratio", 0.7))
    assert len(d.hidden) < d.dense.hidden if hidden_cut else len(d.hidden) == d.dense.hidden
    with mm.disabled():
        pruned = materialize(mm, d)

        def error(x, ref):
            with torch.no_grad():
                return (_outputs(pruned, x) - ref).pow(2).mean().item()

        before = [error(b, r) for b, r in zip(calibration, dense_cal)], error(other, dense_other)
        info = compensate(pruned, model, d, calibration)
        after = [error(b, r) for b, r in zip(calibration, dense_cal)], error(other, dense_other)
        with torch.no_grad():  # the dense model is untouched (copies of its blocks ran, not it)
            torch.testing.assert_close(_outputs(model, other), dense_other)
    assert info["compensated_ffn"] > 0 and info["compensation_tokens"] == 4 * 8 * 16
    assert sum(after[0]) < sum(before[0])  # on the calibration text
    # on text it never saw: better, or (LLaMA with hidden channels cut, whose error is mostly the cut channels, which
    # no refit of the blocks' outputs restores) no worse than noise
    assert after[1] < before[1] if (family != "llama" or not hidden_cut) else after[1] < 1.01 * before[1]


def test_each_refitted_ffn_is_the_best_fit_to_its_dense_block_on_the_inputs_it_gets():
    """In the compensated model, every cut FFN's output projection is the least-squares optimum (tiny ridge) against
    the dense FFN on the very inputs that FFN receives, which come after every earlier refit: the error's gradient in
    those weights vanishes, where the plain cut's does not."""
    model = make_tiny("llama", "lm").eval()
    dense = copy.deepcopy(model)
    calibration = [_inputs(s) for s in range(4)]
    mm = attach_masks(model)
    _random_masks(mm, 1)
    with torch.no_grad():
        mm.hidden.log_sigma2.fill_(-9.0)  # every hidden channel kept: the blocks' outputs compare channel for channel
    d = decide(mm, Budget("params_ratio", 0.7))
    with mm.disabled():
        pruned = materialize(mm, d)
        cut = copy.deepcopy(pruned)
        compensate(pruned, model, d, calibration, damp=1e-9)
    checked = 0
    for j, i in enumerate(d.kept_layers()):
        if not 0 < len(d.layers[i].neurons) < d.dense.layers[i].intermediate:
            continue
        mlp, ref = pruned.model.layers[j].mlp, dense.model.layers[i].mlp
        xs = []
        hook = mlp.register_forward_pre_hook(lambda m, args: xs.append(args[0]))
        with torch.no_grad():
            for b in calibration:
                pruned(**b)
        hook.remove()
        x = torch.cat(xs).double()
        with torch.no_grad():
            m64 = copy.deepcopy(mlp).double()
            units = m64.act_fn(m64.gate_proj(x)) * m64.up_proj(x)
            target = copy.deepcopy(ref).double()(x)

        def gradient(w):
            w = w.detach().double().requires_grad_()
            (units @ w.t() - target).pow(2).sum().backward()
            return w.grad.norm().item()

        refitted = gradient(mlp.down_proj.weight)
        plain = gradient(cut.model.layers[j].mlp.down_proj.weight)
        assert refitted < 1e-3 * plain, (j, refitted, plain)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("family,gains", [("llama", False), ("gpt2", False), ("llama", True)])
def test_with_the_mask_scales_a_large_ridge_returns_the_materialised_model(family, gains):
    """The masks' own scales (not 1) on every unit (and with mask.gains random block gains): the refit's reference is
    the masked block, and its ridge pulls towards the materialised weights; without the scales a large ridge resets
    the kept units' scales to 1."""
    from vtrans.masks.compensate import mask_scales
    model = make_tiny(family, "lm").eval()
    calibration = [_inputs(s) for s in range(2)]
    mm = attach_masks(model, init=MaskInit(gains=gains))
    _random_masks(mm, 3, mu=lambda g, n: 0.3 + torch.rand(n, generator=g))
    with torch.no_grad():
        for gain in mm.gains().values():
            gain.scale.uniform_(0.5, 1.5)
    d = decide(mm, Budget("params_ratio", 0.7))
    with mm.disabled():
        materialised = materialize(mm, d)
        with_scales, without = copy.deepcopy(materialised), copy.deepcopy(materialised)
        info = compensate(with_scales, model, d, calibration, damp=1e9, unit_scales=mask_scales(mm))
        compensate(without, model, d, calibration, damp=1e9)
    assert info["compensated_ffn"] > 0
    ref = materialised.state_dict()
    for k, v in with_scales.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(v, ref[k], rtol=1e-3, atol=1e-4) for k, v in without.state_dict().items())
    # and with a small ridge the scaled reference still brings the blocks closer to the masked model's outputs
    refit = copy.deepcopy(materialised)
    with mm.disabled():
        compensate(refit, model, d, calibration, damp=1e-6, unit_scales=mask_scales(mm))
    assert any(not torch.allclose(v, ref[k]) for k, v in refit.state_dict().items())


def test_an_unpruned_model_is_left_as_materialised():
    model = make_tiny("llama", "lm").eval()
    mm = attach_masks(model)
    with torch.no_grad():
        for m in mm.masks().values():
            m.mu.fill_(1.0)
            m.log_sigma2.fill_(-9.0)
    d = mm.decision()
    assert all(len(l.neurons) == d.dense.layers[0].intermediate for l in d.layers)
    pruned = materialize(mm, d)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    info = compensate(pruned, model, d, [_inputs(0)])
    assert info["compensated_ffn"] == info["compensated_attention"] == 0
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_prune_job_saves_the_compensated_model(tiny_llama_dir, text_file, tmp_path):
    kw = dict(source=str(text_file), budget__count_embeddings=False, budget__target=0.7)
    plain = run(_cfg(tiny_llama_dir, tmp_path / "plain", **kw))
    refit = run(_cfg(tiny_llama_dir, tmp_path / "refit", mask__compensate=True, mask__compensate_blocks=16, **kw))
    assert "compensated_ffn" not in plain
    assert refit["compensated_ffn"] > 0 and refit["compensation_tokens"] == 16 * 32
    assert refit["shape_pruned"] == plain["shape_pruned"]  # the same decision, other weights
    assert refit["ppl_pruned"] != plain["ppl_pruned"]
    written = json.loads((tmp_path / "refit" / "metrics.json").read_text())
    assert written["compensated_ffn"] == refit["compensated_ffn"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "model", trust_remote_code=True)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "refit" / "model", trust_remote_code=True)
    down = [n for n, _ in a.named_parameters() if "down_proj" in n]
    assert any(not torch.equal(dict(a.named_parameters())[n], dict(b.named_parameters())[n]) for n in down)
    up = [n for n, _ in a.named_parameters() if "up_proj" in n]  # only the output projections are refitted
    assert all(torch.equal(dict(a.named_parameters())[n], dict(b.named_parameters())[n]) for n in up)


def test_a_refit_that_raises_the_loss_on_unseen_training_text_is_undone(tiny_llama_dir, text_file, tmp_path,
                                                                         monkeypatch):
    """The check: the refit must lower the next-token loss on training sequences it did not draw, else the
    materialised weights come back, exactly."""
    import vtrans.pipeline as P

    kw = dict(source=str(text_file), budget__count_embeddings=False, budget__target=0.7)
    plain = run(_cfg(tiny_llama_dir, tmp_path / "plain", **kw))
    real = P.refit_outputs

    def harmful(pruned, *a, **k):  # a refit that wrecks the FFN output projections (large random weights)
        info = real(pruned, *a, **k)
        with torch.no_grad():
            for n, p in pruned.named_parameters():
                if "down_proj" in n:
                    p.normal_(0.0, 1.0)
        return info
    monkeypatch.setattr(P, "refit_outputs", harmful)
    m = run(_cfg(tiny_llama_dir, tmp_path / "bad", mask__compensate=True, mask__compensate_blocks=16, **kw))
    assert m["compensation_kept"] is False and m["compensation_check_blocks"] == 64
    assert m["compensation_check_nll_after"] > m["compensation_check_nll_before"]
    assert m["ppl_pruned"] == plain["ppl_pruned"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "model", trust_remote_code=True)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "bad" / "model", trust_remote_code=True)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n
    monkeypatch.undo()
    good = run(_cfg(tiny_llama_dir, tmp_path / "good", mask__compensate=True, mask__compensate_blocks=16, **kw))
    assert good["compensation_kept"] is (good["compensation_check_nll_after"] < good["compensation_check_nll_before"])
    off = run(_cfg(tiny_llama_dir, tmp_path / "off", mask__compensate=True, mask__compensate_blocks=16,
                   mask__compensate_guard_blocks=0, **kw))
    assert off["compensated_ffn"] > 0 and "compensation_kept" not in off


def test_the_refit_uses_each_training_sequence_once(tiny_llama_dir, text_file, tmp_path, caplog):
    kw = dict(source=str(text_file), budget__count_embeddings=False, budget__target=0.7, data__max_train_blocks=8)
    with caplog.at_level("WARNING", logger="vtrans"):
        refit = run(_cfg(tiny_llama_dir, tmp_path / "few", mask__compensate=True, mask__compensate_blocks=64, **kw))
    assert refit["compensation_tokens"] == 8 * 32  # not 64 sequences: 8 of them eight times would fit the same
    assert "mask.compensate_blocks=64, but the refit's data (the training data) holds 8 distinct" in caplog.text


def test_the_refit_drops_the_rows_a_mixture_repeats(tiny_llama_dir, tmp_path):
    """A source smaller than its share of a mixture is repeated; the refit takes each distinct sequence once."""
    import random
    words = "the a news report said on monday that his her they minister police court market city".split()
    rng = random.Random(0)
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"  # random words: no two blocks alike
    for path, docs in ((big, 40), (small, 4)):  # one document per line
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(150)) for _ in range(docs)))
    mix = [MixSource(source=str(big), weight=1.0), MixSource(source=str(small), weight=1.0)]
    m = run(_cfg(tiny_llama_dir, tmp_path / "mix", source=str(big), budget__count_embeddings=False,
                 budget__target=0.7, data__mix=mix, mask__compensate=True, mask__compensate_blocks=4096))
    blocks = {s["source"]: s["blocks"] for s in m["train_sources"]}
    sequences = {s["source"]: s["sequences"] for s in m["train_sources"]}
    assert sequences[str(small)] > blocks[str(small)]  # repeated in the training data
    distinct = blocks[str(big)] + blocks[str(small)]
    assert m["compensation_tokens"] == distinct // 2 * 2 * 32  # batches of 2 sequences of 32 tokens


def test_the_refit_draws_from_mask_compensate_source(tiny_llama_dir, text_file, tmp_path, caplog):
    """mask.compensate_source=teacher:N refits on the dense model's own samples, not the training text."""
    kw = dict(source=str(text_file), budget__count_embeddings=False, budget__target=0.7,
              data__cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="vtrans"):
        m = run(_cfg(tiny_llama_dir, tmp_path / "teacher", mask__compensate=True, mask__compensate_blocks=64,
                     mask__compensate_source="teacher:6", **kw))
    assert [s["source"] for s in m["train_sources"]] == [str(text_file)]
    # six samples of 32 tokens, stored as text, re-tokenised and joined by EOS: a few 32-token blocks
    found = re.search(r"but the refit's data \(teacher:6\) holds (\d+) distinct sequences", caplog.text)
    assert found, caplog.text
    assert 6 <= int(found.group(1)) <= 12
    assert m["compensation_tokens"] == int(found.group(1)) // 2 * 2 * 32  # each once, in batches of two
    assert any((tmp_path / "cache").rglob("*")), "the samples are cached"


def test_fast_vtrans_refits_on_the_whole_training_data(tiny_llama_dir, text_file, tmp_path):
    """Fast-VTrans trains on a few percent of the data; the refit, a stage with its own budget, draws from all of it."""
    kw = dict(source=str(text_file), budget__count_embeddings=False, budget__target=0.7)
    fast = run(_cfg(tiny_llama_dir, tmp_path / "fast", mask__variant="fast", mask__compensate=True,
                    mask__compensate_blocks=64, **kw))
    trained_on = sum(s["blocks"] for s in fast["train_sources"])
    assert trained_on < 64 and fast["compensation_tokens"] == 64 * 32, (trained_on, fast["compensation_tokens"])


@pytest.mark.parametrize("key,value,words", [("mask.compensate_blocks", 0, "compensate_blocks=0"),
                                             ("mask.compensate_guard_blocks", -1, "compensate_guard_blocks=-1"),
                                             ("mask.compensate_damp", 0.0, "compensate_damp=0.0")])
def test_bad_compensation_settings_fail_naming_the_key(key, value, words):
    from omegaconf import OmegaConf
    raw = OmegaConf.structured(Config())
    OmegaConf.update(raw, key, value)
    with pytest.raises(ValueError, match=words):
        load_config(raw)


def test_compensation_refuses_zero3_before_anything_loads():
    from omegaconf import OmegaConf
    raw = OmegaConf.structured(Config())
    OmegaConf.update(raw, "mask.compensate", True)
    OmegaConf.update(raw, "deepspeed.enabled", True)
    OmegaConf.update(raw, "deepspeed.stage", 3)
    with pytest.raises(ValueError, match="mask.compensate=true .* ZeRO-3"):
        load_config(raw)


def test_the_stream_correction_fits_each_block_to_the_dense_stream():
    """mask.compensate_correct=1: every cut FFN's output projection is the least-squares optimum (tiny ridge) for
    putting its layer's output stream where the dense model's is, in the pruned model's coordinates (kept hidden
    channels times the hidden mask's scale, not 1 here): the error's gradient in those weights vanishes, where the
    block-local refit's does not."""
    model = make_tiny("llama", "lm").eval()
    dense = copy.deepcopy(model)
    calibration = [_inputs(s) for s in range(4)]
    mm = attach_masks(model)
    _random_masks(mm, 1, mu=lambda g, n: 0.6 + 0.8 * torch.rand(n, generator=g))
    d = decide(mm, Budget("params_ratio", 0.7))
    assert len(d.hidden) < d.dense.hidden
    hk, hmu = d.hidden.index, d.hidden.scale.float()
    with mm.disabled():
        pruned = materialize(mm, d)
        local = copy.deepcopy(pruned)
        info = compensate(pruned, model, d, calibration, damp=1e-9, correct=1.0, unmasked=mm.disabled)
        compensate(local, model, d, calibration, damp=1e-9)
    assert info["compensation_correct"] == 1.0

    def captured(net, j):
        """Layer j's FFN unit outputs (down_proj's input) and its output stream, over the calibration batches."""
        xs, outs = [], []
        layer = net.model.layers[j]
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0])),
                 layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))]
        with torch.no_grad():
            for b in calibration:
                net(**b)
        for h in hooks:
            h.remove()
        return torch.cat(xs).double().flatten(0, 1), torch.cat(outs).double().flatten(0, 1)

    checked = 0
    for j, i in enumerate(d.kept_layers()):
        if not 0 < len(d.layers[i].neurons) < d.dense.layers[i].intermediate:
            continue
        _, t = captured(dense, i)
        t = t.index_select(-1, hk) * hmu.double()
        grads = []
        for net in (pruned, local):
            x, h = captured(net, j)
            grads.append((x.t() @ (h - t)).norm().item() / (x.t() @ t).norm().item())
        assert grads[0] < 1e-4 and grads[0] < 1e-3 * grads[1], (j, grads)
        checked += 1
    assert checked >= 2


def test_the_stream_correction_moves_the_refit_between_the_two_targets():
    """0 is the block-local refit exactly; a share in between lands between the two ends."""
    model = make_tiny("llama", "lm").eval()
    calibration = [_inputs(s) for s in range(2)]
    mm = attach_masks(model)
    _random_masks(mm, 2)
    d = decide(mm, Budget("params_ratio", 0.7))
    fits = {}
    with mm.disabled():
        base = materialize(mm, d)
        for c in (0.0, 0.5, 1.0):
            net = copy.deepcopy(base)
            compensate(net, model, d, calibration, damp=1e-3, correct=c, unmasked=mm.disabled if c else None)
            fits[c] = net.state_dict()
        plain = copy.deepcopy(base)
        compensate(plain, model, d, calibration, damp=1e-3)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(fits[0.0][k], v)
    first = next(k for k in fits[1.0] if k.endswith("layers.0.mlp.down_proj.weight"))
    a, m, b = (fits[c][first] for c in (0.0, 0.5, 1.0))
    assert not torch.allclose(a, b)
    assert (m - a).norm() < (b - a).norm() and (m - b).norm() < (b - a).norm()


def test_the_stream_correction_refuses_a_post_norm_family():
    model = make_tiny("bert", "cls").eval()
    mm = attach_masks(model)
    _random_masks(mm, 1)
    d = decide(mm, Budget("params_ratio", 0.7))
    with mm.disabled():
        pruned = materialize(mm, d)
        with pytest.raises(ValueError, match="needs a pre-norm family; bert"):
            compensate(pruned, model, d, [_inputs(0)], correct=0.5, unmasked=mm.disabled)


def test_the_prune_job_runs_the_stream_correction(tiny_llama_dir, text_file, tmp_path):
    kw = dict(source=str(text_file), budget__count_embeddings=False, budget__target=0.7, mask__variant="faster",
              mask__compensate=True, mask__compensate_blocks=16, mask__compensate_guard_blocks=0)
    local = run(_cfg(tiny_llama_dir, tmp_path / "local", **kw))
    corrected = run(_cfg(tiny_llama_dir, tmp_path / "corrected", mask__compensate_correct=0.5, **kw))
    assert corrected["compensation_correct"] == 0.5 and "compensation_correct" not in local
    assert corrected["shape_pruned"] == local["shape_pruned"]
    assert corrected["ppl_pruned"] != local["ppl_pruned"]


@pytest.mark.parametrize("sets,words", [
    ({"mask.compensate": True, "mask.compensate_correct": 1.5}, r"compensate_correct=1.5 must lie in \[0, 1\]"),
    ({"mask.compensate_correct": 0.5}, "mask.compensate=false turns off"),
    ({"mask.compensate": True, "mask.compensate_correct": 0.5, "mask.variant": "vtrans"},
     "mask.variant='vtrans' trains the weights"),
])
def test_bad_stream_correction_settings_fail_early(sets, words):
    from omegaconf import OmegaConf
    raw = OmegaConf.structured(Config())
    for k, v in sets.items():
        OmegaConf.update(raw, k, v)
    with pytest.raises(ValueError, match=words):
        load_config(raw)


def test_a_stopped_refit_leaves_both_models_as_it_found_them():
    """A stop (the check raising between layers) ends the refit; the pruned and the dense model keep their training
    mode and KV-cache setting."""
    model = make_tiny("llama", "lm")
    mm = attach_masks(model)
    _random_masks(mm, 1)
    d = decide(mm, Budget("params_ratio", 0.7))
    with mm.disabled():
        pruned = materialize(mm, d)
    pruned.train()
    model.train()
    cache = (pruned.config.use_cache, model.config.use_cache)

    def stop():
        raise KeyboardInterrupt

    with mm.disabled(), pytest.raises(KeyboardInterrupt):
        compensate(pruned, model, d, [_inputs(0)], check=stop, correct=0.5, unmasked=mm.disabled)
    assert pruned.training and model.training
    assert (pruned.config.use_cache, model.config.use_cache) == cache
