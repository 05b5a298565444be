"""Materialisation: fold the decided masks into the weights and slice away what they prune.

The result is a plain, smaller model (vtrans' pruned model classes, which record per-layer head and
neuron counts in their config and reload with `from_pretrained`). Folding follows the hooks in
`attach.py` exactly, so the materialised model computes what the hard-masked model computes.
"""
from __future__ import annotations

import torch

from ..models import pruned_modeling as pm
from .attach import MaskedModel

CONFIG_CLASSES = {
    "llama": pm.VTransLlamaConfig,
    "bert": pm.VTransBertConfig,
    "roberta": pm.VTransRobertaConfig,
    "gpt2": pm.VTransGPT2Config,
}
MODEL_CLASSES = {
    ("llama", "none"): pm.VTransLlamaModel,
    ("llama", "lm"): pm.VTransLlamaForCausalLM,
    ("llama", "cls"): pm.VTransLlamaForSequenceClassification,
    ("bert", "none"): pm.VTransBertModel,
    ("bert", "cls"): pm.VTransBertForSequenceClassification,
    ("bert", "qa"): pm.VTransBertForQuestionAnswering,
    ("roberta", "none"): pm.VTransRobertaModel,
    ("roberta", "cls"): pm.VTransRobertaForSequenceClassification,
    ("roberta", "qa"): pm.VTransRobertaForQuestionAnswering,
    ("gpt2", "none"): pm.VTransGPT2Model,
    ("gpt2", "lm"): pm.VTransGPT2LMHeadModel,
    ("gpt2", "cls"): pm.VTransGPT2ForSequenceClassification,
}
# modules of the task model (or the base model) whose input is the hidden dimension
HEAD_INPUTS = ("lm_head", "score", "pooler.dense", "classifier.dense", "qa_outputs")


class _Linear:
    """A projection's weight as [out, in] whatever its storage (nn.Linear or GPT-2's Conv1D [in, out])."""

    def __init__(self, sd: dict, prefix: str, conv1d: bool):
        self.sd, self.prefix, self.conv1d = sd, prefix, conv1d
        w = sd[prefix + ".weight"]
        self.w = w.t() if conv1d else w
        self.b = sd.get(prefix + ".bias")

    def select_out(self, idx, scale=None):
        self.w = self.w.index_select(0, idx)
        if self.b is not None:
            self.b = self.b.index_select(0, idx)
        if scale is not None:
            self.w = self.w * scale.to(self.w.dtype).unsqueeze(1)
            if self.b is not None:
                self.b = self.b * scale.to(self.b.dtype)
        return self

    def select_in(self, idx, scale=None):
        self.w = self.w.index_select(1, idx)
        if scale is not None:
            self.w = self.w * scale.to(self.w.dtype).unsqueeze(0)
        return self

    def store(self, out: dict) -> None:
        out[self.prefix + ".weight"] = (self.w.t() if self.conv1d else self.w).contiguous()
        if self.b is not None:
            out[self.prefix + ".bias"] = self.b.contiguous()


def _hard(mask, n: int, device):
    """(kept indices, mu on the kept units) of a mask; all units with mu 1 when the structure is not masked."""
    if mask is None:
        return torch.arange(n, device=device), torch.ones(n, device=device)
    keep = mask.kept()
    idx = keep.nonzero().flatten()
    return idx, mask.hard_values().index_select(0, idx).float()


def _scalar(mask) -> float:
    return 1.0 if mask is None else float(mask.hard_values()[0])


@torch.no_grad()
def materialize(mm: MaskedModel, dtype: torch.dtype | None = None):
    """Build the pruned model from the decided (or thresholded) masks. The masked model is left unchanged."""
    spec, dense, model = mm.spec, mm.dense, mm.model
    shape = mm.kept_shape()
    mask_params = {id(p) for m in mm.masks().values() for p in list(m.parameters()) + list(m.buffers())}
    sd = {k: v.detach().float() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in mask_params}
    device = next(iter(sd.values())).device
    base_prefix = next((b + "." for b in spec.base if hasattr(model, b)), "")
    layers_prefix = base_prefix + spec.layers + "."
    post = spec.post_norm
    hk, hmu = _hard(mm.hidden, dense.hidden, device)
    out: dict[str, torch.Tensor] = {}

    def norm(prefix: str, scale=None, divide=False):
        for suffix in (".weight", ".bias"):
            t = sd.get(prefix + suffix)
            if t is None:
                continue
            t = t.index_select(0, hk)
            if scale is not None:
                t = t / scale if divide else t * scale
            out[prefix + suffix] = t

    # embeddings, embedding / final norms, heads
    for path in spec.embeddings:
        key = base_prefix + path + ".weight"
        if key in sd:
            w = sd[key].index_select(1, hk)
            out[key] = w if post else w * hmu.unsqueeze(0)
    if post:
        norm(base_prefix + spec.embed_norm, hmu)
    else:
        tied_lm = dense.head == "lm" and dense.tied_embeddings
        norm(base_prefix + spec.final_norm, hmu if tied_lm else None, divide=True)
    for key, t in sd.items():
        if key.startswith(layers_prefix) or key in out or not key.endswith(".weight"):
            continue
        name = key[len(base_prefix):] if key.startswith(base_prefix) else key
        if name[: -len(".weight")] in HEAD_INPUTS:
            out[key] = t.index_select(1, hk)
            if key[: -len(".weight")] + ".bias" in sd:
                out[key[: -len(".weight")] + ".bias"] = sd[key[: -len(".weight")] + ".bias"]
    for key, t in sd.items():  # what the hidden dimension does not touch (classifier outputs, buffers) is kept
        if not key.startswith(layers_prefix) and key not in out:
            out[key] = t
    if dense.head == "lm" and dense.tied_embeddings and "lm_head.weight" in sd:
        out["lm_head.weight"] = out[base_prefix + spec.embeddings[0] + ".weight"]

    # layers
    new_index = 0
    for i, (ls, lm) in enumerate(zip(dense.layers, mm.layers)):
        kv_idx, kv_mu = _hard(lm.heads, ls.kv_heads, device)
        if lm.attention is not None and not bool(lm.attention.kept().all()):
            kv_idx, kv_mu = kv_idx[:0], kv_mu[:0]
        n_idx, n_mu = _hard(lm.neurons, ls.intermediate, device)
        if lm.ffn is not None and not bool(lm.ffn.kept().all()):
            n_idx, n_mu = n_idx[:0], n_mu[:0]
        if len(kv_idx) == 0 and len(n_idx) == 0:
            continue  # the whole layer is gone
        src, dst = f"{layers_prefix}{i}.", f"{layers_prefix}{new_index}."
        new_index += 1
        group, dh = mm.group, dense.head_dim
        a, f = _scalar(lm.attention), _scalar(lm.ffn)
        out_scale_attn = (torch.full_like(hmu, a) if post else a * hmu)
        out_scale_ffn = (torch.full_like(hmu, f) if post else f * hmu)
        layer_out: dict[str, torch.Tensor] = {}
        if len(kv_idx):
            q_heads = (kv_idx.unsqueeze(1) * group + torch.arange(group, device=device)).flatten()
            q_ch = (q_heads.unsqueeze(1) * dh + torch.arange(dh, device=device)).flatten()
            kv_ch = (kv_idx.unsqueeze(1) * dh + torch.arange(dh, device=device)).flatten()
            head_scale = kv_mu.repeat_interleave(group * dh)
            if len(spec.qkv) == 3:
                for path, ch in zip(spec.qkv, (q_ch, kv_ch, kv_ch)):
                    _Linear(sd, src + path, spec.conv1d).select_out(ch).select_in(hk).store(layer_out)
            else:  # fused q|k|v (gpt2)
                width = ls.heads * dh
                ch = torch.cat([q_ch, kv_ch + width, kv_ch + 2 * width])
                _Linear(sd, src + spec.qkv[0], spec.conv1d).select_out(ch).select_in(hk).store(layer_out)
            _Linear(sd, src + spec.o, spec.conv1d).select_in(q_ch, head_scale).select_out(hk, out_scale_attn) \
                .store(layer_out)
            if post:
                norm_prefix = src + spec.norms[0]
                for suffix in (".weight", ".bias"):
                    layer_out[norm_prefix + suffix] = sd[norm_prefix + suffix].index_select(0, hk) * hmu
        elif not post:  # zero-head attention keeps its (empty) projections and a zero output bias
            empty = torch.zeros(0, dtype=torch.long, device=device)
            for path in spec.qkv:
                _Linear(sd, src + path, spec.conv1d).select_out(empty).select_in(hk).store(layer_out)
            _Linear(sd, src + spec.o, spec.conv1d).select_in(empty).select_out(hk, torch.zeros_like(hmu)) \
                .store(layer_out)
        ffn_in_idx = n_idx
        for path in spec.ffn_in:
            if post and not len(n_idx):
                break
            _Linear(sd, src + path, spec.conv1d).select_out(ffn_in_idx).select_in(hk).store(layer_out)
        if len(n_idx) or not post:
            scale = out_scale_ffn if len(n_idx) else torch.zeros_like(hmu)
            _Linear(sd, src + spec.ffn_out, spec.conv1d).select_in(n_idx, n_mu).select_out(hk, scale) \
                .store(layer_out)
            if post:
                norm_prefix = src + spec.norms[1]
                for suffix in (".weight", ".bias"):
                    layer_out[norm_prefix + suffix] = sd[norm_prefix + suffix].index_select(0, hk) * hmu
        if not post:
            for path in spec.norms:
                for suffix in (".weight", ".bias"):
                    key = src + path + suffix
                    if key in sd:
                        layer_out[key] = sd[key].index_select(0, hk)
        for k, v in layer_out.items():
            out[dst + k[len(src):]] = v

    config = pruned_config(mm, shape)
    cls = MODEL_CLASSES[(dense.family, dense.head)]
    pruned = cls(config)
    target_dtype = dtype or next(model.parameters()).dtype
    missing, unexpected = pruned.load_state_dict({k: v for k, v in out.items()}, strict=False)
    tied = {"lm_head.weight"} if dense.tied_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"materialisation produced a state dict that does not fit the pruned model: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    if dense.tied_embeddings and dense.head == "lm":
        pruned.tie_weights()
    return pruned.to(dtype=target_dtype).eval()


