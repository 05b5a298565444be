"""Faults and bad inputs end in a clear error or a correct result, and nothing is lost: data that is not text, or a
broken JSON line, is refused naming the file (and the line)."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest


# ---------------------------------------------------------------------------------------------------------------
# 7. data that is not what it claims


def test_random_bytes_as_text_are_refused_naming_the_file(tmp_path):
    from vtrans.data import load_documents

    path = tmp_path / "random.txt"
    path.write_bytes(random.Random(0).randbytes(200_000))
    with pytest.raises(ValueError, match=rf"{path}' does not look like text: .*% of its characters"):
        load_documents(str(path))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("A perfectly good sentence.\n" * 50, encoding="utf-16")
    with pytest.raises(ValueError, match="utf16.txt' does not look like text"):
        load_documents(str(utf16))


def test_latin1_text_is_read_with_a_warning(tmp_path, caplog):
    from gensim.test.utils import datapath

    from vtrans.data import load_documents

    with caplog.at_level(logging.WARNING):
        docs = load_documents("gensim:pang_lee_polarity.cor")
    assert len(docs) == 200 and "is not UTF-8" in caplog.text and "latin-1" in caplog.text
    assert Path(datapath("pang_lee_polarity.cor")).name in caplog.text


def test_a_broken_jsonl_line_is_reported_with_its_number_and_file(tmp_path):
    from vtrans.data import load_documents

    path = tmp_path / "broken.jsonl"
    lines = [json.dumps({"text": f"sentence number {i}", "label": i % 2}) for i in range(20)]
    lines[6] = lines[6][:-5]  # line 7 cut short
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path}' line 7 is not a JSON object"):
        load_documents(str(path))
