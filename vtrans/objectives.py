"""The VTrans objective: task loss + beta * KL + distillation from the unpruned teacher + a Lagrangian budget term.

Pure functions of tensors and the step, plus two small modules that own trainable objective parameters
(the Lagrange multipliers and the layer-distillation map), so an engine can shard them with the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RAMPS = ("linear", "cubic")  # budget.ramp: the shape of the target over the warm-up (target_ratio)


def kl_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of the per-structure KL terms (weights: structure kind -> multiplier)."""
    total = None
    for kind, value in terms.items():
        v = weights.get(kind, 1.0) * value
        total = v if total is None else total + v
    return total if total is not None else torch.zeros(())


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Next-token cross-entropy."""
    labels = input_ids[:, 1:]
    logits = logits[:, :-1]
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)


def logit_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened predictions, times T^2 (Hinton et al.)."""
    t = temperature
    s_logp = F.log_softmax(student.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if mask is not None:
        kl = (kl * mask).sum() / mask.sum().clamp_min(1)
    else:
        kl = kl.mean()
    return kl * t * t


def task_loss(out, batch: dict, head: str) -> torch.Tensor:
    """The task loss of a model output for its head ("lm", "qa" or a classifier): next-token cross-entropy; the mean
    cross-entropy of the answer's first and last token (BERT's SQuAD loss); mean squared error for a one-output
    regressor (e.g. STS-B), else cross-entropy over the labels."""
    if head == "lm":
        return lm_loss(out.logits, batch["input_ids"], batch.get("attention_mask"))
    if head == "qa":
        return 0.5 * (F.cross_entropy(out.start_logits.float(), batch["start_positions"])
                      + F.cross_entropy(out.end_logits.float(), batch["end_positions"]))
    if out.logits.shape[-1] == 1:
        return F.mse_loss(out.logits.float().squeeze(-1), batch["labels"].float())
    return F.cross_entropy(out.logits.float(), batch["labels"])


def output_distill(out, t_out, head: str, temperature: float, attention_mask: torch.Tensor | None = None):
    """Distillation of the teacher's outputs: softened predictions (per real token for LMs; of the answer's start and
    end for QA), or the teacher's score for a one-output regressor (a softmax over one output carries nothing)."""
    if head == "qa":
        return 0.5 * (logit_distill(out.start_logits, t_out.start_logits, temperature)
                      + logit_distill(out.end_logits, t_out.end_logits, temperature))
    if head != "lm" and out.logits.shape[-1] == 1:
        return F.mse_loss(out.logits.float(), t_out.logits.float())
    mask = attention_mask.float() if (attention_mask is not None and head == "lm") else None
    return logit_distill(out.logits, t_out.logits, temperature, mask)


class LayerDistill(nn.Module):
    """CoFi's layer distillation: MSE between a learned linear map of student hidden states and the teacher's,
    each chosen teacher layer matched to the closest (lowest-MSE) student layer at or after the previous match;
    each token's squared error relative to the teacher state's squared norm, averaged over tokens and matched layers."""

    def __init__(self, hidden: int, teacher_layers: list[int]):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden))
            self.proj.bias.zero_()
        self.teacher_layers = teacher_layers

    def forward(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1]
        # [L, B, T, D], one matmul for all layers, in the map's dtype (DeepSpeed's bf16 casts it), then float32
        projected = self.proj(torch.stack(student[1:]).to(self.proj.weight.dtype)).float()
        m = mask.unsqueeze(-1).float() if mask is not None else None
        losses, start = [], 0
        for tl in self.teacher_layers:
            if start >= projected.size(0):
                break
            target = teacher[tl + 1].float()
            # per token, relative to the teacher state's squared norm: residual streams of LLaMA-family models carry
            # channels of very large magnitude, and the raw MSE then swamps every other term (measured: loss 779 on
            # SmolLM2); a per-token ratio keeps the loss a plain mean over tokens, so data-parallel ranks agree
            cands = torch.stack([self._relative(projected[j], target, m) for j in range(start, projected.size(0))])
            best = int(cands.detach().argmin())
            losses.append(cands[best])
            start += best
        return torch.stack(losses).mean() if losses else torch.zeros((), device=student[0].device)

    @staticmethod
    def _relative(a, b, m):
        r = (a - b).pow(2).sum(-1) / b.pow(2).sum(-1).clamp_min(1e-6)  # [B, T]
        if m is None:
            return r.mean()
        m = m.squeeze(-1)
        return (r * m).sum() / m.sum().clamp_min(1)


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class Lagrangian(nn.Module):
    """lambda_1 (s - t) + lambda_2 (s - t)^2 with the multipliers trained by gradient ASCENT: their gradient is
    reversed here, so a plain optimizer step on them maximises the term while the masks minimise it (CoFi)."""

    def __init__(self):
        super().__init__()
        self.lambdas = nn.Parameter(torch.zeros(2))

    def forward(self, expected: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the term, the multipliers' current values): the values are read here, inside the forward, because
        ZeRO-3 empties a partitioned parameter outside its module's forward."""
        lam = _ReverseGrad.apply(self.lambdas)
        gap = expected - target
        return lam[0] * gap + lam[1] * gap * gap, self.lambdas.detach().clone()


def target_ratio(step: int, warmup_steps: int, final_ratio: float, ramp: str = "linear") -> float:
    """The remaining-size target ramps from 1 (dense) to the final ratio over the warm-up: linearly, or with
    ramp="cubic" as in gradual pruning (Zhu & Gupta 2017: the cut so far is 1 - (1 - t)^3 of the whole, large early,
    small near the end, so the last cuts leave the masks time to adapt)."""
    if warmup_steps <= 0:
        return final_ratio
    frac = min(1.0, step / warmup_steps)
    if ramp == "cubic":
        frac = 1.0 - (1.0 - frac) ** 3
    elif ramp != "linear":
        raise ValueError(f"ramp={ramp!r} is not accepted; choose one of {list(RAMPS)}")
    return 1.0 - frac * (1.0 - final_ratio)
