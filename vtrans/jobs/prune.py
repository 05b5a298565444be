"""The prune job: attach masks -> train them (VTrans / Fast-VTrans / Faster-VTrans) -> decide to the budget
-> materialise -> evaluate dense vs pruned -> save the pruned model and its metrics."""
from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import data as D
from ..accounting import flops_per_token, model_numel, param_count
from ..cluster import dist_env
from ..config import Config
from ..checkpoint import Checkpointer, batch_stream
from ..engine import fit, make_engine
from ..evaluation import classification_metrics, perplexity, qa_metrics, regression_metrics
from ..log import RunLogger, rows_from_masks
from ..masks.attach import MaskInit, attach_masks
from ..masks.decide import Budget, check_reachable, decide, decide_uniform
from ..masks.materialize import materialize, to_stock
from ..masks.scoring import score_masks, warm_start
from ..models.load import load_config, load_model
from ..models.pruned_modeling import save_pruned
from ..models.spec import shape_of
from ..objectives import target_ratio
from ..pruning import PruningModule
from .evaluate import documents, task_data
from .probe import decision_record

log = logging.getLogger("vtrans")
FAST_FRACTION = 0.03  # Fast-VTrans trains on about 3 % of the data (the paper)


def budget_of(cfg: Config) -> Budget:
    return Budget(kind=cfg.budget.kind, target=cfg.budget.target, embeddings=cfg.budget.count_embeddings,
                  seq_len=cfg.budget.flops_seq_len)


def prepare_data(cfg: Config, tokenizer):
    """(train, heldout) model inputs and their document counts: the documents every job uses (split before
    tokenising, so the parts never overlap).

    Fast-VTrans trains on FAST_FRACTION of the training documents unless data.train_fraction says otherwise, but
    on no fewer documents than give mask.calibration_blocks sequences, the data a one-shot baseline calibrates on:
    3 % of a small set (5 of 160 sentences) is too little to rank units on, let alone train weights."""
    train_docs, held_docs = documents(cfg)
    if cfg.mask.variant == "fast" and cfg.data.train_fraction == 1.0:
        measured = {}  # the subset returned is the last one measured: its tokenisation is the training data

        def sequences(docs: list) -> int:
            measured["train"] = task_data(cfg, tokenizer, docs, training=True)
            return len(measured["train"])

        n_all = len(train_docs)
        train_docs = D.subsample_at_least(train_docs, FAST_FRACTION, cfg.data.seed, cfg.mask.calibration_blocks,
                                          size=sequences)
        train = measured["train"]
        log.info("Fast-VTrans trains on %d of %d training documents (%.1f %%, %d sequences; at least "
                 "mask.calibration_blocks=%d sequences)", len(train_docs), n_all, 100 * len(train_docs) / n_all,
                 len(train), cfg.mask.calibration_blocks)
    else:
        train = task_data(cfg, tokenizer, train_docs, training=True)
    return train, task_data(cfg, tokenizer, held_docs), len(train_docs), len(held_docs)


def endless(data, batch_size: int, seed: int):
    """Batches over epochs, a new order each epoch, as model-input dicts."""
    for epoch in itertools.count():
        for b in D.batches(data, batch_size, shuffle=True, seed=seed + epoch, drop_last=True):
            yield {"input_ids": b} if isinstance(b, torch.Tensor) else b


