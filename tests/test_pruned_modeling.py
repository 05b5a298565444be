"""Tests for the pruned config and model classes of every family (vtrans/models/<family>.py): per-layer pruned
configs and models for llama, mistral, qwen2, bert, roberta, gpt2.

Covers the no-op resize (full shape == stock model), non-uniform pruned shapes (zero-head / zero-FFN layers,
per-layer GQA, odd hidden sizes), cached generation, and save + reload with and without vtrans on the path.
"""
import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from vtrans.models import FAMILIES, modeling_files, register_auto, save_pruned

VOCAB = 100
HEAD_DIM = 16
PRUNED_HIDDEN = 50  # divisible by neither 4 nor 8 heads
LINEAGE = ("llama", "mistral", "qwen2")  # the LLaMA layout with grouped-query attention

_LINEAGE_KWARGS = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    head_dim=HEAD_DIM, intermediate_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
_ENCODER_KWARGS = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=64)
STOCK_KWARGS = {
    **{f: _LINEAGE_KWARGS for f in LINEAGE},
    "bert": _ENCODER_KWARGS,
    "roberta": _ENCODER_KWARGS,
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=64, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
}
FULL_LAYER = {
    **{f: {"heads": 8, "kv_heads": 2, "intermediate": 128} for f in LINEAGE},
    **{f: {"heads": 4, "kv_heads": 4, "intermediate": 128} for f in ("bert", "roberta", "gpt2")},
}


def _layers(*rows):
    return [{"heads": h, "kv_heads": kv, "intermediate": i} for h, kv, i in rows]


# Layer 0 has no heads, layer 1 no FFN, heads differ per layer, layer 4 is empty (both blocks removed).
PRUNED_LAYERS = {
    **{f: _layers((0, 0, 96), (8, 2, 0), (4, 4, 128), (6, 3, 37), (0, 0, 0)) for f in LINEAGE},
    **{f: _layers((0, 0, 96), (4, 4, 0), (2, 2, 128), (3, 3, 37), (0, 0, 0)) for f in ("bert", "roberta", "gpt2")},
}

STOCK_CONFIG = {name: fam.stock_config for name, fam in FAMILIES.items()}
VT_CONFIG = {name: fam.pruned_config for name, fam in FAMILIES.items()}
AUTO = {"none": "AutoModel", "lm": "AutoModelForCausalLM", "cls": "AutoModelForSequenceClassification",
        "qa": "AutoModelForQuestionAnswering"}
# (family, head) -> (stock class, vtrans class, Auto class name)
CLASSES = {(name, head): (fam.stock_models[head], cls, AUTO[head])
           for name, fam in FAMILIES.items() for head, cls in fam.pruned_models.items()}
CASES = sorted(CLASSES)
OUTPUT_KEYS = ("logits", "start_logits", "end_logits", "last_hidden_state", "pooler_output")


def _vt_kwargs(family, layers, hidden=None):
    kwargs = dict(STOCK_KWARGS[family], head_dim=HEAD_DIM, vtrans_layers=layers)
    hidden_key = "n_embd" if family == "gpt2" else "hidden_size"
    layer_key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    kwargs[layer_key] = len(layers)
    if hidden is not None:
        kwargs[hidden_key] = hidden
    return kwargs


def _pruned_config(family, **overrides):
    return VT_CONFIG[family](**{**_vt_kwargs(family, PRUNED_LAYERS[family], PRUNED_HIDDEN), **overrides})


def _input_ids(batch=2, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)  # no pad/bos/eos ids


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return {key: out[key] for key in OUTPUT_KEYS if out.get(key) is not None}


def _base(model):
    return model.base_model


def _layer_modules(family, model):
    base = _base(model)
    return {"gpt2": lambda: base.h, "bert": lambda: base.encoder.layer,
            "roberta": lambda: base.encoder.layer}.get(family, lambda: base.layers)()


