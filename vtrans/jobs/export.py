"""The export job: a pruned model directory (`model_dir`) -> a standalone directory <output_dir>/model.

Default: the vtrans format (weights, config with per-layer `vtrans_layers`, the family's copied modeling files and an
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

from .. import pipeline as P
from ..checkpoint import check_stop
from ..config import Config
from ..decision import DECISION_FILE
from ..log import RunLogger
from ..models import family_of, is_pruned, save_pruned, to_stock

log = logging.getLogger("vtrans")

_AUTO = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
         "question_answering": "AutoModelForQuestionAnswering"}


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
    (dest / "vtrans_export.json").write_text(json.dumps(info, indent=2))
    metrics = {**info, "export_dir": str(dest), "max_abs_diff": diff,
               "size_bytes": sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()),
               "flops_seq_len": cfg.budget.flops_seq_len}
    metrics.update(P.size_metrics(exported, cfg.budget.flops_seq_len))
    metrics["wall_time_s"] = time.perf_counter() - t0
    P.set_objective(cfg, metrics)
    logger.summary(metrics)
    logger.finish()
    log.info("exported %s -> %s (%s format, max |diff| %.2g)", src, dest, info["format"], diff)
    return metrics
