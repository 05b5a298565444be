"""The export job: a pruned model directory (`model_dir`) -> a standalone directory <output_dir>/model.

Default: the vtrans format (weights, config with per-layer `vtrans_layers`, the copied pruned_modeling.py and an
auto_map), which loads with `Auto*.from_pretrained(dir, trust_remote_code=True)` without vtrans installed. With
`export_uniform=true` and a uniform shape (every layer keeps the same heads / KV heads / neurons, and the stock
classes' own size rules hold), a stock config instead: it loads with plain transformers, no remote code. A source
that is already stock (pruned with export_uniform=true) is exported as it is.
Either way the export is reloaded and its outputs compared with the source model's."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import Config
from ..log import RunLogger
from . import is_main_process, set_objective
from .evaluate import dir_model_config, load, size_metrics

log = logging.getLogger("vtrans")

_AUTO = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
         "question_answering": "AutoModelForQuestionAnswering"}
# stock config fields that hold per-layer counts, per family: (heads, kv heads, intermediate)
_STOCK_FIELDS = {"llama": ("num_attention_heads", "num_key_value_heads", "intermediate_size"),
                 "bert": ("num_attention_heads", None, "intermediate_size"),
                 "roberta": ("num_attention_heads", None, "intermediate_size"),
                 "gpt2": ("n_head", None, "n_inner")}
_STOCK_TYPES = {"vtrans_llama": "llama", "vtrans_bert": "bert", "vtrans_roberta": "roberta", "vtrans_gpt2": "gpt2"}


def uniform_problems(config) -> list[str]:
    """Why this pruned config has no stock equivalent (empty when it has one)."""
    family = _STOCK_TYPES.get(config.model_type)
    if family is None:
        return [f"model_type {config.model_type!r} is not a vtrans pruned model"]
    layers = config.vtrans_layers
    problems = []
    distinct = {tuple(l[k] for k in ("heads", "kv_heads", "intermediate")) for l in layers}
    if len(distinct) > 1:
        problems.append(f"layers differ in (heads, kv_heads, intermediate): {sorted(distinct)}")
    if any(l["heads"] == 0 for l in layers):
        problems.append("some layers have no attention heads left")
    if any(l["intermediate"] == 0 for l in layers):
        problems.append("some layers have no FFN neurons left")
    hidden = config.n_embd if family == "gpt2" else config.hidden_size
    heads = layers[0]["heads"] if layers else 0
    if heads and hidden % heads:
        problems.append(f"hidden size {hidden} is not a multiple of the {heads} heads (stock config check)")
    if family != "llama" and heads and heads * config.head_dim != hidden:
        problems.append(f"{family} derives head size as hidden / heads: {heads} heads x head_dim {config.head_dim} "
                        f"!= hidden {hidden}")
    pooler = getattr(config, "vtrans_pooler_dim", None)
    if family in ("bert", "roberta") and pooler and pooler != hidden:
        problems.append(f"the pooler keeps width {pooler} while hidden is {hidden}")
    return problems


def stock_config(config):
    """The stock transformers config of a uniform pruned config (see uniform_problems)."""
    import transformers

    family = _STOCK_TYPES[config.model_type]
    values = config.to_dict()
    for key in ("model_type", "auto_map", "architectures", "transformers_version", "vtrans_layers",
                "vtrans_pooler_dim"):
        values.pop(key, None)
    layer = config.vtrans_layers[0]
    heads_f, kv_f, inter_f = _STOCK_FIELDS[family]
    values[heads_f] = layer["heads"]
    if kv_f:
        values[kv_f] = layer["kv_heads"]
    values[inter_f] = layer["intermediate"]
    if family != "llama":
        values.pop("head_dim", None)
    cls = {"llama": transformers.LlamaConfig, "bert": transformers.BertConfig,
           "roberta": transformers.RobertaConfig, "gpt2": transformers.GPT2Config}[family]
    return cls(**values)


def _probe_inputs(model, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(vocab, 4), (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs)
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits.float()
    return torch.cat([out.start_logits, out.end_logits], -1).float()


def run(cfg: Config, out: Path) -> dict:
    import transformers

    from ..models.pruned_modeling import save_pruned

    if not is_main_process():  # one writer: the export is a single-process job
        return {"skipped": "not rank 0"}
    t0 = time.perf_counter()
    src = Path(cfg.model_dir)
    model, tokenizer = load(dir_model_config(cfg, str(src)))
    config = model.config
    pruned_format = config.model_type in _STOCK_TYPES  # else already stock (e.g. pruned with export_uniform=true)
    problems = uniform_problems(config) if cfg.export_uniform and pruned_format else []
    if problems:
        raise ValueError(f"export_uniform=true but {src} has no stock equivalent: " + "; ".join(problems)
                         + ". Export with export_uniform=false (loads with trust_remote_code=True).")
    dest = out / "model"
    if dest.exists():
        shutil.rmtree(dest)
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="export")
    auto = getattr(transformers, _AUTO[cfg.model.task])
    if not pruned_format:
        exported = model
        model.save_pretrained(dest)
        remote_code = False
    elif cfg.export_uniform:
        stock = auto.from_config(stock_config(config))
        missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if [k for k in missing if k not in tied] or unexpected:
            raise RuntimeError(f"uniform export: state dict mismatch, missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        stock.tie_weights()
        exported = stock
        stock.save_pretrained(dest)
        remote_code = False
    else:
        exported = model
        save_pruned(model, dest)
        remote_code = True
    tokenizer.save_pretrained(dest)
    # the export must stand alone: reload it (remote code from its own folder) and compare outputs
    reloaded = auto.from_pretrained(dest, trust_remote_code=remote_code)
    inputs = _probe_inputs(model, getattr(config, "vocab_size", 100))
    diff = float((_outputs(model, inputs) - _outputs(reloaded, inputs)).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"the exported model's outputs differ from the source model's by {diff:.3g}")
    info = {"source": str(src), "format": "vtrans" if remote_code else "stock",
            "trust_remote_code": remote_code, "model_type": reloaded.config.model_type,
            "architectures": reloaded.config.architectures}
    (dest / "vtrans_export.json").write_text(json.dumps(info, indent=2))
    metrics = {**info, "export_dir": str(dest), "max_abs_diff": diff,
               "size_bytes": sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()),
               "flops_seq_len": cfg.budget.flops_seq_len}
    metrics.update(size_metrics(exported, cfg.budget.flops_seq_len))
    metrics["wall_time_s"] = time.perf_counter() - t0
    set_objective(cfg, metrics)
    logger.summary(metrics)
    logger.finish()
    log.info("exported %s -> %s (%s format, max |diff| %.2g)", src, dest, info["format"], diff)
    return metrics
