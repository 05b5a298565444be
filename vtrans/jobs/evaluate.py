"""The evaluate job: a saved model directory (`model_dir`), or the configured model: the task metric (and zero-shot
lm-eval tasks), parameters and FLOPs (with their ratios to the configured dense model), and the per-layer structure.
Stages from vtrans.pipeline."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from .. import pipeline as P
from ..accounting import flops_per_token, param_count
from ..checkpoint import check_stop
from ..config import Config
from ..evaluation import require_lm_eval
from ..log import RunLogger, write_structure

log = logging.getLogger("vtrans")


def run(cfg: Config, out: Path) -> dict:
    t0 = time.perf_counter()
    require_lm_eval(cfg.eval)  # before any model is loaded
    procs = P.setup(cfg)
    model, tokenizer = P.load(P.dir_model_config(cfg, cfg.model_dir) if cfg.model_dir else cfg.model,
                              device=procs.device)
    dense = P.loader(cfg.model, device=procs.device) if cfg.model_dir else (lambda: (model, tokenizer))
    _, held = P.documents(cfg, dense=dense)
    data = P.task_data(cfg, tokenizer, held)
    domains = P.domain_data(cfg, tokenizer)
    check_stop()
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="evaluate")
    metrics = {"model": cfg.model_dir or (cfg.model.name_or_path or f"{cfg.model.package}/{cfg.model.subdir}"),
               "eval_examples": len(held), "flops_seq_len": cfg.budget.flops_seq_len}
    metrics.update(P.size_metrics(model, cfg.budget.flops_seq_len))
    dense = P.dense_reference_shape(cfg) if cfg.model_dir else None
    if dense is not None:
        metrics["params_dense"] = int(param_count(dense))
        metrics["flops_dense"] = float(flops_per_token(dense, cfg.budget.flops_seq_len))
        metrics["params_ratio"] = metrics["params"] / metrics["params_dense"]
        metrics["flops_ratio"] = metrics["flops"] / metrics["flops_dense"]
    t_eval = time.perf_counter()
    metrics.update(P.evaluate(model, tokenizer, cfg, data, procs=procs))
    for k, v in P.evaluate_domains(model, cfg, domains, "model", procs=procs).items():  # ppl_<domain> (no suffix)
        metrics[k.removesuffix("_model")] = v
    metrics["eval_time_s"] = time.perf_counter() - t_eval
    rows = P.structure_rows(model, dense)
    if procs.is_main:
        metrics.update(write_structure(rows, out, "structure of the evaluated model"))
    logger.structure(rows, "structure of the evaluated model")
    metrics["wall_time_s"] = time.perf_counter() - t0
    P.report(cfg, out, metrics, logger)
    log.info("evaluate: %s", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics
