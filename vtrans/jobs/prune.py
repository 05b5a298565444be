"""The prune job, as its stages (vtrans.pipeline): load -> data -> attach -> evaluate the dense model -> warm start
-> train the masks (VTrans / Fast-VTrans / Faster-VTrans; a one-shot baseline scores instead) -> decide to the budget
-> materialise -> evaluate the pruned model -> save it and its metrics."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import pipeline as P
from ..accounting import flops_per_token, model_numel, param_count
from ..checkpoint import Checkpointer, batch_stream
from ..config import Config
from ..engine import fit, make_engine
from ..log import RunLogger, rows_from_decision
from ..masks.decide import check_reachable
from ..models import shape_of
from ..models.load import read_model_config
from ..pruning import PruningModule

log = logging.getLogger("vtrans")


def run(cfg: Config, out: Path) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.optim.seed)
    mask, optim = cfg.mask, cfg.optim
    # load: the family is checked from the config alone, before any weights are read
    model, tokenizer = P.load(cfg.model, config=read_model_config(cfg.model))
    data = P.prepare_data(cfg, tokenizer, fast_floor=mask.variant == "fast", dense=lambda: (model, tokenizer))
    domains = P.domain_data(cfg, tokenizer)
    teacher = P.frozen_teacher(cfg, model)
    mm = P.attach(cfg, model)
    budget = P.budget_of(cfg)
    check_reachable(mm, budget)  # before any training
    dense = mm.dense
    logger = RunLogger(cfg.logger, asdict(cfg), str(out))
    log.info("model %s: %s layers, hidden %s, %s params; %d train / %d held-out documents", dense.family,
             len(dense.layers), dense.hidden, f"{param_count(dense):,}", data.train_documents, data.held_documents)

    with mm.disabled():
        dense_eval = P.evaluate_dense(model, tokenizer, cfg, data.held, "dense")
        dense_domains = P.evaluate_domains(model, cfg, domains, "dense", dense=True)
    log.info("dense: %s", _fmt({**dense_eval, **dense_domains}))

    if mask.method == "vib":
        t_init = time.perf_counter()
        checkpointer = Checkpointer.from_config(cfg.checkpoint, out)
        resuming = checkpointer.resume and checkpointer.latest() is not None  # the restored masks replace any start
        if mask.init_from and not resuming:
            P.warm_start(cfg, mm, data.train)
        module = PruningModule(
            mm, budget, beta=mask.beta, kl_weights=dict(mask.kl_weights), task_weight=cfg.distill.task_weight,
            logit_weight=cfg.distill.logit_weight, temperature=cfg.distill.temperature,
            layer_weight=cfg.distill.layer_weight, layer_every=cfg.distill.layer_every,
            warmup_steps=round(cfg.budget.warmup_fraction * optim.steps), train_weights=mask.variant != "faster",
            teacher=teacher)
        engine = make_engine(module, module.param_groups(optim.mask_lr, optim.weight_lr, optim.lambda_lr,
                                                         optim.distill_lr), cfg)
        on_step = P.iterative_decisions(mm, budget, module.warmup_steps, module.final_ratio, cfg.budget.decide_every,
                                        optim.steps, cfg.export_uniform, cfg.budget.multiple_of)
        history = fit(engine, lambda start: batch_stream(data.train, optim.batch_size, optim.seed, start),
                      optim.steps, optim.grad_accum, on_log=logger.log, log_every=optim.log_every,
                      progress=cfg.progress, desc=f"{mask.variant}-vtrans", checkpointer=checkpointer, on_step=on_step)
        train_time = time.perf_counter() - t_init
        engine.consolidate()  # ZeRO-3: every rank gathers the trained shards back in full before decide / materialise
        is_main = engine.is_main
    else:  # a one-shot baseline: score the units on calibration batches, no training
        history, train_time = [], P.warm_start(cfg, mm, data.train)
        is_main = P.is_main_process()

    decision = P.decide(cfg, mm, budget)
    logger.structure(rows_from_decision(decision))
    pruned = P.materialise(cfg, mm, decision)
    P.check_budget(pruned, budget, decision.fit["target"])
    pruned_eval = P.evaluate(pruned, tokenizer, cfg, data.held, "pruned")
    pruned_domains = P.evaluate_domains(pruned, cfg, domains, "pruned")
    log.info("pruned: %s", _fmt({**pruned_eval, **pruned_domains}))

    pruned_shape = shape_of(pruned)
    params_dense, params_pruned = model_numel(model), model_numel(pruned)
    seq = cfg.budget.flops_seq_len
    metrics = {
        "variant": mask.variant if mask.method == "vib" else "one-shot",
        "method": mask.method,
        "model_family": dense.family,
        "budget_kind": budget.kind,
        "budget_target": cfg.budget.target,
        "budget_target_size": decision.fit["target"],
        "params_dense": params_dense,
        "params_pruned": params_pruned,
        "param_reduction": 1 - params_pruned / params_dense,
        "params_dense_no_embeddings": int(param_count(dense, embeddings=False)),
        "params_pruned_no_embeddings": int(param_count(pruned_shape, embeddings=False)),
        "flops_seq_len": seq,
        "flops_dense": float(flops_per_token(dense, seq)),
        "flops_pruned": float(flops_per_token(pruned_shape, seq)),
        "threshold_params_ratio": decision.fit["threshold_size"] / decision.fit["dense_size"],
        "shape_pruned": pruned_shape.summary(),
        "train_documents": data.train_documents,
        "train_sources": data.sources,
        "heldout_documents": data.held_documents,
        "train_steps": optim.steps,
        "train_tokens": optim.steps * optim.grad_accum * optim.batch_size * cfg.data.seq_len,
        "train_time_s": train_time,
        "final_loss": history[-1]["loss"] if history else None,
    }
    for k, v in dense_eval.items():
        metrics[f"{k}_dense" if not k.startswith("eval_") else k] = v
    for k, v in pruned_eval.items():
        if not k.startswith("eval_"):
            metrics[f"{k}_pruned"] = v
    metrics.update(dense_domains)
    metrics.update(pruned_domains)
    if cfg.model.task == "causal_lm":
        metrics.update(P.ratio_metrics(metrics, list(domains), "pruned", "dense"))
        metrics["eval_domains"] = dict(cfg.eval.domains)
    model_dir = out / "model"
    if is_main:  # one writer: every rank holds the same pruned model
        P.save_model(pruned, tokenizer, model_dir, decision)
    metrics["model_dir"] = str(model_dir)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    P.set_objective(cfg, metrics)
    logger.summary(metrics)
    logger.finish()
    if is_main:
        _print_summary(metrics)
    return metrics


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _print_summary(m: dict) -> None:
    rows = [("parameters", f"{m['params_dense']:,}", f"{m['params_pruned']:,}"),
            ("params w/o embeddings", f"{m['params_dense_no_embeddings']:,}", f"{m['params_pruned_no_embeddings']:,}"),
            (f"GFLOPs/token @ {m['flops_seq_len']}", f"{m['flops_dense'] / 1e9:.3f}", f"{m['flops_pruned'] / 1e9:.3f}")]
    if "ppl_dense" in m:
        rows.append(("held-out perplexity", f"{m['ppl_dense']:.3f}", f"{m['ppl_pruned']:.3f}"))
        for d in m.get("eval_domains", {}):
            rows.append((f"  {d} perplexity", f"{m[f'ppl_{d}_dense']:.3f}", f"{m[f'ppl_{d}_pruned']:.3f}"))
    if "accuracy_dense" in m:
        rows.append(("held-out accuracy", f"{m['accuracy_dense']:.4f}", f"{m['accuracy_pruned']:.4f}"))
    if "pearson_dense" in m:
        rows.append(("held-out Pearson", f"{m['pearson_dense']:.4f}", f"{m['pearson_pruned']:.4f}"))
    if "exact_match_dense" in m:
        rows.append(("held-out exact match", f"{m['exact_match_dense']:.4f}", f"{m['exact_match_pruned']:.4f}"))
        rows.append(("held-out SQuAD F1", f"{m['f1_dense']:.4f}", f"{m['f1_pruned']:.4f}"))
    name = f"{m['variant']}-VTrans" if m["method"] == "vib" else f"one-shot {m['method']} baseline"
    lines = [f"vtrans {name}: parameter reduction {m['param_reduction']:.1%}, "
             f"wall time {m['wall_time_s']:.0f} s (compression {m['train_time_s']:.0f} s)",
             f"{'':24s}{'dense':>16s}{'pruned':>16s}"]
    lines += [f"{a:24s}{b:>16s}{c:>16s}" for a, b, c in rows]
    if "ppl_ratio_calibration_domain" in m:
        lines.append(f"{'ppl ratio, calibration domain (held-out)':48s}{m['ppl_ratio_calibration_domain']:>8.3f}")
    if "ppl_ratio_cross_domain" in m:
        n = len(m.get("eval_domains", {}))
        lines.append(f"{f'ppl ratio, cross-domain (geo-mean of {n})':48s}{m['ppl_ratio_cross_domain']:>8.3f}")
    lines.append(f"pruned model: {m['model_dir']}")
    print("\n".join(lines), flush=True)
