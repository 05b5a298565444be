"""One training step's computation, as a module an engine wraps: `PruningModule` (the student with masks against its
teacher, and the VTrans objective) and `DistillModule` (recovery fine-tuning of a pruned model against the dense
teacher). `PruningModule` owns every trainable tensor of a pruning run (the model, its masks, the Lagrange
multipliers, the layer-distillation map).

The masks and the multipliers are not submodules: they are tiny, stay float32 and whole on every rank, and an engine
optimises them as "replicated" parameter groups (a DeepSpeed engine beside its sharded, possibly bf16 model). They
follow the module's device moves (never its dtype casts) and are part of its state_dict (as extra state)."""
from __future__ import annotations

import torch
from torch import nn

from .masks.attach import MaskedModel
from .masks.decide import Budget
from .objectives import LayerDistill, Lagrangian, kl_loss, output_distill, target_ratio, task_loss


class PruningModule(nn.Module):
    def __init__(self, mm: MaskedModel, budget: Budget, *, beta: float, kl_weights: dict[str, float],
                 task_weight: float, logit_weight: float, temperature: float, layer_weight: float,
                 layer_every: int, warmup_steps: int, train_weights: bool, teacher: nn.Module | None = None,
                 ramp: str = "linear"):
        super().__init__()
        self.model = mm.model
        object.__setattr__(self, "lagrangian", Lagrangian())  # replicated: see the module docstring
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
        self.temperature, self.warmup_steps, self.ramp = temperature, warmup_steps, ramp
        self.head = mm.dense.head  # "lm", "qa" or a classifier: picks the task loss and the distillation
        for p in self.model.parameters():
            p.requires_grad_(train_weights)
        for p in (mm.mask_parameters() if mm.masks() else []) + mm.gain_parameters():
            p.requires_grad_(True)
        for m in mm.masks().values():
            if m.method == "vib":
                m.mu.requires_grad_(True)
                m.log_sigma2.requires_grad_(True)

    @property
    def masked(self) -> MaskedModel:
        return self._mm

    def _replicated_modules(self) -> dict[str, nn.Module]:
        return {"lagrangian": self.lagrangian, **{f"mask.{n}": m for n, m in self._mm.masks().items()},
                **{f"gain.{n}": g for n, g in self._mm.gains().items()}}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for m in self._replicated_modules().values():  # follow device moves, keep float32
            m._apply(lambda t: fn(t).to(t.dtype))
        return self

    def get_extra_state(self):
        return {name: m.state_dict() for name, m in self._replicated_modules().items()}

    def set_extra_state(self, state) -> None:
        for name, m in self._replicated_modules().items():
            m.load_state_dict(state[name])

    def param_groups(self, mask_lr: float, weight_lr: float, lambda_lr: float, distill_lr: float,
                     gain_lr: float = 0.01, scale_lr: float = 0.0) -> list[dict]:
        """`scale_lr` > 0 (and not mask_lr) trains the masks' mu, the kept units' scales, in a group of its own
        ("scales") beside their log_sigma2 ("masks"); 0 keeps one group, the layout older checkpoints hold."""
        mask_ids = {id(p) for p in self._mm.mask_parameters() + self._mm.gain_parameters()}
        weights = [p for p in self.model.parameters() if p.requires_grad and id(p) not in mask_ids]
        masks, scales = self._mm.mask_parameters(), []
        if scale_lr > 0 and scale_lr != mask_lr:
            scale_ids = {id(p) for p in self._mm.scale_parameters()}
            scales = [p for p in masks if id(p) in scale_ids]
            masks = [p for p in masks if id(p) not in scale_ids]
        groups = [{"name": "masks", "params": masks, "lr": mask_lr, "weight_decay": 0.0, "replicated": True}]
        if scales:
            groups.append({"name": "scales", "params": scales, "lr": scale_lr, "weight_decay": 0.0,
                           "replicated": True})
        groups += [{"name": "lambdas", "params": [self.lagrangian.lambdas], "lr": lambda_lr, "weight_decay": 0.0,
                    "replicated": True}]
        if self._mm.gains():
            groups.append({"name": "gains", "params": self._mm.gain_parameters(), "lr": gain_lr, "weight_decay": 0.0,
                           "replicated": True})
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
        target = target_ratio(step, self.warmup_steps, self.final_ratio, self.ramp)
        lag, lambdas = self.lagrangian(expected, target)
        loss = loss + lag
        stats.update(kl=kl.detach(), expected_ratio=expected.detach(), target_ratio=torch.tensor(target),
                     lagrangian=lag.detach(), lambda_1=lambdas[0], lambda_2=lambdas[1], loss=loss.detach())
        return loss, stats


class DistillModule(nn.Module):
    """The student (trainable) against its frozen teacher: (loss, stats) per batch, like the pruning module.
    `size_ratio` (student / teacher parameters) is reported as expected = target size, so the progress bar and
    the dashboard show the model's (fixed) size next to the loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, task: str, task_weight: float,
                 logit_weight: float, temperature: float, size_ratio: float):
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
