"""Faults and bad inputs end in a clear error or a correct result, and nothing is lost: a checkpoint resumes only
under the config that wrote it; a full disk fails a save with the path and the bytes and removes the partial save; an
unreadable latest checkpoint falls back to the one before; data that is not text, or a broken JSON line, is refused
naming the file (and the line). A real small filesystem (tmpfs) where the behaviour is about it."""
from __future__ import annotations

import json
import logging
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.test_distributed import build, mask_state, train
from vtrans import checkpoint as ckpt
from vtrans.checkpoint import Checkpointer, CheckpointError, FreeSpaceError
from vtrans.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_pending_requests():
    ckpt.clear_requests()
    yield
    ckpt.clear_requests()


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint of another config


def test_a_checkpoint_of_another_config_is_refused_on_restore(tmp_path):
    mm, module, groups = build()
    train(Engine(module, groups, grad_accum=2, seed=0), steps=2,
          checkpointer=Checkpointer(tmp_path, fingerprint={"budget.target": 0.8, "mask.k": 10.0}))
    mm, module, groups = build()
    with pytest.raises(CheckpointError, match=r"Changed: budget.target: 0.8 -> 0.5"):
        train(Engine(module, groups, grad_accum=2, seed=0), steps=4,
              checkpointer=Checkpointer(tmp_path, fingerprint={"budget.target": 0.5, "mask.k": 10.0}))


# ---------------------------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_bytes) -> a fresh tmpfs of that size (a real filesystem that fills up); unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_checkpoint_that_does_not_fit_fails_naming_path_bytes_needed_and_free(small_disk):
    disk = small_disk(256 * 1024)
    mm, module, groups = build()
    engine = Engine(module, groups, grad_accum=2, seed=0)
    needed = engine.state_bytes()
    with pytest.raises(FreeSpaceError) as full:
        train(engine, steps=2, checkpointer=Checkpointer(disk / "ckpt", every=1))
    message = str(full.value)
    assert str(disk / "ckpt") in message and "needs about" in message and "free" in message
    assert re.search(r"needs about [\d.,]+ MiB \([\d,]+ bytes\), [\d.,]+ MiB \([\d,]+ bytes\) free", message)
    stated = int(re.search(r"needs about [\d.,]+ MiB \(([\d,]+) bytes\)", message).group(1).replace(",", ""))
    assert needed < stated < needed * 1.06 + 2 ** 20 + 4096  # the estimate (Adam's state counted), with its margin
    assert not list(disk.rglob(".tmp-*"))


def test_a_save_the_disk_fills_during_is_removed_and_the_latest_stays(small_disk, monkeypatch, tmp_path):
    """The estimate is beaten (the preflight sees room; the real write runs out of it): the partial checkpoint is
    removed and the previous one stays the readable latest."""
    mm, module, groups = build()
    engine = Engine(module, groups, grad_accum=2, seed=0)
    train(engine, steps=1, checkpointer=Checkpointer(tmp_path / "roomy", every=1))
    size = sum(f.stat().st_size for f in (tmp_path / "roomy" / "step-00000001").iterdir())
    disk = small_disk(int(size * 1.5))  # one checkpoint fits, a second does not
    mm, module, groups = build()
    engine = Engine(module, groups, grad_accum=2, seed=0)
    ckpts = Checkpointer(disk / "ckpt", every=1)
    monkeypatch.setattr(ckpt, "check_free_space", lambda *a, **k: None)  # as if the estimate were too low
    with pytest.raises(CheckpointError, match=r"saving checkpoint step-00000002 to .*ckpt failed .*removed"):
        train(engine, steps=3, checkpointer=ckpts)
    assert [p.name for p in ckpts.complete()] == ["step-00000001"] and ckpts.latest().name == "step-00000001"
    assert not list((disk / "ckpt").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------------------
# corrupted checkpoints


def _three_checkpoints(root: Path) -> dict:
    mm, module, groups = build(log_sigma2=-9.0)
    train(Engine(module, groups, grad_accum=2, seed=0), steps=6, checkpointer=Checkpointer(root, every=2, keep=3))
    return mask_state(module)


def _resume(root: Path) -> dict:
    mm, module, groups = build(log_sigma2=-9.0)
    history = train(Engine(module, groups, grad_accum=2, seed=0), steps=6, checkpointer=Checkpointer(root, every=2,
                                                                                                      keep=3))
    assert len(history) == 6
    return mask_state(module)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    """Truncated (caught by reading its zip directory) or missing (caught when loading) engine state in the latest
    checkpoint: a warning names both checkpoints, the run resumes from step 4 and ends as the uninterrupted one."""
    reference = _three_checkpoints(tmp_path / "reference")
    root = tmp_path / "run"
    _three_checkpoints(root)
    # the run was stopped at step 6 as far as the files tell: redo it from the damaged latest
    engine_file = root / "step-00000006" / "engine.pt"
    if damage == "truncated":
        engine_file.write_bytes(engine_file.read_bytes()[: engine_file.stat().st_size // 2])
    else:
        engine_file.unlink()
    with caplog.at_level(logging.WARNING, logger="vtrans"):
        got = _resume(root)
    assert "step-00000006" in caplog.text and "falling back to" in caplog.text and "step-00000004" in caplog.text
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    assert Checkpointer(root).latest().name == "step-00000006"  # saved again, whole


def test_no_readable_checkpoint_is_an_error_naming_the_directory(tmp_path):
    _three_checkpoints(tmp_path)
    for p in tmp_path.glob("step-*/engine.pt"):
        p.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match=rf"no readable checkpoint in {tmp_path}"):
        _resume(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# data that is not what it claims


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
