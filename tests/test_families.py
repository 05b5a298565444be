"""The prune job end to end on tiny Qwen2 (q/k/v biases) and Mistral (sliding-window attention shorter than the
inputs) models saved to a directory: the pruned model it saves reloads in a fresh process from its own modeling files
(trust_remote_code, no vtrans on the path) and gives the outputs of the hard-masked model it was materialised from."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_jobs import assets, compose_cfg, lm_overrides, minilm_tokenizer  # noqa: F401  (session fixture)
from tests.tiny import CLASSES, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
torch.save({"logits": logits, "class": type(model).__name__, "module": type(model).__module__,
            "q_bias": model.model.layers[0].self_attn.q_proj.bias is not None if model.config.vtrans_layers[0]["heads"]
            else None}, sys.argv[3])
"""


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_prune_job_saves_a_model_that_reloads_fresh_and_matches_the_hard_masked_model(
        family, assets, tmp_path, monkeypatch):  # noqa: F811
    from vtrans import pipeline
    from vtrans.jobs import run

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    dense = CLASSES[(family, "lm")](tiny_config(family, vocab_size=len(tok), max_position_embeddings=256,
                                                pad_token_id=tok.pad_token_id)).eval()
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    ids = torch.randint(1000, len(tok), (2, 20), generator=torch.Generator().manual_seed(1))  # longer than the window
    seen = {}
    real = pipeline.materialize

    def spy(mm, decision, **kw):  # the hard-masked model, just before its pruned units are removed
        mm.model.eval()
        with torch.no_grad():
            seen["masked"] = mm.model(ids).logits
        seen["decision"] = decision
        return real(mm, decision, **kw)

    monkeypatch.setattr(pipeline, "materialize", spy)
    out = tmp_path / "out"
    m = run(compose_cfg(lm_overrides(assets, out, f"model.name_or_path={tmp_path / 'dense'}", "budget.target=0.5")))
    assert m["model_family"] == family and m["params_pruned"] < m["params_dense"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == f"vtrans_{family}" and config["auto_map"]
    assert len({tuple(l.values()) for l in config["vtrans_layers"]}) > 1 or config["hidden_size"] < 48  # pruned
    if family == "mistral":
        assert config["sliding_window"] == 8  # kept as the config says
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vtrans is not importable there
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out / "model"), str(tmp_path / "ids.pt"),
                        str(tmp_path / "got.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    assert got["class"] == f"VTrans{'Qwen2' if family == 'qwen2' else 'Mistral'}ForCausalLM"
    assert got["module"].startswith("transformers_modules.")  # the checkpoint's own modeling files
    if got["q_bias"] is not None:
        assert got["q_bias"] == (family == "qwen2")  # Qwen2 keeps its q/k/v biases through slicing
    torch.testing.assert_close(got["logits"], seen["masked"], rtol=1e-4, atol=1e-4)
