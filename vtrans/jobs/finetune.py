"""The finetune job: recovery fine-tuning of a pruned model (`model_dir`) distilled from the dense teacher (`model`):
task loss + temperature-softened logit KL to the teacher, for `finetune.steps` optimizer steps through the engine at
`finetune.lr` on `finetune.schedule` (DeepSpeed when `deepspeed.enabled`; checkpointed and resumable like pruning);
evaluates before and after, saves the fine-tuned model (same format as the prune job's). Stages from vtrans.pipeline."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import pipeline as P
from ..checkpoint import Checkpointer, batch_stream, check_stop
from ..config import Config, training_fingerprint
from ..engine import fit, lr_schedule, make_engine
from ..log import RunLogger, write_structure
from ..pruning import DistillModule

log = logging.getLogger("vtrans")


def run(cfg: Config, out: Path) -> dict:
    t0 = time.perf_counter()
    procs = P.setup(cfg)
    sharded = P.sharding(cfg, procs)  # ZeRO-3: student and teacher built partitioned, never whole on a rank
    torch.manual_seed(cfg.optim.seed)
    ft, dc = cfg.finetune, cfg.distill
    student, tokenizer = P.load(P.dir_model_config(cfg, cfg.model_dir), device=procs.device, sharded=sharded)
    teacher = P.load(cfg.model, device=procs.device, sharded=sharded)[0] if dc.logit_weight > 0 else None
    if dc.layer_weight > 0:
        log.warning("distill.layer_weight=%s is used while pruning only; finetune distils logits", dc.layer_weight)
    # the dense model: the source of teacher:N samples and the reference of the perplexity ratios (a whole copy when
    # the teacher is partitioned: it cannot sample on one rank)
    dense_model = (lambda: (teacher, tokenizer)) if teacher is not None and not sharded else \
        P.loader(cfg.model, device=procs.device)
    data = P.prepare_data(cfg, tokenizer, procs=procs, dense=dense_model)
    domains = P.domain_data(cfg, tokenizer)
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="finetune")

    seq = cfg.budget.flops_seq_len
    metrics = {"model_dir_in": cfg.model_dir, "flops_seq_len": seq, "finetune_steps": ft.steps}
    metrics.update(P.size_metrics(student, seq))
    dense = P.dense_reference_shape(cfg)
    if teacher is not None:
        metrics.update(P.size_metrics(teacher, seq, "_dense"))
    if "params_dense" in metrics:
        metrics["params_ratio"] = metrics["params"] / metrics["params_dense"]
    model_room = P.model_bytes(student)

    module = DistillModule(student, teacher, cfg.model.task, dc.task_weight, dc.logit_weight, dc.temperature,
                           metrics.get("params_ratio", 1.0))
    params = [p for p in student.parameters() if p.requires_grad]
    P.prepare_training(cfg, student)
    engine = make_engine(module, [{"name": "weights", "params": params, "lr": ft.lr,
                                   "weight_decay": cfg.optim.weight_decay}], cfg, procs)
    before = P.evaluate(student, tokenizer, cfg, data.held, "before finetune", procs=procs, lockstep=bool(sharded))
    for k, v in before.items():
        metrics[f"{k}_before" if not k.startswith("eval_") else k] = v
    metrics.update(P.evaluate_domains(student, cfg, domains, "before", procs=procs, lockstep=bool(sharded)))
    if cfg.model.task == "causal_lm" and (teacher is not None or domains):  # the dense reference of the ratios
        reference, ref_lockstep = (teacher, bool(sharded)) if teacher is not None else (dense_model()[0], False)
        share = dict(procs=procs, lockstep=ref_lockstep)
        metrics["ppl_dense"] = P.evaluate_dense(reference, tokenizer, cfg, data.held, "dense", lm_eval=False,
                                                **share)["ppl"]
        metrics.update(P.evaluate_domains(reference, cfg, domains, "dense", dense=True, **share))
    check_stop()
    train = data.train.tensors() if hasattr(data.train, "tensors") else data.train  # dicts of tensors (QA too)
    checkpointer = Checkpointer.from_config(cfg.checkpoint, out, training_fingerprint(cfg))
    t_train = time.perf_counter()
    with logger.preemption():
        history = fit(engine, lambda start: batch_stream(train, ft.batch_size, cfg.optim.seed, start), ft.steps,
                      cfg.optim.grad_accum, on_log=logger.log, log_every=cfg.optim.log_every, progress=cfg.progress,
                      desc="finetune", checkpointer=checkpointer, end_reserve=model_room,
                      lr_factor=lr_schedule(ft.schedule, ft.steps, ft.warmup_steps))
    metrics["train_time_s"] = time.perf_counter() - t_train
    metrics["final_loss"] = history[-1]["loss"]
    metrics["finetune_last_lr"] = ft.lr * history[-1].get("lr_factor", 1.0)  # where the schedule ended
    metrics["train_tokens"] = ft.steps * cfg.optim.grad_accum * ft.batch_size * cfg.data.seq_len
    check_stop()
    model_dir = out / "model"  # saved before it is evaluated
    if sharded:  # rank 0 gathers the trained weights one tensor at a time and saves them; every rank reads them back
        engine.release()  # the optimizer state and the teacher go before rank 0 gathers the weights
        teacher = reference = module = None  # noqa: F841 (the last references to the teacher)
        tuned = P.whole_copy(student, engine.state_on_main(student)) if procs.is_main else None
        if procs.is_main:
            P.save_model(tuned, tokenizer, model_dir)
        procs.barrier()
        student = P.load(P.dir_model_config(cfg, model_dir), device=procs.device)[0]
    else:
        engine.consolidate()
        if procs.is_main:
            P.save_model(student, tokenizer, model_dir)
    student.eval().to(procs.device)
    for k, v in P.evaluate(student, tokenizer, cfg, data.held, "after finetune", procs=procs).items():
        if not k.startswith("eval_"):
            metrics[f"{k}_after"] = v
    metrics.update(P.evaluate_domains(student, cfg, domains, "after", procs=procs))
    if "ppl_dense" in metrics:
        metrics.update(P.ratio_metrics(metrics, list(domains), "after", "dense"))
        metrics.update(P.ratio_metrics(metrics, list(domains), "before", "dense", suffix="_before"))
        metrics["eval_domains"] = dict(cfg.eval.domains)
    metrics["train_sources"] = data.sources

    rows = P.structure_rows(student, dense)
    logger.structure(rows, "structure of the fine-tuned model")
    if procs.is_main:
        metrics["model_dir"] = str(model_dir)
        metrics.update(write_structure(rows, out, "structure of the fine-tuned model"))
    metrics["wall_time_s"] = time.perf_counter() - t0
    P.report(cfg, out, metrics, logger, {"model": metrics.get("model_dir")})
    return metrics