def _expected_layer_params(family, hidden, heads, kv_heads, intermediate, attention_bias=False, mlp_bias=False):
    q, kv = heads * HEAD_DIM, kv_heads * HEAD_DIM
    if family in LINEAGE:
        attn = hidden * q + 2 * hidden * kv + q * hidden
        attn += (q + 2 * kv + hidden) if attention_bias else 0
        attn += (q + 2 * kv) if family == "qwen2" else 0  # qwen2: q/k/v biases, none on o_proj
        mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if mlp_bias else 0)
        return attn + mlp + 2 * hidden
    if family == "gpt2":
        attn = hidden * 3 * q + 3 * q + q * hidden + hidden
        mlp = hidden * intermediate + intermediate + intermediate * hidden + hidden
        return attn + mlp + 4 * hidden
    # bert / roberta: removed blocks take their parameters (and LayerNorm) with them
    attn = (3 * (hidden * q + q) + q * hidden + hidden + 2 * hidden) if heads else 0
    ffn = (hidden * intermediate + intermediate + intermediate * hidden + hidden + 2 * hidden) if intermediate else 0
    return attn + ffn


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(VT_CONFIG))
def test_config_defaults_to_full_shape_and_round_trips(family, tmp_path):
    full = VT_CONFIG[family](**STOCK_KWARGS[family])  # head_dim: llama explicit, others hidden // heads
    assert full.vtrans_layers == [FULL_LAYER[family]] * 4
    assert full.head_dim == HEAD_DIM

    config = _pruned_config(family)
    assert config.model_type == f"vtrans_{family}"
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vtrans_layers"] == PRUNED_LAYERS[family]
    assert saved["head_dim"] == HEAD_DIM
    loaded = VT_CONFIG[family].from_pretrained(tmp_path)
    assert type(loaded) is VT_CONFIG[family]
    assert loaded.vtrans_layers == PRUNED_LAYERS[family]
    assert loaded.hidden_size == PRUNED_HIDDEN
    assert loaded.head_dim == HEAD_DIM
    assert loaded.num_hidden_layers == len(PRUNED_LAYERS[family])


@pytest.mark.parametrize(
    "family, layers, match",
    [
        ("llama", _layers((8, 2, 128)) * 3, "has 3 entries"),
        ("llama", _layers((8, 3, 128)) * 4, "kv_heads=3 does not divide heads=8"),
        ("llama", _layers((8, 0, 128)) * 4, "kv_heads=0 and heads=8"),
        ("llama", _layers((0, 2, 128)) * 4, "kv_heads=2 and heads=0"),
        ("llama", _layers((8, 2, -1)) * 4, r"\['intermediate'\] must be a non-negative int, got -1"),
        ("llama", _layers((8, 2, 1.5)) * 4, r"\['intermediate'\] must be a non-negative int, got 1.5"),
        ("gpt2", _layers((True, True, 4)) * 4, r"\['heads'\] must be a non-negative int, got True"),
        ("bert", _layers((4, 2, 128)) * 4, "kv_heads=2 must equal heads=4"),
        ("roberta", [{"heads": 4, "kv_heads": 4}] * 4, "must have exactly the keys"),
    ],
)
def test_config_rejects_bad_layers(family, layers, match):
    with pytest.raises(ValueError, match=match):
        VT_CONFIG[family](**{**STOCK_KWARGS[family], "head_dim": HEAD_DIM, "vtrans_layers": layers})  # 4 layers


def test_config_normalises_integer_like_counts(tmp_path):
    layers = [{"heads": torch.tensor(8), "kv_heads": torch.tensor(2), "intermediate": torch.tensor(64)}] * 4
    config = VT_CONFIG["llama"](**{**STOCK_KWARGS["llama"], "vtrans_layers": layers})
    assert config.vtrans_layers == [FULL_LAYER["llama"] | {"intermediate": 64}] * 4
    assert all(type(v) is int for layer in config.vtrans_layers for v in layer.values())
    config.save_pretrained(tmp_path)  # plain ints serialise to JSON
    assert VT_CONFIG["llama"].from_pretrained(tmp_path).vtrans_layers == config.vtrans_layers


def test_config_allows_hidden_not_divisible_by_heads(tmp_path):
    layers = _layers((9, 3, 64), (9, 9, 32))
    kwargs = {**_vt_kwargs("llama", layers, hidden=500), "num_attention_heads": 9, "num_key_value_heads": 3}
    config = VT_CONFIG["llama"](**kwargs)
    config.validate()  # the stock `hidden_size % num_attention_heads` check would reject 500 / 9
    config.save_pretrained(tmp_path)  # save_pretrained runs the strict validators too
    assert VT_CONFIG["llama"].from_pretrained(tmp_path).hidden_size == 500
    model = FAMILIES["llama"].pruned_models["lm"](config).eval()
    with torch.no_grad():
        assert model(_input_ids()).logits.shape == (2, 7, VOCAB)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (9 * HEAD_DIM, 500)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, head", CASES)