def pruned_config(mm: MaskedModel, shape):
    """The pruned model's config: the dense config with the kept sizes and per-layer counts."""
    c = mm.model.config.to_dict()
    for k in ("model_type", "auto_map", "architectures", "transformers_version", "vtrans_layers"):
        c.pop(k, None)
    fam = shape.family
    layers = [{"heads": int(l.heads), "kv_heads": int(l.kv_heads), "intermediate": int(l.intermediate)}
              for l in shape.layers]
    c["head_dim"] = shape.head_dim
    c["vtrans_layers"] = layers
    if fam == "gpt2":
        c.update(n_embd=int(shape.hidden), n_layer=len(layers))
    else:
        c.update(hidden_size=int(shape.hidden), num_hidden_layers=len(layers))
    if fam in ("bert", "roberta") and shape.pooler_dim:
        c["vtrans_pooler_dim"] = shape.pooler_dim
    if "layer_types" in c and c["layer_types"] is not None:
        kept = [i for i, l in enumerate(mm.dense.layers) if _layer_kept(mm, i)]
        c["layer_types"] = [c["layer_types"][i] for i in kept]
    return CONFIG_CLASSES[fam](**c)


def _layer_kept(mm: MaskedModel, i: int) -> bool:
    lm = mm.layers[i]
    heads = lm.heads is None or bool(lm.heads.kept().any())
    if lm.attention is not None and not bool(lm.attention.kept().all()):
        heads = False
    neurons = lm.neurons is None or bool(lm.neurons.kept().any())
    if lm.ffn is not None and not bool(lm.ffn.kept().all()):
        neurons = False
    return heads or neurons



def to_stock(pruned):
    """A uniformly pruned vtrans model as the stock transformers class (loads without trust_remote_code)."""
    import transformers

    from ..models.spec import shape_of

    shape = shape_of(pruned)
    layers = shape.layers
    if any((l.heads, l.kv_heads, l.intermediate) != (layers[0].heads, layers[0].kv_heads, layers[0].intermediate)
           for l in layers):
        raise ValueError(f"the pruned shape is not uniform ({shape.summary()}); decide with a uniform decision "
                         "(export_uniform=true) to export stock classes")
    fam = shape.family
    c = pruned.config.to_dict()
    for k in ("model_type", "auto_map", "architectures", "transformers_version", "vtrans_layers",
              "vtrans_pooler_dim"):
        c.pop(k, None)
    l0 = layers[0]
    if fam == "llama":
        c.update(num_attention_heads=l0.heads, num_key_value_heads=l0.kv_heads, intermediate_size=l0.intermediate,
                 head_dim=shape.head_dim)
    elif fam == "gpt2":
        c.pop("head_dim", None)
        c.update(n_head=l0.heads, n_inner=l0.intermediate)
    else:
        c.pop("head_dim", None)
        c.update(num_attention_heads=l0.heads, intermediate_size=l0.intermediate)
    config_cls = getattr(transformers, {"llama": "LlamaConfig", "bert": "BertConfig", "roberta": "RobertaConfig",
                                        "gpt2": "GPT2Config"}[fam])
    config = config_cls(**c)
    cls = getattr(transformers, type(pruned).__name__.removeprefix("VTrans"))  # e.g. VTransLlamaForCausalLM
    stock = cls(config)
    stock.load_state_dict(pruned.state_dict(), strict=True)
    return stock.to(next(pruned.parameters()).dtype).eval()
