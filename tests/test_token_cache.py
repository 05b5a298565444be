"""Token blocks tokenised once: the prepare-data stage writes them to the token cache and every later call (another
rank, another job with the same data and tokenizer) memory-maps them without tokenising again; a change to the data,
the split or the tokenizer is a new entry. Streaming mechanics (documents read chunk by chunk, stopped at
data.train_tokens) and the config checks of streaming."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.test_prune_job import _cfg, text_file, tiny_llama_dir  # noqa: F401  (fixtures)
from vtrans import data as D
from vtrans import pipeline as P


def test_blocks_are_tokenised_once_and_memory_mapped(tiny_llama_dir, text_file, tmp_path, monkeypatch):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = _cfg(tiny_llama_dir, tmp_path, source=str(text_file))
    cfg.data.cache_dir = str(tmp_path / "cache")
    calls = []
    real = D.lm_blocks
    monkeypatch.setattr(D, "lm_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = P.prepare_data(cfg, tok)
    assert len(calls) == 2  # train and held-out, once
    again = P.prepare_data(cfg, tok)
    assert len(calls) == 2  # read back, not tokenised again
    assert torch.equal(again.train, first.train) and torch.equal(again.held, first.held)
    assert again.train_documents == first.train_documents and again.train.dtype == torch.long
    entries = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(entries) == 1 and isinstance(np.load(entries[0] / "train.npy", mmap_mode="r"), np.memmap)
    # the uncached path gives the same blocks
    cfg.data.cache = False
    plain = P.prepare_data(cfg, tok)
    assert torch.equal(plain.train, first.train) and len(calls) == 4
    # another split, another entry
    cfg.data.cache, cfg.data.seed = True, 1
    P.prepare_data(cfg, tok)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2


def test_train_tokens_caps_the_training_blocks(tiny_llama_dir, text_file, tmp_path):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = _cfg(tiny_llama_dir, tmp_path, source=str(text_file))
    cfg.data.cache_dir, cfg.data.train_tokens = str(tmp_path / "cache"), 5 * cfg.data.seq_len + 7
    assert P.prepare_data(cfg, tok).train.shape == (5, cfg.data.seq_len)


def test_streamed_blocks_stop_at_the_limit_and_equal_the_whole_corpus_blocks(tiny_llama_dir, text_file):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    docs = D.load_documents(str(text_file))
    whole = D.lm_blocks(tok, docs, 32)
    read = []

    def stream():
        for d in docs:
            read.append(d)
            yield d

    blocks, n = D.lm_blocks_streamed(tok, stream(), 32, max_blocks=10, chunk=5)
    assert torch.equal(blocks, whole[:10]) and n == len(read) < len(docs)  # stopped early, the same blocks
    everything, n_all = D.lm_blocks_streamed(tok, iter(docs), 32, chunk=7)
    assert torch.equal(everything, whole) and n_all == len(docs)


@pytest.mark.parametrize("over,match", [
    ({"data.streaming=true", "data.source=gensim:lee_background.cor"}, "not an hf:<dataset>"),
    ({"data.streaming=true", "data.source=hf:Salesforce/wikitext:wikitext-2-raw-v1:train"}, "set data.eval_source"),
    ({"data.train_tokens=10"}, r"data.train_tokens=10 is less than one block"),
])
def test_streaming_and_train_tokens_are_checked_at_validation(over, match):
    from tests.test_jobs import compose_cfg
    from vtrans.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config(compose_cfg(sorted(over)))