def test_full_shape_matches_stock_model(family, head):
    stock_class, vt_class, _ = CLASSES[family, head]
    torch.manual_seed(0)
    stock = stock_class(STOCK_CONFIG[family](**STOCK_KWARGS[family])).eval()
    config = VT_CONFIG[family](**_vt_kwargs(family, [FULL_LAYER[family]] * 4))
    model = vt_class(config).eval()
    model.load_state_dict(stock.state_dict(), strict=True)
    ids = _input_ids()
    expected, got = _outputs(stock, ids), _outputs(model, ids)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, head", CASES)
def test_pruned_shape_forward_and_parameter_counts(family, head):
    _, vt_class, _ = CLASSES[family, head]
    torch.manual_seed(0)
    config = _pruned_config(family)
    model = vt_class(config).eval()
    ids = _input_ids(batch=2, length=7)
    out = _outputs(model, ids)
    if head == "none":
        assert out["last_hidden_state"].shape == (2, 7, PRUNED_HIDDEN)
    elif head == "lm":
        assert out["logits"].shape == (2, 7, VOCAB)
    elif head == "cls":
        assert out["logits"].shape == (2, 2)
    else:
        assert out["start_logits"].shape == out["end_logits"].shape == (2, 7)
    assert all(torch.isfinite(t).all() for t in out.values())

    layers = _layer_modules(family, model)
    assert len(layers) == len(PRUNED_LAYERS[family])
    for layer, shape in zip(layers, PRUNED_LAYERS[family]):
        count = sum(p.numel() for p in layer.parameters())
        expected = _expected_layer_params(family, PRUNED_HIDDEN, shape["heads"], shape["kv_heads"], shape["intermediate"])
        assert count == expected, (shape, count, expected)
    # the stock parameter names survive (only removed post-norm blocks lose theirs)
    names = set(dict(model.named_parameters()))
    if family in LINEAGE:
        assert "layers.0.self_attn.q_proj.weight" in {n.removeprefix("model.") for n in names}
    if family == "gpt2":
        assert "h.0.attn.c_attn.weight" in {n.removeprefix("transformer.") for n in names}
    if family in ("bert", "roberta"):
        stripped = {n.removeprefix(f"{family}.") for n in names}
        assert not any(n.startswith("encoder.layer.0.attention.") for n in stripped)
        assert "encoder.layer.0.intermediate.dense.weight" in stripped
        assert not any(n.startswith("encoder.layer.1.intermediate.") or n.startswith("encoder.layer.1.output.") for n in stripped)
        assert "encoder.layer.1.attention.self.query.weight" in stripped


@pytest.mark.parametrize("family, head", CASES)
def test_pruned_model_loads_a_sliced_stock_state_dict(family, head):
    """Pruned parameter names are stock names, so a sliced stock state dict loads with strict=True."""
    stock_class, vt_class, _ = CLASSES[family, head]
    layer_key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    torch.manual_seed(0)
    overrides = {layer_key: len(PRUNED_LAYERS[family])}
    if family in LINEAGE:
        overrides["num_key_value_heads"] = 4  # >= every pruned layer's kv_heads, so slicing suffices
    stock = stock_class(STOCK_CONFIG[family](**{**STOCK_KWARGS[family], **overrides}))
    model = vt_class(_pruned_config(family)).eval()
    stock_state = stock.state_dict()
    sliced = {}
    for name, target in model.state_dict().items():
        tensor = stock_state[name]  # KeyError = a name the stock model does not have
        for dim, size in enumerate(target.shape):
            tensor = tensor.narrow(dim, 0, size)
        sliced[name] = tensor.clone()
    model.load_state_dict(sliced, strict=True)
    out = _outputs(model, _input_ids())
    assert out and all(torch.isfinite(t).all() for t in out.values())
    assert torch.equal(model.state_dict()[next(iter(sliced))], next(iter(sliced.values())))