def calibration(train, cfg: Config) -> list[dict]:
    """The one-shot scorers' batches: mask.calibration_blocks training blocks (sequences)."""
    bs = cfg.optim.batch_size
    return [b for _, b in zip(range(max(1, cfg.mask.calibration_blocks // bs)), endless(train, bs, cfg.optim.seed))]


def evaluate(model, held, cfg: Config, task: str) -> dict:
    if task == "causal_lm":
        r = perplexity(model, held, batch_size=8, window=cfg.data.eval_window or None,
                       stride=cfg.data.eval_stride or None)
        return {"ppl": r["ppl"], "eval_tokens": r["tokens"], "eval_protocol": r["protocol"],
                "eval_window": r["window"] or cfg.data.seq_len, "eval_stride": r["stride"] or cfg.data.seq_len}
    if task == "question_answering":  # SQuAD exact match / F1 of the best span over each question's windows
        ec = cfg.eval
        r = qa_metrics(model, held, batch_size=ec.batch_size, n_best=ec.qa_n_best, max_answer_len=ec.qa_max_answer_len)
        return {"exact_match": r["exact_match"], "f1": r["f1"]}
    if cfg.model.num_labels == 1:  # regression: Pearson / Spearman
        return dict(regression_metrics(model, held, batch_size=32))
    return dict(classification_metrics(model, held, batch_size=32))


def iterative_decisions(mm, budget: Budget, engine, warmup_steps: int, final_ratio: float, every: int, steps: int,
                        uniform: bool = False, multiple_of: int = 1):
    """VTrans prunes iteratively: every `every` steps the units over the scheduled size (ramping from dense to the
    budget over the warm-up) are cut from the training forward (z *= decided), so the remaining units and weights
    learn to do without them before the final decision. Every rank decides on the same gathered mask values."""
    if every <= 0:
        return None
    dense_size = float(budget.size(mm.dense))
    absolute = "flops" if budget.kind == "flops" else "params"
    params = mm.mask_parameters()

    def on_step(step: int) -> None:
        if step % every or step >= steps:
            return
        ratio = target_ratio(step, warmup_steps, final_ratio)
        if ratio >= 1.0 - 1e-6:
            return
        scheduled = Budget(kind=absolute, target=ratio * dense_size, embeddings=budget.embeddings,
                           seq_len=budget.seq_len)
        with engine.gathered(params):
            if uniform:  # the shapes a uniform export allows, so training sees the final kind of model
                decide_uniform(mm, scheduled)
            else:
                decide(mm, scheduled, monotone=True, multiple_of=multiple_of)
    return on_step


def run(cfg: Config, out: Path) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.optim.seed)
    task = cfg.model.task
    # --- checks that need no weights: model family, data source
    hf_config = load_config(cfg.model)
    model, tokenizer = load_model(cfg.model, hf_config)
    train, held, n_train_docs, n_held_docs = prepare_data(cfg, tokenizer)
    mc = cfg.mask
    distills = cfg.distill.logit_weight > 0 or cfg.distill.layer_weight > 0
    # weights that train need a separate frozen teacher; with frozen weights the model with masks off is the teacher
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if (
        mc.method == "vib" and mc.variant != "faster" and distills) else None
    mm = attach_masks(model, mc.structures, MaskInit(method=mc.method, mu=mc.mu_init, mu_std=mc.mu_std,
                                                     log_sigma2=mc.log_sigma2_init,
                                                     log_sigma2_std=mc.log_sigma2_std, k=mc.k))
    budget = budget_of(cfg)
    check_reachable(mm, budget)  # before any training
    dense = mm.dense
    logger = RunLogger(cfg.logger, asdict(cfg), str(out))
    log.info("model %s: %s layers, hidden %s, %s params; %d train / %d held-out documents",
             dense.family, len(dense.layers), dense.hidden, f"{param_count(dense):,}", n_train_docs, n_held_docs)

    with mm.disabled():
        dense_eval = evaluate(model, held, cfg, task)
    log.info("dense: %s", _fmt(dense_eval))

    oc = cfg.optim
    if mc.method == "vib":
        t_init = time.perf_counter()
        checkpointer = Checkpointer.from_config(cfg.checkpoint, out)
        resuming = checkpointer.resume and checkpointer.latest() is not None  # the restored masks replace any start
        if mc.init_from and not resuming:  # warm start: a one-shot ranking on the variant's own training data
            score_masks(mm, mc.init_from, calibration(train, cfg), seed=oc.seed)
            warm_start(mm, mc.init_spread)
            log.info("masks warm-started from %s scores (spread %g) in %.1f s", mc.init_from, mc.init_spread,
                     time.perf_counter() - t_init)
        module = PruningModule(
            mm, budget, beta=mc.beta, kl_weights=dict(mc.kl_weights), task_weight=cfg.distill.task_weight,
            logit_weight=cfg.distill.logit_weight, temperature=cfg.distill.temperature,
            layer_weight=cfg.distill.layer_weight, layer_every=cfg.distill.layer_every,
            warmup_steps=round(cfg.budget.warmup_fraction * oc.steps), train_weights=mc.variant != "faster",
            teacher=teacher)
        engine = make_engine(module, module.param_groups(oc.mask_lr, oc.weight_lr, oc.lambda_lr, oc.distill_lr), cfg)
        history = fit(engine, lambda start: batch_stream(train, oc.batch_size, oc.seed, start), oc.steps, oc.grad_accum,
                      on_log=logger.log, log_every=oc.log_every, progress=cfg.progress, desc=f"{mc.variant}-vtrans",
                      checkpointer=checkpointer,
                      on_step=iterative_decisions(mm, budget, engine, module.warmup_steps, module.final_ratio,
                                                  cfg.budget.decide_every, oc.steps, cfg.export_uniform,
                                                  cfg.budget.multiple_of))
        train_time = time.perf_counter() - t_init
        engine.consolidate()  # ZeRO-3: every rank gathers the trained shards back in full before decide / materialise
        is_main = engine.is_main
    else:  # a one-shot baseline: score the units on calibration batches, no training
        t_train = time.perf_counter()
        score_masks(mm, mc.method, calibration(train, cfg), seed=oc.seed)
        history, train_time = [], time.perf_counter() - t_train
        is_main = dist_env().is_main

    iterative = mc.method == "vib" and cfg.budget.decide_every > 0 and not cfg.export_uniform
    if cfg.export_uniform:
        decision = decide_uniform(mm, budget)
    else:
        decision = decide(mm, budget, monotone=iterative, multiple_of=cfg.budget.multiple_of)
    logger.structure(rows_from_masks(mm))
    pruned = materialize(mm)
    if cfg.export_uniform:
        pruned = to_stock(pruned)
    pruned_shape = shape_of(pruned)
    mask_numel = sum(p.numel() for m in mm.masks().values() for p in m.parameters())
    params_dense, params_pruned = model_numel(model) - mask_numel, model_numel(pruned)
    target = decision["target"]
    if budget.kind == "params_ratio" or budget.kind == "params":
        counted = params_pruned if budget.embeddings else model_numel(pruned, embeddings=False)
        if counted > target:
            raise RuntimeError(f"pruned model has {counted:,} parameters, over the budget {target:,.0f}")
    pruned_eval = evaluate(pruned, held, cfg, task)
    log.info("pruned: %s", _fmt(pruned_eval))

    seq = cfg.budget.flops_seq_len
    metrics = {
        "variant": mc.variant if mc.method == "vib" else "one-shot",
        "method": mc.method,
        "model_family": dense.family,
        "budget_kind": budget.kind,
        "budget_target": cfg.budget.target,
        "budget_target_size": target,
        "params_dense": params_dense,
        "params_pruned": params_pruned,
        "param_reduction": 1 - params_pruned / params_dense,
        "params_dense_no_embeddings": int(param_count(dense, embeddings=False)),
        "params_pruned_no_embeddings": int(param_count(pruned_shape, embeddings=False)),
        "flops_seq_len": seq,
        "flops_dense": float(flops_per_token(dense, seq)),
        "flops_pruned": float(flops_per_token(pruned_shape, seq)),
        "threshold_params_ratio": decision["threshold_size"] / decision["dense_size"],
        "shape_pruned": pruned_shape.summary(),
        "train_documents": n_train_docs,
        "heldout_documents": n_held_docs,
        "train_steps": oc.steps,
        "train_tokens": oc.steps * oc.grad_accum * oc.batch_size * cfg.data.seq_len,
        "train_time_s": train_time,
        "final_loss": history[-1]["loss"] if history else None,
    }
    for k, v in dense_eval.items():
        metrics[f"{k}_dense" if not k.startswith("eval_") else k] = v
    for k, v in pruned_eval.items():
        if not k.startswith("eval_"):
            metrics[f"{k}_pruned"] = v
    model_dir = out / "model"
    if is_main:  # one writer: every rank holds the same pruned model
        if cfg.export_uniform:
            pruned.save_pretrained(model_dir)  # stock classes: loads without trust_remote_code
        else:
            save_pruned(pruned, model_dir)
        tokenizer.save_pretrained(model_dir)
        (model_dir / "vtrans_decision.json").write_text(json.dumps(decision_record(mm)))  # read by the probe job
    metrics["model_dir"] = str(model_dir)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    metrics["objective"] = next((metrics[k] for k in ("ppl_pruned", "accuracy_pruned", "pearson_pruned", "f1_pruned")
                                 if k in metrics), None)
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
    lines.append(f"pruned model: {m['model_dir']}")
    print("\n".join(lines), flush=True)
