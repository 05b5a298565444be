"""The prune job, as its stages (vtrans.pipeline): load (the model's config first: the family's conflicts fail
here) -> data -> attach -> evaluate the dense model -> warm start -> train the masks (VTrans / Fast-VTrans /
Faster-VTrans; a one-shot baseline scores instead) -> decide to the budget -> materialise -> (mask.compensate: refit
the output projections) -> save the pruned model ->
evaluate it -> its metrics (metrics.json, written by vtrans.jobs.run).

The model is saved before its evaluation, and does not depend on the end-of-training checkpoint: that checkpoint
only spares a rerun the training when the job stops before the model is written, so it is written only when the
disk keeps room for the model too, and a failure to write it is a warning."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import pipeline as P
from ..accounting import flops_per_token, model_numel, param_count
from ..checkpoint import Checkpointer, batch_stream, check_stop
from ..config import Config, training_fingerprint
from ..decision import DECISION_FILE
from ..engine import fit, make_engine
from ..log import RunLogger, rows_from_decision
from ..masks.compensate import mask_scales
from ..masks.decide import check_reachable
from ..models import shape_of
from ..pruning import PruningModule

log = logging.getLogger("vtrans")


def run(cfg: Config, out: Path) -> dict:
    t_start = time.perf_counter()
    procs = P.setup(cfg)
    sharded = P.sharding(cfg, procs)  # ZeRO-3: every model is built partitioned, none is ever whole on a rank
    lockstep = sharded is not None  # a partitioned model's forward is a collective: every rank runs as many
    torch.manual_seed(cfg.optim.seed)
    mask, optim = cfg.mask, cfg.optim
    # load: the family and its conflicts are checked from the config alone, before any weights or data are read
    model, tokenizer = P.load(cfg.model, config=P.read_config(cfg), device=procs.device, sharded=sharded)
    model_room = P.model_bytes(model)  # the dense size bounds the pruned model's (the end checkpoint leaves room)
    # teacher:N samples come from the dense model; a partitioned one cannot sample on one rank: a whole copy does
    dense_model = P.loader(cfg.model, device=procs.device) if sharded else (lambda: (model, tokenizer))
    data = P.prepare_data(cfg, tokenizer, fast_floor=mask.variant == "fast", procs=procs, dense=dense_model)
    domains = P.domain_data(cfg, tokenizer)
    teacher = P.frozen_teacher(cfg, model, sharded)
    mm = P.attach(cfg, model)
    budget = P.budget_of(cfg)
    check_reachable(mm, budget)  # before any training
    if mask.compensate_correct > 0 and mm.family.post_norm:
        raise ValueError(f"mask.compensate_correct={mask.compensate_correct} points the refit at the dense model's "
                         f"residual stream, which needs a pre-norm family; {mm.family.name} normalises after each "
                         "block: use mask.compensate_correct=0")
    dense = mm.dense
    logger = RunLogger(cfg.logger, asdict(cfg), str(out))
    log.info("model %s: %s layers, hidden %s, %s params on %s%s; %d train / %d held-out documents", dense.family,
             len(dense.layers), dense.hidden, f"{param_count(dense):,}", procs.device,
             f" (ZeRO-3, {procs.world_size} ranks)" if sharded else "", data.train_documents, data.held_documents)

    engine, checkpointer = None, None
    if mask.method == "vib":  # the engine first: under ZeRO-3 its hooks gather each layer for every forward
        checkpointer = Checkpointer.from_config(cfg.checkpoint, out, training_fingerprint(cfg))
        P.prepare_training(cfg, model)
        module = PruningModule(
            mm, budget, beta=mask.beta, kl_weights=dict(mask.kl_weights), task_weight=cfg.distill.task_weight,
            logit_weight=cfg.distill.logit_weight, temperature=cfg.distill.temperature,
            layer_weight=cfg.distill.layer_weight, layer_every=cfg.distill.layer_every,
            warmup_steps=round(cfg.budget.warmup_fraction * optim.steps), train_weights=mask.variant != "faster",
            teacher=teacher, ramp=cfg.budget.ramp)
        engine = make_engine(module, module.param_groups(optim.mask_lr, optim.weight_lr, optim.lambda_lr,
                                                         optim.distill_lr, optim.gain_lr, optim.scale_lr),
                             cfg, procs)
    hooks = sharded.forward_hooks(model) if sharded and engine is None else None  # a sharded baseline's forwards

    with mm.disabled():
        dense_eval = P.evaluate_dense(model, tokenizer, cfg, data.held, "dense", procs=procs, lockstep=lockstep)
        dense_domains = P.evaluate_domains(model, cfg, domains, "dense", dense=True, procs=procs, lockstep=lockstep)
    log.info("dense: %s", _fmt({**dense_eval, **dense_domains}))
    check_stop()

    if mask.method == "vib":
        t_init = time.perf_counter()
        resuming = checkpointer.resume and checkpointer.latest() is not None  # the restored masks replace any start
        if mask.init_from and not resuming:
            P.warm_start(cfg, mm, P.warm_start_rows(cfg, tokenizer, data, dense_model), procs, lockstep)
            engine.release_parameters()
        on_step = P.iterative_decisions(mm, budget, module.warmup_steps, module.final_ratio, cfg.budget.decide_every,
                                        optim.steps, cfg.export_uniform, cfg.budget.multiple_of, cfg.budget.ramp)
        with logger.preemption():
            history = fit(engine, lambda start: batch_stream(data.train, optim.batch_size, optim.seed, start),
                          optim.steps, optim.grad_accum, on_log=logger.log, log_every=optim.log_every,
                          progress=cfg.progress, desc=f"{mask.variant}-vtrans", checkpointer=checkpointer,
                          on_step=on_step, end_reserve=model_room)
        train_time = time.perf_counter() - t_init
        engine.release()  # the optimizer state and the teacher are not needed any more: free them before materialising
        teacher = module = None  # noqa: F841 (the last references to the teacher)
    else:  # a one-shot baseline: score the units on calibration batches, no training
        history, train_time = [], P.warm_start(cfg, mm, data.train, procs, lockstep)
        if hooks is not None:
            hooks.release()

    check_stop()
    decision = P.decide(cfg, mm, budget)  # the masks are whole on every rank: every rank decides alike
    logger.structure(rows_from_decision(decision))
    # materialise one dense layer at a time (gathered under ZeRO-3); rank 0 builds the pruned model and saves it
    # before it is evaluated; with several processes the others read it back for the split evaluation
    model_dir = out / "model"
    fetch = engine.fetch if engine is not None else (sharded.fetch if sharded else None)
    # the dense model is not used again: under ZeRO-3 each rank drops its shard of a tensor once rank 0 has it
    pruned = P.materialise(cfg, mm, decision, fetch=fetch, build=procs.is_main, free=bool(sharded))
    compensation = {}
    if cfg.mask.compensate and procs.is_main:  # the dense layers are whole here (validation refuses ZeRO-3)
        rows = P.training_rows(cfg, tokenizer, data, dense_model)
        compensation = P.compensate(cfg, pruned.to(procs.device), model, decision,
                                    P.compensation_data(cfg, tokenizer, data, dense_model, rows), mask_scales(mm),
                                    guard=rows if cfg.model.task == "causal_lm" else None, unmasked=mm.disabled)
    if procs.is_main:
        P.check_budget(pruned, budget, decision.fit["target"])
        P.save_model(pruned, tokenizer, model_dir, decision)
    if procs.distributed:
        procs.barrier()
        if not procs.is_main:
            pruned, _ = P.load(P.dir_model_config(cfg, model_dir))
    pruned.to(procs.device)
    check_stop()
    pruned_eval = P.evaluate(pruned, tokenizer, cfg, data.held, "pruned", procs=procs)
    pruned_domains = P.evaluate_domains(pruned, cfg, domains, "pruned", procs=procs)
    log.info("pruned: %s", _fmt({**pruned_eval, **pruned_domains}))

    metrics = _metrics(cfg, dense, model, pruned, decision, data, history, train_time, dense_eval, pruned_eval)
    metrics.update(compensation)
    metrics.update(dense_domains)
    metrics.update(pruned_domains)
    if cfg.model.task == "causal_lm":
        metrics.update(P.ratio_metrics(metrics, list(domains), "pruned", "dense"))
        metrics["eval_domains"] = dict(cfg.eval.domains)
    metrics["model_dir"] = str(model_dir)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    P.report(cfg, out, metrics, logger, {"model": model_dir, "decision": model_dir / DECISION_FILE})
    if procs.is_main:
        _print_summary(metrics)
    return metrics


def _metrics(cfg: Config, dense, model, pruned, decision, data, history, train_time, dense_eval, pruned_eval) -> dict:
    pruned_shape = shape_of(pruned)
    params_dense, params_pruned = model_numel(model), model_numel(pruned)
    seq = cfg.budget.flops_seq_len
    optim = cfg.optim
    metrics = {
        "variant": cfg.mask.variant if cfg.mask.method == "vib" else "one-shot",
        "method": cfg.mask.method,
        "model_family": dense.family,
        "budget_kind": cfg.budget.kind,
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
        rows.append(("held-out exact match", f"{m['exact_match_dense']:.2f}", f"{m['exact_match_pruned']:.2f}"))
        rows.append(("held-out SQuAD F1", f"{m['f1_dense']:.2f}", f"{m['f1_pruned']:.2f}"))
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
