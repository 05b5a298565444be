"""GGUF export (vtrans.gguf, job=export export_format=gguf) of LLaMA-lineage models with per-layer shapes: what the
file says (architecture, per-layer head / KV-head / FFN arrays, key and value lengths, placeholders for what
llama.cpp cannot express), tensors read back equal to the model's, clear errors for what does not map; and, with
llama-cpp-python installed (scripts/setup.sh), llama.cpp's own logits, greedy tokens and tokenization against
transformers' on tiny models (fast tier) and on a pruned real SmolLM2-135M (slow tier)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import bpe_tokenizer, make_tiny
from vtrans import gguf as G
from vtrans.masks.attach import attach_masks
from vtrans.masks.materialize import materialize

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
needs_llama_cpp = pytest.mark.skipif(not G.llama_cpp_available(),
                                     reason="llama-cpp-python is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def _big_weights(model, scale: float = 8.0):
    """Random tiny models have near-uniform next-token distributions (init std 0.02), where any rounding flips the
    argmax; larger weights give peaked ones, as trained models have."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def tiny(family: str, tok, **over):
    if family == "mistral":
        over.setdefault("sliding_window", None)
    return _big_weights(make_tiny(family, vocab_size=len(tok), max_position_embeddings=256, **over))


def prune(model, zero_heads=(), zero_ffn=(), kv_keep=None, hidden_keep=40, neuron_keep=None):
    """Hand-made decisions: layers in zero_heads lose attention, in zero_ffn their FFN; kv_keep[i] keeps those KV
    heads of layer i; the hidden dimension keeps its last `hidden_keep` channels; neuron_keep[i] a neuron mask."""
    mm = attach_masks(model)
    for i, layer in enumerate(mm.layers):
        if i in zero_heads:
            layer.attention.decide(torch.tensor([False]))
        elif kv_keep and i in kv_keep:
            layer.heads.decide(torch.tensor(kv_keep[i]))
        if i in zero_ffn:
            layer.ffn.decide(torch.tensor([False]))
        elif neuron_keep and i in neuron_keep:
            layer.neurons.decide(neuron_keep[i])
    mm.hidden.decide(torch.arange(mm.hidden.n) >= mm.hidden.n - hidden_keep)
    return materialize(mm).eval()


# layer 0 keeps 1 of 2 KV heads and a third of its neurons, layer 1 loses its attention, layer 2 its FFN
MIXED = dict(zero_heads=(1,), zero_ffn=(2,), kv_keep={0: [True, False]},
             neuron_keep={0: torch.arange(80) % 3 == 0})


# ---------------------------------------------------------------------------------------------- the file


def test_per_layer_shapes_are_written_as_the_arrays_llama_cpp_reads(tok, tmp_path):
    model = prune(tiny("llama", tok), **MIXED)
    assert [(l["heads"], l["kv_heads"], l["intermediate"]) for l in model.config.vtrans_layers] == \
        [(3, 1, 27), (0, 0, 80), (6, 2, 0)]
    info = G.write(model, tok, tmp_path / "m.gguf", "f32")
    got = G.read(tmp_path / "m.gguf")
    assert got["arch"] == info["arch"] == "deci"
    # layer 2 keeps attention without FFN: one zero-weight neuron, since llama.cpp's FFN-free layer drops attention
    assert (got["heads"], got["kv_heads"], got["ffn"]) == ([3, 0, 6], [1, 0, 2], [27, 80, 1])
    assert [l["placeholder"] for l in info["layers"]] == ["", "", "neuron"]
    f = got["fields"]
    assert isinstance(f["deci.attention.head_count"], list)  # arrays, not scalars
    assert got["key_length"] == got["value_length"] == f["deci.rope.dimension_count"] == 8  # hidden 40 != 6 x 8
    assert f["deci.embedding_length"] == 40 and f["deci.block_count"] == 3
    assert "blk.1.attn_q.weight" not in got["tensors"] and "blk.1.ffn_up.weight" in got["tensors"]
    assert not got["tensors"]["blk.2.ffn_down.weight"].any()  # the placeholder neuron adds nothing
    assert G.verify(tmp_path / "m.gguf", model, "f32") == 0.0  # every tensor read back exactly
    assert "output.weight" not in got["tensors"]  # tied embeddings: llama.cpp reuses token_embd
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert got["tokens"][: len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]


