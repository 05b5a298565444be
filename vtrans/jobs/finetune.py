"""The finetune job: recovery fine-tuning of a pruned model (`model_dir`) distilled from the dense teacher
(`model`): task loss + temperature-softened logit KL to the teacher, for `finetune.steps` optimizer steps through
the engine (DeepSpeed when `deepspeed.enabled`; checkpointed and resumable like pruning); evaluates before and
after, saves the fine-tuned model (same format as the prune job's)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpointer, batch_stream
from ..config import Config
from ..engine import fit, make_engine
from ..log import RunLogger, write_structure
from ..objectives import output_distill, task_loss
from . import is_main_process, set_objective
from .evaluate import (dense_reference_shape, dir_model_config, documents, evaluate_all, load, size_metrics,
                       structure_rows, task_data)

log = logging.getLogger("vtrans")


class DistillModule(nn.Module):
    """The student (trainable) against its frozen teacher: (loss, stats) per batch, like the pruning module.
    `size_ratio` (student / teacher parameters) is reported as expected = target size, so the progress bar and
    the dashboard show the model's (fixed) size next to the loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, task: str, task_weight: float, logit_weight: float,
                 temperature: float, size_ratio: float):
        super().__init__()
        self.model = student
        self._teacher = [teacher]  # outside the module tree: frozen, never optimised or sharded with the student
        self.head = {"causal_lm": "lm", "question_answering": "qa"}.get(task, "cls")
        self.task_weight, self.logit_weight, self.temperature = task_weight, logit_weight, temperature
        self.size_ratio = size_ratio
        if teacher is not None:  # None with distill.logit_weight=0: plain fine-tuning on the task loss
            teacher.requires_grad_(False)

    def forward(self, batch: dict, step: int):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self.model(**inputs)
        stats = {}
        task = task_loss(out, batch, self.head)
        loss = self.task_weight * task
        stats["task_loss"] = float(task.detach())
        if self.logit_weight > 0:
            with torch.no_grad():
                t_out = self._teacher[0](**inputs)
            distill = output_distill(out, t_out, self.head, self.temperature, inputs.get("attention_mask"))
            loss = loss + self.logit_weight * distill
            stats["distill_logit"] = float(distill.detach())
        stats.update(loss=float(loss.detach()), expected_ratio=self.size_ratio, target_ratio=self.size_ratio)
        return loss, stats


def run(cfg: Config, out: Path) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.optim.seed)
    ft, dc, task = cfg.finetune, cfg.distill, cfg.model.task
    student, tokenizer = load(dir_model_config(cfg, cfg.model_dir))
    teacher, _ = load(cfg.model) if dc.logit_weight > 0 else (None, None)
    if dc.layer_weight > 0:
        log.warning("distill.layer_weight=%s is used while pruning only; finetune distils logits", dc.layer_weight)
    train_docs, held_docs = documents(cfg)
    train = task_data(cfg, tokenizer, train_docs, training=True)
    held = task_data(cfg, tokenizer, held_docs)
    logger = RunLogger(cfg.logger, asdict(cfg), str(out), job_type="finetune")

    seq = cfg.budget.flops_seq_len
    metrics = {"model_dir_in": cfg.model_dir, "flops_seq_len": seq, "finetune_steps": ft.steps}
    metrics.update(size_metrics(student, seq))
    dense = dense_reference_shape(cfg)
    if teacher is not None:
        metrics.update(size_metrics(teacher, seq, "_dense"))
    if "params_dense" in metrics:
        metrics["params_ratio"] = metrics["params"] / metrics["params_dense"]
    for k, v in evaluate_all(student, tokenizer, cfg, held, "before finetune").items():
        metrics[f"{k}_before" if not k.startswith("eval_") else k] = v

    module = DistillModule(student, teacher, task, dc.task_weight, dc.logit_weight, dc.temperature,
                           metrics.get("params_ratio", 1.0))
    params = [p for p in student.parameters() if p.requires_grad]
    engine = make_engine(module, [{"name": "weights", "params": params, "lr": ft.lr,
                                   "weight_decay": cfg.optim.weight_decay}], cfg)
    stream = train.tensors() if hasattr(train, "tensors") else train  # dicts of tensors, QA features included
    t_train = time.perf_counter()
    history = fit(engine, lambda start: batch_stream(stream, ft.batch_size, cfg.optim.seed, start), ft.steps,
                  cfg.optim.grad_accum, on_log=logger.log, log_every=cfg.optim.log_every, progress=cfg.progress,
                  desc="finetune", checkpointer=Checkpointer.from_config(cfg.checkpoint, out))
    engine.consolidate()  # ZeRO-3: gather the trained shards back in full before evaluating and saving
    metrics["train_time_s"] = time.perf_counter() - t_train
    metrics["final_loss"] = history[-1]["loss"]
    metrics["train_tokens"] = ft.steps * cfg.optim.grad_accum * ft.batch_size * cfg.data.seq_len
    student.eval()
    for k, v in evaluate_all(student, tokenizer, cfg, held, "after finetune").items():
        if not k.startswith("eval_"):
            metrics[f"{k}_after"] = v

    rows = structure_rows(student, dense)
    logger.structure(rows, "structure of the fine-tuned model")
    if is_main_process():
        model_dir = out / "model"
        save(student, tokenizer, model_dir)
        metrics["model_dir"] = str(model_dir)
        metrics.update(write_structure(rows, out, "structure of the fine-tuned model"))
    metrics["wall_time_s"] = time.perf_counter() - t0
    set_objective(cfg, metrics)
    logger.summary(metrics)
    logger.finish()
    return metrics


def save(model, tokenizer, model_dir: Path) -> None:
    """A vtrans pruned model keeps its self-contained format (pruned_modeling.py + auto_map); others save_pretrained."""
    from ..models.pruned_modeling import save_pruned

    if str(getattr(model.config, "model_type", "")).startswith("vtrans_"):
        save_pruned(model, model_dir)
    else:
        model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
