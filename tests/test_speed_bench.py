"""bench/speed.py on tiny LLaMAs pruned through the real path (masks -> decide -> materialise -> save_pruned): a row
per model with positive numbers, from saved directories and from config.json alone, and static-cache greedy tokens
equal to eager greedy tokens (including a layer without attention and a layer without FFN). No speed is asserted."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tiny
from vtrans.masks.attach import attach_masks
from vtrans.masks.decide import Budget, decide
from vtrans.masks.materialize import materialize
from vtrans.models import save_pruned

SPEED_PY = Path(__file__).resolve().parents[1] / "bench" / "speed.py"
_spec = importlib.util.spec_from_file_location("bench_speed", SPEED_PY)  # bench/ is scripts, not a package
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)

FAST = ["--prompt-lens", "8", "16", "--decode-prompt-len", "5", "--new-tokens", "6", "--repeats", "1",
        "--warmup", "0", "--device", "cpu"]


def _hand_pruned(model):
    """Layer 0 loses its attention block, layer 1 its FFN, layer 2 one KV head (3 query heads) and some neurons,
    and the hidden dimension 8 channels."""
    mm = attach_masks(model)
    l0, l1, l2 = mm.layers
    l0.attention.decide(torch.tensor([False]))
    l1.ffn.decide(torch.tensor([False]))
    l2.heads.decide(torch.tensor([True, False]))
    l2.neurons.decide(torch.arange(l2.neurons.n) % 3 != 0)
    mm.hidden.decide(torch.arange(mm.hidden.n) >= 8)
    return materialize(mm)


def _decided(model, seed=3):
    """Random importances, decided to half of the parameters by the budget code."""
    mm = attach_masks(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mm.masks().values():
            m.log_sigma2.copy_(torch.randn(m.n, generator=g) * 3 - 1)
    decide(mm, Budget("params_ratio", 0.5))
    return materialize(mm)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_models")
    dense = make_tiny("llama")
    dense.save_pretrained(root / "dense")
    hand = _hand_pruned(make_tiny("llama"))
    assert [l["heads"] for l in hand.config.vtrans_layers][:2] == [0, 6]
    assert hand.config.vtrans_layers[1]["intermediate"] == 0
    save_pruned(hand, root / "hand" / "model")
    save_pruned(_decided(make_tiny("llama")), root / "decided" / "model")
    return [root / "dense", root / "hand" / "model", root / "decided" / "model"]


def _check(result, labels):
    rows = result["rows"]
    assert [r["model"] for r in rows] == labels
    for r in rows:
        assert r["params"] > 0
        assert all(v > 0 for v in r["gflops_per_token"].values())
        assert set(r["prefill"]) == {"8", "16"} and all(p["seconds"] > 0 for p in r["prefill"].values())
        d = r["decode"]["1"]
        assert d["tokens_per_s"] > 0 and d["eager_tokens_per_s"] > 0
        assert d["greedy_match"], (r["model"], d["tokens"], d["eager_tokens"])
        assert len(d["tokens"]) == 7
    assert rows[1]["params"] < rows[0]["params"] and rows[2]["params"] < rows[0]["params"]
    lines = [line for line in result["table"].splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(labels)  # header + a row per model
    for label in labels:
        assert any(line.startswith(f"| {label} ") for line in lines)


def test_speed_bench_on_saved_models(model_dirs, tmp_path):
    out = tmp_path / "speed.md"
    result = speed.main(["--dense", str(model_dirs[0]), "--pruned", *map(str, model_dirs[1:]), "--no-compile",
                         "--out", str(out), *FAST])
    _check(result, ["dense", "hand/model", "decided/model"])
    assert out.read_text() == result["table"]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["environment"]["dtype"] == "float32" and len(saved["rows"]) == 3


def test_speed_bench_rounds_pool_the_timings_in_alternating_order(model_dirs, tmp_path, capsys):
    """--rounds 2: every model runs twice, the second round in reverse order; the timings are pooled and each
    round's speed-up against that round's dense is kept."""
    result = speed.main(["--dense", str(model_dirs[0]), "--pruned", str(model_dirs[1]), "--names", "dense", "p",
                         "--no-compile", "--rounds", "2", *FAST])
    assert [r["model"] for r in result["rows"]] == ["dense", "p"]
    log = [line.split(":")[0] for line in capsys.readouterr().err.splitlines() if line.endswith(" s") and "done" in line]
    assert log == ["dense (round 1/2)", "p (round 1/2)", "p (round 2/2)", "dense (round 2/2)"]
    dense, pruned = result["rows"]
    repeats = result["environment"]["repeats"]
    for row in (dense, pruned):
        assert row["rounds"] == 2
        for p in row["prefill"].values():
            assert len(p["all_seconds"]) == 2 * repeats and p["seconds"] == statistics.median(p["all_seconds"])
            assert len(p["round_seconds"]) == 2 and len(p["round_speedups"]) == 2
        d = row["decode"]["1"]
        assert len(d["all_seconds"]) == 2 * repeats and len(d["round_speedups"]) == 2
        assert d["tokens_per_s"] == pytest.approx(d["new_tokens"] / statistics.median(d["all_seconds"]))
    assert dense["decode"]["1"]["round_speedups"] == [1.0, 1.0]
    for n, p in pruned["prefill"].items():
        assert p["round_speedups"] == pytest.approx(
            [b / x for b, x in zip(dense["prefill"][n]["round_seconds"], p["round_seconds"])])
    assert "in 2 rounds" in result["table"] and "x, " in result["table"]  # the per-round range next to a speed-up
    x = statistics.median(pruned["decode"]["1"]["round_speedups"])
    assert f"({x:.2f}x, " in result["table"]  # the paired (per-round) speed-up, not the ratio of pooled medians
    with pytest.raises(SystemExit, match="--rounds=0"):
        speed.main(["--dense", str(model_dirs[0]), "--rounds", "0"])


def test_speed_bench_from_config_only(model_dirs, tmp_path):
    cfgs = tmp_path / "cfgs"
    speed.main(["--dense", str(model_dirs[0]), "--pruned", *map(str, model_dirs[1:]), "--names", "dense", "p1", "p2",
                "--save-configs", str(cfgs)])
    assert sorted(p.name for p in (cfgs / "p1").iterdir()) == ["common.py", "config.json", "llama.py"]
    assert [p.name for p in (cfgs / "dense").iterdir()] == ["config.json"]
    for f in ("common.py", "llama.py"):  # config.json alone: vtrans' own classes build it
        (cfgs / "p2" / f).unlink()
    result = speed.main(["--from-config", "--dense", str(cfgs / "dense"), "--pruned", str(cfgs / "p1"),
                         str(cfgs / "p2"), "--no-compile", *FAST])
    _check(result, ["dense", "p1", "p2"])
    assert all(r["random_weights"] for r in result["rows"])
    assert [r["class"] for r in result["rows"]] == ["LlamaForCausalLM"] + ["VTransLlamaForCausalLM"] * 2
    # real dense weights next to a pruned shape from its config alone
    mixed = speed.main(["--dense", str(model_dirs[0]), "--pruned", f"config:{cfgs / 'p1'}", str(model_dirs[2]),
                        "--no-compile", *FAST])
    _check(mixed, ["dense", "p1", "decided/model"])
    assert [r["random_weights"] for r in mixed["rows"]] == [False, True, False]
    assert "| p1 * |" in mixed["table"]
    assert result["rows"][1]["shape"] == mixed["rows"][1]["shape"]
    assert mixed["rows"][1]["params"] == result["rows"][1]["params"]


@pytest.mark.slow
def test_speed_bench_compiled_decode_matches_eager(model_dirs):
    """torch.compile (inductor on CPU, fullgraph) of the prefill and the static-cache step of the hand-pruned model:
    its layers without attention and without FFN trace into one graph (~70 s on one CPU thread)."""
    result = speed.main(["--dense", str(model_dirs[1]), "--compile-prefill", "on", "--prompt-lens", "8", *FAST[3:]])
    (row,) = result["rows"]
    d = row["decode"]["1"]
    assert d["compiled"] and d["fullgraph"] and d["compile_s"] > 0 and d["tokens_per_s"] > 0
    assert d["greedy_match"], (d["tokens"], d["eager_tokens"])
    assert row["prefill"]["8"]["compiled"] and row["prefill"]["8"]["fullgraph"]


# ---------------------------------------------------------------------------------------------- the llama.cpp engine


@pytest.fixture(scope="module")
def gguf_model_dirs(tmp_path_factory):
    """The dense and hand-pruned tiny LLaMAs with a byte-level BPE tokenizer (what GGUF needs) saved beside them."""
    from tests.tiny import bpe_tokenizer

    root = tmp_path_factory.mktemp("speed_gguf")
    tok = bpe_tokenizer()
    dense = make_tiny("llama", vocab_size=len(tok))
    dense.save_pretrained(root / "dense")
    save_pruned(_hand_pruned(make_tiny("llama", vocab_size=len(tok))), root / "hand")
    for d in ("dense", "hand"):
        tok.save_pretrained(root / d)
    return root


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (scripts/setup.sh installs it)")
def test_llama_cpp_engine_times_gguf_files_of_each_model(gguf_model_dirs, tmp_path):
    out = tmp_path / "speed_llama_cpp.md"
    result = speed.main(["--engine", "llama.cpp", "--dense", str(gguf_model_dirs / "dense"), "--pruned",
                         str(gguf_model_dirs / "hand"), "--names", "dense", "hand", "--gguf-types", "f32", "f16",
                         "--gguf-dir", str(tmp_path / "gguf"), "--prompt-lens", "8", "16", "--decode-prompt-len", "4",
                         "--new-tokens", "5", "--repeats", "1", "--warmup", "0", "--threads", "1", "--rounds", "2",
                         "--out", str(out)])
    rows = result["rows"]
    assert [(r["model"], r["gguf_type"]) for r in rows] == [("dense", "f32"), ("dense", "f16"), ("hand", "f32"),
                                                             ("hand", "f16")]
    assert [r["arch"] for r in rows] == ["llama", "llama", "deci", "deci"]  # per-layer shapes: deci
    for r in rows:
        assert Path(r["path"]).is_file() and r["file_bytes"] == Path(r["path"]).stat().st_size
        assert set(r["prefill"]) == {"8", "16"} and all(p["tokens_per_s"] > 0 for p in r["prefill"].values())
        assert len(r["prefill"]["8"]["all_tokens_per_s"]) == 2  # one repeat x two rounds, pooled
        assert r["decode"]["tokens_per_s"] > 0 and len(r["decode"]["tokens"]) == 5
    assert rows[2]["params"] < rows[0]["params"] and rows[2]["flops_per_token"] < rows[0]["flops_per_token"]
    lines = [line for line in result["table"].splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 4 and lines[1].startswith("| dense | f32 | llama |")
    assert "(1.00x)" in lines[1] and "llama_decode + llama_synchronize" in result["table"]
    assert out.read_text() == result["table"]
    assert json.loads(out.with_suffix(".json").read_text())["environment"]["engine"] == "llama.cpp"