def test_layer_0_without_heads_gets_a_zero_head_and_empty_layers_are_dropped(tok, tmp_path):
    model = prune(tiny("llama", tok), zero_heads=(0, 2), zero_ffn=(2,))
    assert [(l["heads"], l["intermediate"]) for l in model.config.vtrans_layers] == [(0, 80), (6, 80)]  # 2 is gone
    gplan = G.plan(model)
    # llama.cpp derives the head size only when layer 0 has heads: a zero-weight head there computes the same
    assert [(l.heads, l.kv_heads, l.ffn, l.placeholder) for l in gplan.layers] == [(1, 1, 80, "head"),
                                                                                     (6, 2, 80, "")]
    G.write(model, tok, tmp_path / "m.gguf", "f16")
    got = G.read(tmp_path / "m.gguf")
    assert not got["tensors"]["blk.0.attn_output.weight"].any()
    assert G.verify(tmp_path / "m.gguf", model, "f16") < 1e-3


def test_uniform_shapes_are_written_as_llama_with_scalars(tok, tmp_path):
    dense = tiny("llama", tok)
    G.write(dense, tok, tmp_path / "dense.gguf", "f16")
    got = G.read(tmp_path / "dense.gguf")
    assert got["arch"] == "llama" and not isinstance(got["fields"]["llama.attention.head_count"], list)
    assert (got["heads"], got["kv_heads"], got["ffn"]) == ([6] * 3, [2] * 3, [80] * 3)
    uniform = prune(tiny("llama", tok), kv_keep={i: [True, False] for i in range(3)})
    assert G.plan(uniform).arch == "llama"


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_lineage_families_map_with_their_biases(family, tok, tmp_path):
    model = prune(tiny(family, tok, tie_word_embeddings=False), **MIXED)
    G.write(model, tok, tmp_path / "m.gguf", "f32")
    got = G.read(tmp_path / "m.gguf")
    assert "output.weight" in got["tensors"]
    assert ("blk.0.attn_q.bias" in got["tensors"]) == (family == "qwen2")  # Qwen2's q/k/v biases, RoPE-permuted
    assert G.verify(tmp_path / "m.gguf", model, "f32") == 0.0


def test_q8_0_quantises_rows_of_32_and_keeps_the_rest_f16(tok, tmp_path):
    model = prune(tiny("llama", tok, hidden_size=64, head_dim=8, num_attention_heads=8), hidden_keep=64,
                  zero_ffn=(1,))
    info = G.write(model, tok, tmp_path / "m.gguf", "q8_0")
    got = G.read(tmp_path / "m.gguf")
    assert got["types"]["blk.0.ffn_up.weight"] == "Q8_0"  # rows of 64 values
    assert got["types"]["blk.0.ffn_down.weight"] == "F16"  # rows of 80 values: not whole 32-blocks
    assert got["types"]["blk.0.attn_norm.weight"] == "F32"
    assert info["tensor_types"]["Q8_0"] > 0 and "note" in info
    assert G.verify(tmp_path / "m.gguf", model, "q8_0") < 1e-2


