"""The export job: a pruned model directory (`model_dir`) -> a standalone directory <output_dir>/model.

With `export_format=gguf`, one GGUF file for llama.cpp instead (<output_dir>/model/model-<export_gguf_type>.gguf, see
vtrans.gguf): read back and compared tensor by tensor with the model, and, when llama-cpp-python is installed, its
logits compared with the model's.

Default: the vtrans format (weights, config with per-layer `vtrans_layers`, the family's copied modeling files and an
auto_map), which loads with `Auto*.from_pretrained(dir, trust_remote_code=True)` without vtrans installed. With
`export_uniform=true` and a uniform shape (every layer keeps the same heads / KV heads / neurons, and the stock
classes' own size rules hold), a stock config instead: it loads with plain transformers, no remote code. A source
that is already stock (pruned with export_uniform=true) is exported as it is.
Either way the export is reloaded and its outputs compared with the source model's."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import pipeline as P
from ..checkpoint import check_stop
from ..config import Config
from ..strict_json import write as write_json
from ..decision import DECISION_FILE
from ..log import RunLogger
from ..models import family_of, is_pruned, save_pruned, to_stock

log = logging.getLogger("vtrans")

_AUTO = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
         "question_answering": "AutoModelForQuestionAnswering"}


# llama.cpp's logits vs the model's, relative to the largest logit (f32 KV cache): float rounding for f32; the
# weights' rounding for f16; for q8_0 also the 8-bit activations of llama.cpp's Q8_0 products (measured on tiny
# models: ~2e-6, ~6e-3, ~6e-2)
_LLAMA_CPP_TOLERANCE = {"f32": 1e-4, "f16": 5e-2, "q8_0": 1e-1}


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

    if not P.is_main_process():  # one writer: the export is a single-process job (rank 0)
        return {"skipped": "not rank 0"}
    t0 = time.perf_counter()
    device = P.setup(cfg).device
    src = Path(cfg.model_dir)
    source_cfg = P.dir_model_config(cfg, str(src))
    config = P.read_config(cfg, source_cfg)  # the config alone: a shape with no stock equivalent fails before loading
    if cfg.export_format == "gguf":
        from .. import gguf as G

        G.check_supported(config)  # before anything is loaded or written
        model, tokenizer = P.load(source_cfg, config=config, device=torch.device("cpu"))
        return _export_gguf(cfg, out, src, model, tokenizer, t0)
    pruned_format = is_pruned(config)  # else already stock (e.g. pruned with export_uniform=true)
    problems = family_of(config).uniform_problems(config) if cfg.export_uniform and pruned_format else []
    if problems:
        raise ValueError(f"export_uniform=true but {src} has no stock equivalent: " + "; ".join(problems)
                         + ". Export with export_uniform=false (loads with trust_remote_code=True).")
    model, tokenizer = P.load(source_cfg, config=config, device=device)
    check_stop()
    dest = out / "model"
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="export")
    auto = getattr(transformers, _AUTO[cfg.model.task])
    remote_code = pruned_format and not cfg.export_uniform
    exported = model if remote_code else to_stock(model)
    with P.writing_dir(dest, P.model_bytes(exported), "the exported model") as tmp:
        if remote_code:
            save_pruned(exported, tmp, max_shard_size=P.SHARD_SIZE)
        else:
            exported.save_pretrained(tmp, max_shard_size=P.SHARD_SIZE)
        P.save_tokenizer(tokenizer, tmp)
        if (src / DECISION_FILE).is_file():  # the kept units travel with the model (the probe reads them)
            shutil.copyfile(src / DECISION_FILE, tmp / DECISION_FILE)
    check_stop()
    # the export must stand alone: reload it (remote code from its own folder) and compare outputs
    reloaded = auto.from_pretrained(dest, trust_remote_code=remote_code).to(device)
    inputs = {k: v.to(device) for k, v in _probe_inputs(model, getattr(config, "vocab_size", 100)).items()}
    diff = float((_outputs(model, inputs) - _outputs(reloaded, inputs)).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"the exported model's outputs differ from the source model's by {diff:.3g}")
    info = {"source": str(src), "format": "vtrans" if remote_code else "stock",
            "trust_remote_code": remote_code, "model_type": reloaded.config.model_type,
            "architectures": reloaded.config.architectures}
    write_json(dest / "vtrans_export.json", info, indent=2)
    metrics = {**info, "export_dir": str(dest), "max_abs_diff": diff,
               "size_bytes": sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()),
               "flops_seq_len": cfg.budget.flops_seq_len}
    metrics.update(P.size_metrics(exported, cfg.budget.flops_seq_len))
    metrics["wall_time_s"] = time.perf_counter() - t0
    P.report(cfg, out, metrics, logger, {"model": dest, "decision": dest / DECISION_FILE})
    log.info("exported %s -> %s (%s format, max |diff| %.2g)", src, dest, info["format"], diff)
    return metrics


def _export_gguf(cfg: Config, out: Path, src: Path, model, tokenizer, t0: float) -> dict:
    from .. import gguf as G

    check_stop()
    dest = out / "model"
    name = f"model-{cfg.export_gguf_type}.gguf"
    path = dest / name
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="export")
    model = model.float()
    with P.writing_dir(dest, P.model_bytes(model), "the GGUF file") as tmp:  # f32 bytes: an upper bound
        info = G.write(model, tokenizer, tmp / name, cfg.export_gguf_type, name=src.parent.name or src.name)
        if (src / DECISION_FILE).is_file():
            shutil.copyfile(src / DECISION_FILE, tmp / DECISION_FILE)
    check_stop()
    metrics = {"source": str(src), "format": "gguf", "gguf_file": str(path), "gguf_type": cfg.export_gguf_type,
               "gguf_arch": info["arch"], "gguf_layers": info["layers"], "gguf_dropped_layers": info["dropped_layers"],
               "gguf_tensor_types": info["tensor_types"], "tokenizer_pre": info["tokenizer_pre"],
               "gguf_max_rel_diff": G.verify(path, model, cfg.export_gguf_type), "size_bytes": path.stat().st_size,
               "flops_seq_len": cfg.budget.flops_seq_len}
    if G.llama_cpp_available():  # the file as llama.cpp computes it, against the model
        ids = _probe_inputs(model, model.config.vocab_size)["input_ids"][0].tolist()
        expected = _outputs(model, {"input_ids": torch.tensor([ids])})[0].numpy()
        got = G.llama_cpp_logits(path, ids)
        metrics["llama_cpp_max_abs_diff"] = float(abs(got - expected).max())
        metrics["llama_cpp_max_rel_diff"] = metrics["llama_cpp_max_abs_diff"] / float(abs(expected).max() or 1.0)
        metrics["llama_cpp_top1_agreement"] = float((got.argmax(-1) == expected.argmax(-1)).mean())
        limit = _LLAMA_CPP_TOLERANCE[cfg.export_gguf_type]
        if metrics["llama_cpp_max_rel_diff"] > limit:
            raise RuntimeError(f"llama.cpp's logits for {path} differ from the model's by "
                               f"{metrics['llama_cpp_max_rel_diff']:.3g} of the largest logit (more than the {limit:g} "
                               f"that {cfg.export_gguf_type} weights explain)")
    metrics["llama_cpp_checked"] = "llama_cpp_max_abs_diff" in metrics
    write_json(dest / "vtrans_export.json", {k: metrics[k] for k in (
        "source", "format", "gguf_type", "gguf_arch", "gguf_layers", "gguf_dropped_layers", "tokenizer_pre")},
        indent=2)
    metrics.update(P.size_metrics(model, cfg.budget.flops_seq_len))
    metrics["wall_time_s"] = time.perf_counter() - t0
    P.report(cfg, out, metrics, logger, {"model": path, "decision": dest / DECISION_FILE})
    log.info("exported %s -> %s (GGUF %s, arch %s)", src, path, cfg.export_gguf_type, info["arch"])
    return metrics
