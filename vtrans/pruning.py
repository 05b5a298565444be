"""One mask-training step's computation: the student (model with masks) against its teacher, and the
objective. `PruningModule` owns every trainable tensor of a pruning run (the model, its masks, the
Lagrange multipliers, the layer-distillation map) so an engine can wrap and shard it as one module."""
from __future__ import annotations

import torch
from torch import nn

from .masks.attach import MaskedModel
from .masks.decide import Budget
from .objectives import LayerDistill, Lagrangian, kl_loss, output_distill, target_ratio, task_loss


class PruningModule(nn.Module):
    def __init__(self, mm: MaskedModel, budget: Budget, *, beta: float, kl_weights: dict[str, float],
                 task_weight: float, logit_weight: float, temperature: float, layer_weight: float,
                 layer_every: int, warmup_steps: int, train_weights: bool, teacher: nn.Module | None = None):
        super().__init__()
        self.model = mm.model
        self.lagrangian = Lagrangian()
        n_layers = len(mm.dense.layers)
        teacher_layers = list(range(layer_every - 1, n_layers, layer_every)) if layer_weight > 0 else []
        self.layer_distill = LayerDistill(mm.dense.hidden, teacher_layers) if teacher_layers else None
        self._mm = mm
        self._teacher = [teacher]  # kept out of the module tree: it is frozen and never optimised
        self.budget = budget
        self.dense_size = float(budget.size(mm.dense))
        self.final_ratio = budget.target_size(mm.dense) / self.dense_size
        self.beta, self.kl_weights = beta, kl_weights
        self.task_weight, self.logit_weight, self.layer_weight = task_weight, logit_weight, layer_weight
        self.temperature, self.warmup_steps = temperature, warmup_steps
        self.head = mm.dense.head  # "lm", "qa" or a classifier: picks the task loss and the distillation
        for p in self.model.parameters():
            p.requires_grad_(train_weights)
        for p in mm.mask_parameters() if mm.masks() else []:
            p.requires_grad_(True)
        for m in mm.masks().values():
            if m.method == "vib":
                m.mu.requires_grad_(True)
                m.log_sigma2.requires_grad_(True)

    @property
    def masked(self) -> MaskedModel:
        return self._mm

    def param_groups(self, mask_lr: float, weight_lr: float, lambda_lr: float, distill_lr: float) -> list[dict]:
        mask_ids = {id(p) for p in self._mm.mask_parameters()}
        weights = [p for p in self.model.parameters() if p.requires_grad and id(p) not in mask_ids]
        groups = [{"name": "masks", "params": self._mm.mask_parameters(), "lr": mask_lr, "weight_decay": 0.0},
                  {"name": "lambdas", "params": [self.lagrangian.lambdas], "lr": lambda_lr, "weight_decay": 0.0}]
        if weights:
            groups.append({"name": "weights", "params": weights, "lr": weight_lr})
        if self.layer_distill is not None:
            groups.append({"name": "distill", "params": list(self.layer_distill.parameters()), "lr": distill_lr,
                           "weight_decay": 0.0})
        return groups

    @torch.no_grad()
    def _teacher_outputs(self, inputs: dict):
        need_hidden = self.layer_distill is not None
        teacher = self._teacher[0]
        if teacher is not None:
            return teacher(**inputs, output_hidden_states=need_hidden)
        training = self.model.training
        self.model.eval()
        try:
            with self._mm.disabled():
                return self.model(**inputs, output_hidden_states=need_hidden)
        finally:
            self.model.train(training)

    def forward(self, batch: dict, step: int):
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        need_teacher = self.logit_weight > 0 or self.layer_distill is not None
        t_out = self._teacher_outputs(inputs) if need_teacher else None
        s_out = self.model(**inputs, output_hidden_states=self.layer_distill is not None)
        attn = inputs.get("attention_mask")
        stats = {}
        task = task_loss(s_out, batch, self.head)
        loss = self.task_weight * task
        stats["task_loss"] = task.detach()
        if self.logit_weight > 0:
            distill = output_distill(s_out, t_out, self.head, self.temperature, attn)
            loss = loss + self.logit_weight * distill
            stats["distill_logit"] = distill.detach()
        if self.layer_distill is not None:
            layer = self.layer_distill(s_out.hidden_states, t_out.hidden_states, attn)
            loss = loss + self.layer_weight * layer
            stats["distill_layer"] = layer.detach()
        kl = kl_loss(self._mm.kl_terms(), self.kl_weights)
        loss = loss + self.beta * kl
        expected = self.budget.size(self._mm.expected_shape()) / self.dense_size
        target = target_ratio(step, self.warmup_steps, self.final_ratio)
        lag, lambdas = self.lagrangian(expected, target)
        loss = loss + lag
        stats.update(kl=kl.detach(), expected_ratio=expected.detach(), target_ratio=torch.tensor(target),
                     lagrangian=lag.detach(), lambda_1=lambdas[0], lambda_2=lambdas[1], loss=loss.detach())
        return loss, stats