@pytest.mark.parametrize("family,over,match", [
    ("gpt2", {}, "supports the LLaMA family"),
    ("mistral", {"sliding_window": 8}, "sliding-window attention"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     "rope_type='llama3'"),
])
def test_what_llama_cpp_cannot_compute_fails_naming_why(family, over, match, tok, tmp_path):
    model = make_tiny(family, vocab_size=len(tok), **over)
    with pytest.raises(ValueError, match=match):
        G.write(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_llama_cpp_cannot_read_fails_naming_it(tmp_path):
    from tests.test_jobs import minilm_tokenizer

    with pytest.raises(ValueError, match="WordPiece tokenizer"):
        G.tokenizer_metadata(minilm_tokenizer(), 30522)


@pytest.mark.parametrize("override,match", [
    (["job=export", "export_format=onnx"], r"export_format='onnx' is not accepted; choose one of \['hf', 'gguf'\]"),
    (["job=export", "export_gguf_type=q4_k"],
     r"export_gguf_type='q4_k' is not accepted; choose one of \['f32', 'f16', 'q8_0'\]"),
    (["job=prune", "export_format=gguf"], "export_format=gguf applies to job=export"),
    (["job=export", "model.task=sequence_classification", "export_format=gguf"],
     "export_format=gguf writes causal LMs"),
])
def test_export_format_is_validated_at_start(override, match):
    from tests.test_jobs import compose_cfg
    from vtrans.config import load_config

    with pytest.raises(ValueError, match=match):
        load_config(compose_cfg(["model_dir=/nonexistent", *override]))


# ---------------------------------------------------------------------------------------------- the export job


@pytest.fixture(scope="module")
def pruned_dir(tok, tmp_path_factory):
    """A pruned tiny LLaMA saved as a prune job saves it (self-contained format) with its BPE tokenizer."""
    from vtrans.pipeline import save_model

    root = tmp_path_factory.mktemp("gguf_src")
    save_model(prune(tiny("llama", tok), **MIXED), tok, root / "model")
    return root / "model"


def test_export_job_writes_a_verified_gguf(pruned_dir, tmp_path):
    from tests.test_jobs import compose_cfg
    from vtrans.jobs import run
    from vtrans.strict_json import loads

    m = run(compose_cfg(["job=export", f"model_dir={pruned_dir}", "export_format=gguf", "export_gguf_type=f32",
                         f"output_dir={tmp_path}", "progress=false", "model.package=", "model.gguf_file=",
                         f"model.name_or_path={pruned_dir}"]))
    path = Path(m["gguf_file"])
    assert path == tmp_path / "model" / "model-f32.gguf" and path.stat().st_size == m["size_bytes"]
    assert m["gguf_arch"] == "deci" and [l["ffn"] for l in m["gguf_layers"]] == [27, 80, 1]
    assert m["gguf_max_rel_diff"] == 0.0
    assert m["llama_cpp_checked"] == G.llama_cpp_available()
    if m["llama_cpp_checked"]:  # f32 through llama.cpp: the same logits up to float rounding
        assert m["llama_cpp_max_rel_diff"] < 1e-5 and m["llama_cpp_top1_agreement"] == 1.0
    saved = loads((tmp_path / "metrics.json").read_text())
    assert saved["format"] == "gguf" and saved["non_finite_keys"] == []
    assert json.loads((tmp_path / "model" / "vtrans_export.json").read_text())["gguf_arch"] == "deci"
    assert (tmp_path / "model" / "vtrans_decision.json").is_file() == (pruned_dir / "vtrans_decision.json").is_file()


# ---------------------------------------------------------------------------------------------- through llama.cpp


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


CASES = {  # name -> (family, prune kwargs)
    "llama-mixed": ("llama", MIXED),
    "llama-layer0-headless": ("llama", dict(zero_heads=(0,), zero_ffn=(1,))),
    "qwen2-mixed": ("qwen2", MIXED),
    "mistral-mixed": ("mistral", MIXED),
    "llama-dense": ("llama", None),
}


@needs_llama_cpp
@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_computes_what_transformers_computes(case, tok, tmp_path):
    family, kwargs = CASES[case]
    model = tiny(family, tok, tie_word_embeddings=family != "mistral")
    model = prune(model, **kwargs) if kwargs is not None else model
    ids = tok("The government said on Tuesday that the new plan would cut costs.")["input_ids"]
    expected = _hf_logits(model, ids)
    # f32 (with an f32 KV cache): the same logits up to float rounding; f16 weights: within their rounding
    for gguf_type, tol in (("f32", 1e-5), ("f16", 2e-2)):
        path = tmp_path / f"{gguf_type}.gguf"
        G.write(model, tok, path, gguf_type)
        got = G.llama_cpp_logits(path, ids)
        scale = float(np.abs(expected).max())
        assert float(np.abs(got - expected).max()) < tol * scale, gguf_type
    greedy = _hf_greedy(model, ids, 32)
    assert G.llama_cpp_greedy(tmp_path / "f32.gguf", ids, 32) == greedy  # incl. the KV cache of every block


@needs_llama_cpp
def test_llama_cpp_runs_q8_0_files_within_their_rounding(tok, tmp_path):
    """Rows of 64 values quantise to Q8_0 (llama.cpp's repacking of quantised weights is off: see
    vtrans.gguf.without_weight_repacking); llama.cpp's Q8_0 products also quantise the activations to 8 bits, so the
    logits move by a few % of the largest (the export job's limit for q8_0 is 10 %) and the argmax mostly holds."""
    model = prune(tiny("llama", tok, hidden_size=64, head_dim=8, num_attention_heads=8, intermediate_size=128),
                  hidden_keep=64, zero_heads=(1,), zero_ffn=(2,))
    G.write(model, tok, tmp_path / "m.gguf", "q8_0")
    assert G.read(tmp_path / "m.gguf")["types"]["blk.0.ffn_up.weight"] == "Q8_0"
    ids = tok("The government said on Tuesday that the new plan would cut costs.")["input_ids"]
    expected = _hf_logits(model, ids)
    got = G.llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert float(np.abs(got - expected).max()) < 1e-1 * float(np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


# tokenizer.json Split regexes (LLaMA-3's, Qwen2's) that come before a regex-free ByteLevel
SPLIT_REGEX = {name: regex for regex, name in G._SPLIT_PRE.items()}


@needs_llama_cpp
@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_text_as_transformers_does(pre, tmp_path):
    from llama_cpp import Llama
    from tokenizers import Regex, pre_tokenizers

    if pre == "gpt-2":
        tok = bpe_tokenizer()
    elif pre == "smollm":  # digits one by one, then GPT-2's byte-level regex
        tok = bpe_tokenizer(pre_tokenizer=pre_tokenizers.Digits(individual_digits=True), byte_level_regex=True)
    else:
        tok = bpe_tokenizer(pre_tokenizer=pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated"))
    assert G.tokenizer_metadata(tok, len(tok))["pre"] == pre
    model = make_tiny("llama", vocab_size=len(tok))
    G.write(model, tok, tmp_path / "m.gguf", "f32")
    llm = Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    texts = ["The Prime Minister's office said 1234 people   arrived in Sydney.\n\nThey'll stay, won't they?",
             "  leading spaces, tabs\tand  CAPS: ABC-123 x2.5%"]
    try:
        for text in texts:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
            assert llm.detokenize(want).decode() == text
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------- a pruned SmolLM2


@pytest.fixture(scope="module")
def pruned_smollm2(tmp_path_factory):
    """The default job (Faster-VTrans on the real SmolLM2-135M), shortened and on the Lee text alone (no teacher
    samples to draw): a real non-uniform pruned model."""
    out = tmp_path_factory.mktemp("smollm2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "data=lee", "optim.steps=4", "data.seq_len=64",
                        "data.max_eval_blocks=8", "progress=false", f"output_dir={out}", f"hydra.run.dir={out}/h"],
                       env=env, capture_output=True, text=True, timeout=1200, cwd=out)
    assert r.returncode == 0, r.stderr[-4000:]
    return out / "model"


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.timeout(1800)
def test_pruned_smollm2_in_llama_cpp_greedy_matches_transformers(pruned_smollm2, tmp_path):
    """32 greedy tokens of the pruned SmolLM2 from llama.cpp (GGUF f32 and f16) against transformers' (f32). f32
    must match token for token; f16 rounds every weight, so a near-tie late in the continuation may go the other
    way: it must match on the first 8 tokens and agree on most of the 32 (the numbers are printed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_jobs import compose_cfg
    from vtrans.jobs import run

    model = AutoModelForCausalLM.from_pretrained(pruned_smollm2, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(pruned_smollm2)
    assert len({tuple(l.values()) for l in model.config.vtrans_layers}) > 1  # a non-uniform shape
    prompt = "The capital of France is"
    ids = tok(prompt)["input_ids"]
    want = _hf_greedy(model, ids, 32)
    agreement = {}
    for gguf_type in ("f32", "f16"):
        m = run(compose_cfg(["job=export", f"model_dir={pruned_smollm2}", "export_format=gguf",
                             f"export_gguf_type={gguf_type}", f"output_dir={tmp_path / gguf_type}",
                             "progress=false"]))
        assert m["gguf_arch"] == "deci" and m["llama_cpp_checked"]
        from llama_cpp import Llama

        llm = Llama(model_path=m["gguf_file"], vocab_only=True, verbose=False)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids  # llama.cpp's own tokenizer
        llm.close()
        got = G.llama_cpp_greedy(m["gguf_file"], ids, 32)
        agreement[gguf_type] = sum(a == b for a, b in zip(got, want)) / 32
        print(f"{gguf_type}: llama.cpp {got}\n     transformers {want}\n     agreement {agreement[gguf_type]:.2f}")
        if gguf_type == "f32":
            assert got == want
        else:
            assert got[:8] == want[:8] and agreement[gguf_type] >= 0.5
