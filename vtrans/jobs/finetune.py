"""The finetune job: recovery fine-tuning of a pruned model (`model_dir`) distilled from the dense teacher (`model`):
task loss + temperature-softened logit KL to the teacher, for `finetune.steps` optimizer steps through the engine
(DeepSpeed when `deepspeed.enabled`; checkpointed and resumable like pruning); evaluates before and after, saves the
fine-tuned model (same format as the prune job's). Stages from vtrans.pipeline."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import pipeline as P
from ..checkpoint import Checkpointer, batch_stream
from ..config import Config
from ..engine import fit, make_engine
from ..log import RunLogger, write_structure
from ..pruning import DistillModule

log = logging.getLogger("vtrans")


def run(cfg: Config, out: Path) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.optim.seed)
    ft, dc = cfg.finetune, cfg.distill
    student, tokenizer = P.load(P.dir_model_config(cfg, cfg.model_dir))
    teacher, _ = P.load(cfg.model) if dc.logit_weight > 0 else (None, None)
    if dc.layer_weight > 0:
        log.warning("distill.layer_weight=%s is used while pruning only; finetune distils logits", dc.layer_weight)
    # the dense model: the teacher, the source of teacher:N samples and the reference of the perplexity ratios
    dense_model = (lambda: (teacher, tokenizer)) if teacher is not None else P.loader(cfg.model)
    data = P.prepare_data(cfg, tokenizer, dense=dense_model)
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
    for k, v in P.evaluate(student, tokenizer, cfg, data.held, "before finetune").items():
        metrics[f"{k}_before" if not k.startswith("eval_") else k] = v
    metrics.update(P.evaluate_domains(student, cfg, domains, "before"))
    if cfg.model.task == "causal_lm" and (teacher is not None or domains):  # the dense reference of the ratios
        reference = dense_model()[0]
        metrics["ppl_dense"] = P.evaluate_dense(reference, tokenizer, cfg, data.held, "dense", lm_eval=False)["ppl"]
        metrics.update(P.evaluate_domains(reference, cfg, domains, "dense", dense=True))

    module = DistillModule(student, teacher, cfg.model.task, dc.task_weight, dc.logit_weight, dc.temperature,
                           metrics.get("params_ratio", 1.0))
    params = [p for p in student.parameters() if p.requires_grad]
    engine = make_engine(module, [{"name": "weights", "params": params, "lr": ft.lr,
                                   "weight_decay": cfg.optim.weight_decay}], cfg)
    train = data.train.tensors() if hasattr(data.train, "tensors") else data.train  # dicts of tensors (QA too)
    t_train = time.perf_counter()
    history = fit(engine, lambda start: batch_stream(train, ft.batch_size, cfg.optim.seed, start), ft.steps,
                  cfg.optim.grad_accum, on_log=logger.log, log_every=cfg.optim.log_every, progress=cfg.progress,
                  desc="finetune", checkpointer=Checkpointer.from_config(cfg.checkpoint, out))
    engine.consolidate()  # ZeRO-3: gather the trained shards back in full before evaluating and saving
    metrics["train_time_s"] = time.perf_counter() - t_train
    metrics["final_loss"] = history[-1]["loss"]
    metrics["train_tokens"] = ft.steps * cfg.optim.grad_accum * ft.batch_size * cfg.data.seq_len
    student.eval()
    for k, v in P.evaluate(student, tokenizer, cfg, data.held, "after finetune").items():
        if not k.startswith("eval_"):
            metrics[f"{k}_after"] = v
    metrics.update(P.evaluate_domains(student, cfg, domains, "after"))
    if "ppl_dense" in metrics:
        metrics.update(P.ratio_metrics(metrics, list(domains), "after", "dense"))
        metrics.update(P.ratio_metrics(metrics, list(domains), "before", "dense", suffix="_before"))
        metrics["eval_domains"] = dict(cfg.eval.domains)
    metrics["train_sources"] = data.sources

    rows = P.structure_rows(student, dense)
    logger.structure(rows, "structure of the fine-tuned model")
    if P.is_main_process():
        model_dir = out / "model"
        P.save_model(student, tokenizer, model_dir)
        metrics["model_dir"] = str(model_dir)
        metrics.update(write_structure(rows, out, "structure of the fine-tuned model"))
    metrics["wall_time_s"] = time.perf_counter() - t0
    P.set_objective(cfg, metrics)
    logger.summary(metrics)
    logger.finish()
    return metrics