@pytest.mark.parametrize("family", LINEAGE)
def test_lineage_layer_attributes_follow_per_layer_counts(family):
    model = FAMILIES[family].pruned_models["none"](_pruned_config(family))
    groups = [layer.self_attn.num_key_value_groups for layer in model.layers]
    assert groups == [1, 4, 1, 2, 1]
    assert [layer.self_attn.head_dim for layer in model.layers] == [HEAD_DIM] * 5
    assert model.rotary_emb.inv_freq.numel() == HEAD_DIM // 2
    assert [layer.mlp.intermediate_size for layer in model.layers] == [96, 0, 128, 37, 0]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_post_norm_zero_blocks_are_skipped(family):
    torch.manual_seed(0)
    model = CLASSES[family, "none"][1](_pruned_config(family)).eval()
    layers = model.encoder.layer
    x = torch.randn(2, 5, PRUNED_HIDDEN)

    # heads == 0: the attention sub-block returns its input unchanged (no LayerNorm), seen through a hook
    seen = {}
    handle = layers[0].attention.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0], out=out[0]))
    with torch.no_grad():
        y0 = layers[0](x)
    handle.remove()
    assert seen["out"] is seen["inp"]
    assert torch.equal(seen["inp"], x)
    assert not list(layers[0].attention.parameters())
    with torch.no_grad():
        assert torch.equal(y0, layers[0].output(layers[0].intermediate(x), x))  # FFN alone
        assert not torch.allclose(y0, x)

    # intermediate == 0: the FFN sub-block (incl. its LayerNorm) is skipped, layer output = attention output
    with torch.no_grad():
        attn_out, _ = layers[1].attention(x)
        y1 = layers[1](x)
    assert torch.equal(y1, attn_out)
    assert not torch.allclose(attn_out, x)
    assert not list(layers[1].intermediate.parameters()) and not list(layers[1].output.parameters())

    # both removed: the whole layer is the identity
    with torch.no_grad():
        assert torch.equal(layers[4](x), x)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_pre_norm_zero_blocks_output_their_bias(family, attn_implementation):
    torch.manual_seed(0)
    extra = {"attention_bias": True, "mlp_bias": True} if family == "llama" else {}
    config = _pruned_config(family, **extra)
    config._attn_implementation = attn_implementation
    model = CLASSES[family, "none"][1](config).eval()
    layers = _layer_modules(family, model)
    attn0 = layers[0].self_attn if family == "llama" else layers[0].attn
    mlp1 = layers[1].mlp
    out_bias = attn0.o_proj.bias if family == "llama" else attn0.c_proj.bias
    down_bias = mlp1.down_proj.bias if family == "llama" else mlp1.c_proj.bias
    with torch.no_grad():
        out_bias.normal_()
        down_bias.normal_()
    seen = {}
    hooks = [
        attn0.register_forward_hook(lambda mod, args, out: seen.update(attn=out[0])),
        mlp1.register_forward_hook(lambda mod, args, out: seen.update(mlp=out)),
    ]
    ids = _input_ids(batch=2, length=6)
    with torch.no_grad():
        out = model(ids)
    for hook in hooks:
        hook.remove()
    assert out.last_hidden_state.shape == (2, 6, PRUNED_HIDDEN)
    torch.testing.assert_close(seen["attn"], out_bias.expand(2, 6, -1))
    torch.testing.assert_close(seen["mlp"], down_bias.expand(2, 6, -1))
    if attn_implementation == "eager":  # one attention map per layer, empty for the zero-head layers
        with torch.no_grad():
            maps = model(ids, output_attentions=True).attentions
        heads = [layer["heads"] for layer in PRUNED_LAYERS[family]]
        assert [tuple(m.shape) for m in maps] == [(2, h, 6, 6) for h in heads]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_generate_with_cache_matches_full_forward_greedy(family, attn_implementation):
    torch.manual_seed(0)
    config = _pruned_config(family)
    config._attn_implementation = attn_implementation
    model = CLASSES[family, "lm"][1](config).eval()
    assert PRUNED_LAYERS[family][0]["heads"] == 0
    model.generation_config.eos_token_id = None  # always generate all 5 tokens
    ids = _input_ids(batch=2, length=5, seed=1)

    with torch.no_grad():
        # the zero-head layer 0 keeps the cache length right (cache.get_seq_length() reads layer 0)
        prefill = model(ids, use_cache=True)
        # transformers >= 5.24 names the cache `cache` (in and out); earlier 5.x `past_key_values`
        cache = getattr(prefill, "cache", None) or prefill.past_key_values
        assert all(cache.get_seq_length(i) == 5 for i in range(len(PRUNED_LAYERS[family])))
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step = model(ids[:, :1] + 1, use_cache=True, **{cache_arg: cache})
        assert cache.get_seq_length() == 6
        full = model(torch.cat([ids, ids[:, :1] + 1], dim=1), use_cache=False)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)

        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        seq = ids
        for _ in range(5):
            logits = model(seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert generated.shape == (2, 10)
    assert torch.equal(generated, seq)


# ----------------------------------------------------------------------------------------------------------------
# Saving and reloading
# ----------------------------------------------------------------------------------------------------------------

_SUBPROCESS_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["vtrans"] = None  # any `import vtrans` now fails: the checkpoint must stand alone
    import torch, transformers
    for case in json.load(open(sys.argv[1])):
        auto_class = getattr(transformers, case["auto"])
        model = auto_class.from_pretrained(case["dir"], trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(input_ids=torch.load(case["input"]))
        result = {key: out[key] for key in case["keys"]}
        result["class"] = type(model).__name__
        result["module"] = type(model).__module__
        torch.save(result, case["output"])
    """
)


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned_ckpts")
    ids = _input_ids(batch=2, length=6, seed=2)
    torch.save(ids, root / "ids.pt")
    cases, expected = [], {}
    for family, head in CASES:
        _, vt_class, auto_name = CLASSES[family, head]
        torch.manual_seed(0)
        model = vt_class(_pruned_config(family)).eval()
        out_dir = root / f"{family}-{head}"
        assert save_pruned(model, out_dir) == str(out_dir)
        expected[family, head] = _outputs(model, ids)
        cases.append(
            {
                "dir": str(out_dir),
                "auto": auto_name,
                "input": str(root / "ids.pt"),
                "keys": sorted(expected[family, head]),
                "output": str(root / f"{family}-{head}.out.pt"),
            }
        )
    (root / "cases.json").write_text(json.dumps(cases))
    (root / "loader.py").write_text(_SUBPROCESS_LOADER)
    work = root / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf_modules"))
    proc = subprocess.run(
        [sys.executable, str(root / "loader.py"), str(root / "cases.json")],
        cwd=work, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, ids, expected


@pytest.mark.parametrize("family, head", CASES)
def test_saved_checkpoint_files(saved_checkpoints, family, head):
    root, _, _ = saved_checkpoints
    out_dir = root / f"{family}-{head}"
    files = modeling_files(FAMILIES[family])
    assert files[0].stem == family  # the family's own file first, then what it imports relatively
    for source in files:
        assert (out_dir / source.name).read_text() == source.read_text()
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["auto_map"] == FAMILIES[family].auto_map(family)
    assert saved["model_type"] == f"vtrans_{family}"
    assert saved["vtrans_layers"] == PRUNED_LAYERS[family]


@pytest.mark.parametrize("family, head", CASES)
def test_reload_in_fresh_process_with_remote_code(saved_checkpoints, family, head):
    root, _, expected = saved_checkpoints
    got = torch.load(root / f"{family}-{head}.out.pt")
    assert got.pop("class") == CLASSES[family, head][1].__name__
    assert got.pop("module").startswith("transformers_modules.")  # the copied modeling files, not vtrans
    assert got.keys() == expected[family, head].keys()
    for key, value in expected[family, head].items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, head", CASES)
def test_reload_in_process_after_register_auto(saved_checkpoints, family, head):
    root, ids, expected = saved_checkpoints
    register_auto()
    register_auto()  # idempotent
    _, vt_class, auto_name = CLASSES[family, head]
    config = transformers.AutoConfig.from_pretrained(root / f"{family}-{head}")
    assert type(config) is VT_CONFIG[family]
    model = getattr(transformers, auto_name).from_pretrained(root / f"{family}-{head}").eval()
    assert type(model) is vt_class
    got = _outputs(model, ids)
    for key, value in expected[family, head].items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_register_auto_maps_every_class():
    register_auto()
    for family, fam in FAMILIES.items():
        config_class = VT_CONFIG[family]
        assert transformers.CONFIG_MAPPING[f"vtrans_{family}"] is config_class
        for auto_name, target in fam.auto_map(family).items():
            assert target.startswith(f"{family}.")
            if auto_name != "AutoConfig":
                auto_class = getattr(transformers, auto_name)
                assert auto_class._model_mapping[config_class].__name__ == target.split(".", 1)[1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_modeling_files_are_self_contained(family):
    """What a checkpoint carries imports only the standard library, torch, transformers (huggingface_hub), and its
    sibling files, relatively; no print."""
    files = modeling_files(FAMILIES[family])
    names = {f.stem for f in files}
    for path in files:
        tree = ast.parse(path.read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and node.module in names, (path.name, node.module)
                else:
                    roots.add(node.module.split(".")[0])
        third_party = roots - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers", "huggingface_hub"}, (path.name, third_party)
        assert not any(isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
                       for node in ast.walk(tree))
