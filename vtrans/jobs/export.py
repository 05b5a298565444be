"""The export job: a pruned model directory (`model_dir`) -> a standalone directory <output_dir>/model.

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
from ..config import Config
from ..strict_json import write as write_json
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

    if not P.is_main_process():  # one writer: the export is a single-process job
        return {"skipped": "not rank 0"}
    t0 = time.perf_counter()
    src = Path(cfg.model_dir)
    model, tokenizer = P.load(P.dir_model_config(cfg, str(src)))
    config = model.config
    pruned_format = is_pruned(config)  # else already stock (e.g. pruned with export_uniform=true)
    problems = family_of(config).uniform_problems(config) if cfg.export_uniform and pruned_format else []
    if problems:
        raise ValueError(f"export_uniform=true but {src} has no stock equivalent: " + "; ".join(problems)
                         + ". Export with export_uniform=false (loads with trust_remote_code=True).")
    dest = out / "model"
    if dest.exists():
        shutil.rmtree(dest)
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="export")
    auto = getattr(transformers, _AUTO[cfg.model.task])
    if pruned_format and not cfg.export_uniform:
        exported = model
        save_pruned(model, dest)
        remote_code = True
    else:
        exported = to_stock(model)
        exported.save_pretrained(dest)
        remote_code = False
    tokenizer.save_pretrained(dest)
    if (src / DECISION_FILE).is_file():  # the kept units travel with the model (the probe reads them)
        shutil.copyfile(src / DECISION_FILE, dest / DECISION_FILE)
    # the export must stand alone: reload it (remote code from its own folder) and compare outputs
    reloaded = auto.from_pretrained(dest, trust_remote_code=remote_code)
    inputs = _probe_inputs(model, getattr(config, "vocab_size", 100))
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
