"""Extractive question answering (SQuAD v1.1) end to end: the official answer normalisation and exact match / F1,
loading both SQuAD json layouts, the article-level split, window preprocessing with answer-span labels, span
post-processing, and the prune job on a tiny BERT QA model whose pruned model reloads in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.tiny import save_tiny_with_tokenizer, tokenizer_dir
from vtrans.config import load_config
from vtrans.data import QAExample, load_qa_examples, qa_features, split_qa_examples
from vtrans.evaluation import exact_match_score, f1_answer_score, normalize_answer, squad_predictions, squad_scores

CONF = Path(__file__).resolve().parents[1] / "conf"
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Quito", "Nairobi", "Perth", "Tallinn", "Hanoi", "Dakar", "Lima", "Turin", "Accra"]
ANIMALS = ["owl", "otter", "fox", "heron", "badger", "lynx"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def synthetic_squad() -> dict:
    """The official nested SQuAD v1.1 layout: 6 articles x 2 passages x 3 questions = 36 questions."""
    articles = []
    for a in range(6):
        paragraphs = []
        for p in range(2):
            i = 2 * a + p
            name, city, animal = NAMES[i], CITIES[i], ANIMALS[(i + p) % len(ANIMALS)]
            year = 1950 + 3 * i
            context = (f"{name} was born in {city} in {year}. As a child {name} kept a pet {animal} and walked it "
                       f"along the river every morning. Later {name} moved away to study music, but returned to "
                       f"{city} to teach.")
            qas = [(f"Where was {name} born?", city), (f"In which year was {name} born?", str(year)),
                   (f"What pet did {name} keep?", f"a pet {animal}")]
            paragraphs.append({"context": context, "qas": [
                {"id": f"q{i}-{k}", "question": q, "answers": [{"text": t, "answer_start": context.index(t)}]}
                for k, (q, t) in enumerate(qas)]})
        articles.append({"title": f"Article_{a}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": articles}


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory):
    """The same questions as the official nested .json and as HF-style flat .jsonl records."""
    root = tmp_path_factory.mktemp("qa_data")
    nested = synthetic_squad()
    (root / "squad.json").write_text(json.dumps(nested))
    with open(root / "squad.jsonl", "w") as f:
        for article in nested["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    f.write(json.dumps({"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                                        "question": qa["question"],
                                        "answers": {"text": [a["text"] for a in qa["answers"]],
                                                    "answer_start": [a["answer_start"] for a in qa["answers"]]}})
                            + "\n")
    return root


# ---------------------------------------------------------------------------------------------- metrics


def test_normalisation_follows_the_official_script():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("  Theatre (the) ") == "theatre"  # articles only as whole words
    assert normalize_answer("U.S.-based") == "usbased"  # punctuation removed, not replaced by spaces
    assert normalize_answer("A") == ""


def test_exact_match_and_f1_on_hand_made_cases():
    assert exact_match_score("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    assert f1_answer_score("Broncos", "the Denver Broncos") == pytest.approx(2 / 3)  # p 1, r 1/2
    assert f1_answer_score("in Denver in 1990", "Denver 1990") == pytest.approx(2 * 0.5 * 1 / 1.5)  # p 2/4, r 1
    assert f1_answer_score("Panthers", "Denver Broncos") == 0.0
    assert f1_answer_score("a", "Denver") == 0.0  # nothing left after normalisation
    examples = [QAExample("a", "q", "c", ["Denver Broncos", "The Broncos"], [0, 0]),
                QAExample("b", "q", "c", ["1990", "in 1990"], [0, 0]),
                QAExample("c", "q", "c", ["Paris"], [0])]
    s = squad_scores({"a": "broncos", "b": "1990 season"}, examples)  # "c" has no prediction: scores 0
    assert s["n"] == 3
    # the official script's 0-100 scale
    assert s["exact_match"] == pytest.approx(100 / 3)  # "broncos" == the normalised "The Broncos"
    assert s["f1"] == pytest.approx(100 * (1.0 + 2 / 3 + 0.0) / 3)  # max over gold answers: "1990" gives 2/3


# ---------------------------------------------------------------------------------------------- data


def test_nested_and_flat_json_load_the_same_questions(squad_files):
    nested = load_qa_examples(str(squad_files / "squad.json"))
    flat = load_qa_examples(str(squad_files / "squad.jsonl"))
    assert len(nested) == 36 and nested == flat
    ex = nested[4]
    assert ex.title == "Article_0" and ex.context[ex.answer_starts[0]:].startswith(ex.answers[0])


def test_hub_sources_go_through_datasets(squad_files, monkeypatch):
    """hf:<dataset>[:<config>]:<split> (connected clusters): the hub call is replaced by the same records in memory."""
    import datasets

    import vtrans.data as D

    records = [json.loads(line) for line in (squad_files / "squad.jsonl").read_text().splitlines()]
    asked = []

    def fake_hub(match):
        asked.append((match["name"], match["config"], match["split"]))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(D, "_hf_dataset", fake_hub)
    hub = load_qa_examples("hf:rajpurkar/squad:validation", limit=10)
    assert asked == [("rajpurkar/squad", None, "validation")]
    assert hub == load_qa_examples(str(squad_files / "squad.json"))[:10]


def test_bad_qa_sources_fail_naming_the_value(squad_files, tmp_path):
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'.*accepted: a local .json"):
        load_qa_examples(str(tmp_path / "squad.txt"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "context": "c", "query": "q?",
                                                    "answers": {"text": [], "answer_start": []}}))
    with pytest.raises(ValueError, match=r"no field\(s\) \['question'\].*available fields: \['answers', 'context'"):
        load_qa_examples(str(tmp_path / "bad.jsonl"))
    assert load_qa_examples(str(tmp_path / "bad.jsonl"), question_field="query")[0].question == "q?"
    with pytest.raises(ValueError, match="malformed SQuAD json"):
        (tmp_path / "nested.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}))
        load_qa_examples(str(tmp_path / "nested.json"))


def test_split_keeps_articles_and_passages_on_one_side(squad_files):
    examples = load_qa_examples(str(squad_files / "squad.json"))
    train, held = split_qa_examples(examples, 0.2, seed=0)
    assert len(train) + len(held) == 36 and held
    assert not {e.title for e in train} & {e.title for e in held}
    assert not {e.context for e in train} & {e.context for e in held}
    assert split_qa_examples(examples, 0.2, seed=0) == (train, held)  # deterministic
    # without titles, passages are the unit
    untitled = [QAExample(e.id, e.question, e.context, e.answers, e.answer_starts) for e in examples]
    train, held = split_qa_examples(untitled, 0.2, seed=1)
    assert len(held) % 3 == 0 and not {e.context for e in train} & {e.context for e in held}


def test_windows_label_the_answer_tokens_and_cls_when_it_is_outside(tokenizer):
    filler = " ".join(f"word{i}" for i in range(60))
    context = f"The old lighthouse of Brightwater Bay was painted red in 1887. {filler} It stood on Gull Rock."
    examples = [QAExample("first", "When was the lighthouse painted red?", context, ["1887"], [context.index("1887")]),
                QAExample("last", "Where did it stand?", context, ["Gull Rock"], [context.index("Gull Rock")])]
    feats = qa_features(tokenizer, examples, seq_len=48, doc_stride=8)
    assert len(feats) > 4 and feats.input_ids.shape == (len(feats), 48)
    by_example = {0: [], 1: []}
    for f in range(len(feats)):
        by_example[feats.example_index[f]].append(f)
    for i, ex in enumerate(examples):
        inside = [f for f in by_example[i] if int(feats.start_positions[f]) != 0]
        outside = [f for f in by_example[i] if int(feats.start_positions[f]) == 0]
        assert inside and outside  # the long passage puts the answer in some windows only
        for f in outside:  # answer not in the window: both labels at [CLS]
            assert int(feats.end_positions[f]) == 0 and feats.input_ids[f, 0] == tokenizer.cls_token_id
        for f in inside:
            s, e = int(feats.start_positions[f]), int(feats.end_positions[f])
            assert feats.token_type_ids[f, s] == 1 and s <= e  # inside the context
            decoded = tokenizer.decode(feats.input_ids[f, s:e + 1])
            assert decoded.replace(" ", "") == ex.answers[0].lower().replace(" ", "")
            assert ex.context[int(feats.offsets[f, s, 0]):int(feats.offsets[f, e, 1])] == ex.answers[0]
    # only context tokens carry offsets; question, special and padding tokens are (-1, -1)
    assert ((feats.offsets[..., 0] >= 0) == (feats.token_type_ids == 1) & (feats.attention_mask == 1)
            & (feats.input_ids != tokenizer.sep_token_id)).all()


def test_predictions_recover_gold_spans_and_respect_the_constraints(tokenizer, squad_files):
    examples = load_qa_examples(str(squad_files / "squad.jsonl"))
    feats = qa_features(tokenizer, examples, seq_len=48, doc_stride=16)
    start = torch.full(feats.input_ids.shape, -5.0)
    end = torch.full(feats.input_ids.shape, -5.0)
    for f in range(len(feats)):
        s, e = int(feats.start_positions[f]), int(feats.end_positions[f])
        if s:
            start[f, s], end[f, e] = 10.0, 10.0
    start[:, 1], end[:, 1] = 50.0, 50.0  # a question token: never an answer
    preds = squad_predictions(start, end, feats, n_best=5, max_answer_len=30)
    assert squad_scores(preds, examples)["exact_match"] == 100.0
    # with max_answer_len 1, only one-token spans are allowed
    short = squad_predictions(start, end, feats, n_best=5, max_answer_len=1)
    assert all(len(tokenizer.tokenize(p)) == 1 for p in short.values())


# ---------------------------------------------------------------------------------------------- config


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_a_squad_experiment_composes_with_local_data(squad_files):
    cfg = load_config(_compose(["experiment=bert_base_squad_20_faster", f"data.source={squad_files / 'squad.json'}",
                                "data.eval_source=", "model.name_or_path=/models/bert-squad"]))
    assert cfg.model.task == "question_answering" and cfg.eval.primary == "f1" and cfg.mask.variant == "faster"
    assert cfg.data.source.endswith("squad.json") and cfg.data.eval_source == "" and cfg.eval.qa_doc_stride == 128
    with pytest.raises(ValueError, match=r"data.source='news.txt' is not accepted for model.task=question_answering; "
                                         r"accepted: hf:"):
        load_config(_compose(["experiment=bert_base_squad_20_faster", "data.source=news.txt"]))


# ---------------------------------------------------------------------------------------------- prune job


RELOAD = """
import sys, torch, transformers
m = transformers.AutoModelForQuestionAnswering.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    out = m(**batch)
torch.save({"start": out.start_logits, "end": out.end_logits, "class": type(m).__name__}, sys.argv[3])
"""


def test_prune_job_prunes_a_bert_qa_model_that_reloads_in_a_fresh_process(squad_files, tmp_path, monkeypatch):
    from transformers import AutoModelForQuestionAnswering

    import vtrans.pipeline as pipeline
    from vtrans.jobs import run

    model_dir = save_tiny_with_tokenizer(tmp_path / "tiny_bert_qa", "bert", head="qa")
    seen = {}
    real_save = pipeline.save_pruned

    def spy(model, out_dir, **kwargs):  # the pruned model's logits just before it is written
        batch = {k: v[:6] for k, v in seen["feats"].tensors().items() if not k.endswith("_positions")}
        with torch.no_grad():
            out = model.eval()(**batch)
        seen.update(batch=batch, start=out.start_logits, end=out.end_logits, hidden=model.config.hidden_size)
        return real_save(model, out_dir, **kwargs)

    real_features = pipeline.D.qa_features

    def features(*args, **kwargs):
        seen["feats"] = real_features(*args, **kwargs)
        return seen["feats"]

    monkeypatch.setattr(pipeline, "save_pruned", spy)
    monkeypatch.setattr(pipeline.D, "qa_features", features)
    out = tmp_path / "out"
    common = ["model.package=", f"model.name_or_path={model_dir}", "model.gguf_file=", "model.task=question_answering",
              f"data.source={squad_files / 'squad.json'}", "data.seq_len=48", "data.heldout_fraction=0.25",
              "eval.qa_doc_stride=16", "progress=false", "data=lee"]
    m = run(_compose(common + ["mask=faster", "budget=params80", "optim.steps=4", "optim.batch_size=4",
                               "optim.log_every=1", f"output_dir={out}"]))
    # the budget (embeddings counted: 97 % of this model, so the hidden dimension must shrink) is met
    assert m["variant"] == "faster" and m["final_loss"] > 0
    assert m["params_pruned"] <= m["budget_target_size"]
    assert m["params_pruned"] == pytest.approx(0.8 * m["params_dense"], rel=0.04)  # one hidden channel is ~3 %
    assert seen["hidden"] < 32  # so qa_outputs lost input columns with the hidden channels
    for k in ("exact_match_dense", "f1_dense", "exact_match_pruned", "f1_pruned"):
        assert 0 <= m[k] <= 100, k  # the official script's 0-100 scale
    assert m["objective_name"] == "f1_pruned" and m["objective"] == m["f1_pruned"]
    assert (m["heldout_documents"], m["train_documents"]) == (6, 30)  # whole articles: one (a second would exceed 9)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["f1_pruned"] == pytest.approx(m["f1_pruned"])
    # the evaluate job scores the saved model on the same held-out articles
    e = run(_compose(common + ["job=evaluate", f"model_dir={out / 'model'}", f"output_dir={tmp_path / 'eval'}"]))
    assert (e["exact_match"], e["n"]) == (m["exact_match_pruned"], 6)
    assert e["f1"] == pytest.approx(m["f1_pruned"]) and e["params"] == m["params_pruned"]
    # the saved directory is the pruned model: same size in this process ...
    reloaded = AutoModelForQuestionAnswering.from_pretrained(out / "model", trust_remote_code=True)
    assert sum(p.numel() for p in reloaded.parameters()) == m["params_pruned"]
    assert reloaded.qa_outputs.weight.shape == (2, seen["hidden"])
    # ... and the same start / end logits as before saving, from a fresh process
    torch.save(seen["batch"], tmp_path / "batch.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out / "model"), str(tmp_path / "batch.pt"),
                        str(tmp_path / "logits.pt")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    assert got["class"] == "VTransBertForQuestionAnswering"
    torch.testing.assert_close(got["start"], seen["start"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["end"], seen["end"], rtol=1e-5, atol=1e-5)
