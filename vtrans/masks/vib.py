"""The structure mask: one module per masked structure (a layer's heads, its FFN neurons, a block, the
hidden dimension), applied by a hook on the module it gates (vtrans.masks.attach). Always float32.

method "vib": a Variational Information Bottleneck mask (Dai et al. 2018; VTrans). Per unit `mu` and
`log_sigma2`; training multiplies by z = mu + eps * sigma (eps drawn per token); evaluation by
1[kept] * mu. A unit is kept when log_alpha = log_sigma2 - log mu^2 < 0.
method "score": a one-shot importance score written by a scorer (baselines); identity until decided.
"""
from __future__ import annotations

import torch
from torch import nn

LOG_EPS = 1e-8


class StructureMask(nn.Module):
    def __init__(self, kind: str, n: int, method: str = "vib", mu_init: float = 1.0, mu_std: float = 0.01,
                 log_sigma2_init: float = -9.0, log_sigma2_std: float = 0.01, k: float = 10.0):
        super().__init__()
        self.kind, self.n, self.method, self.k = kind, n, method, k
        self.mu = nn.Parameter(torch.empty(n).normal_(mu_init, mu_std))
        self.log_sigma2 = nn.Parameter(torch.empty(n).normal_(log_sigma2_init, log_sigma2_std))
        if method != "vib":
            with torch.no_grad():
                self.mu.fill_(1.0)
            self.mu.requires_grad_(False)
            self.log_sigma2.requires_grad_(False)
        self.register_buffer("scores", torch.zeros(n), persistent=True)  # filled by one-shot scorers
        self.register_buffer("decided", torch.ones(n, dtype=torch.bool), persistent=True)
        self.register_buffer("has_decision", torch.zeros((), dtype=torch.bool), persistent=True)
        # The kept set as of the last forward, read by the norm hooks.
        self.register_buffer("kept_now", torch.ones(n, dtype=torch.bool), persistent=False)
        self.last_kl: torch.Tensor | None = None
        self.last_soft: torch.Tensor | None = None

    # --- statistics (pure functions of the parameters) ---
    def log_alpha(self) -> torch.Tensor:
        return self.log_sigma2 - torch.log(self.mu.pow(2) + LOG_EPS)

    def importance(self) -> torch.Tensor:
        """Higher = keep. VIB: -log_alpha (keep when > 0); one-shot: the scorer's score."""
        if self.method == "vib":
            return -self.log_alpha().detach()
        return self.scores

    def kept(self) -> torch.Tensor:
        if bool(self.has_decision):
            return self.decided
        if self.method == "vib":
            return self.log_alpha().detach() < 0
        return torch.ones(self.n, dtype=torch.bool, device=self.mu.device)

    def kl(self) -> torch.Tensor:
        """KL = 0.5 * sum log(1 + mu^2 / sigma^2) (Dai et al. 2018, eq. 9 up to constants)."""
        if self.method != "vib":
            return self.mu.new_zeros(())
        return 0.5 * torch.log1p(self.mu.pow(2) / self.log_sigma2.exp()).sum()

    def soft_kept(self) -> torch.Tensor:
        """Differentiable kept indicator per unit: sigmoid(-k * log_alpha)."""
        if self.method != "vib":
            return self.kept().to(self.mu.dtype)
        # units cut by an in-training decision count as gone (`decided` is all True before any decision)
        return torch.sigmoid(-self.k * self.log_alpha()) * self.decided

    def hard_values(self) -> torch.Tensor:
        """The evaluation mask 1[kept] * mu, which materialisation folds into the weights."""
        return self.kept().to(self.mu.dtype) * self.mu.detach()

    def hard_zero(self) -> bool:
        """True when this mask keeps no unit and multiplies by exactly zero in this forward."""
        hard = not (self.training and self.method == "vib") or bool(self.has_decision)
        return hard and not bool(self.kept_now.any())

    def decide(self, keep: torch.Tensor) -> None:
        self.decided.copy_(keep.to(self.decided.device))
        self.has_decision.fill_(True)
        self.kept_now.copy_(self.decided)

    def reset_decision(self) -> None:
        self.decided.fill_(True)
        self.has_decision.fill_(False)
        self.kept_now.copy_(self.kept())

    # --- the gate itself ---
    def forward(self, x: torch.Tensor):
        """x: [..., n, k] (units on dim -2). Returns (x * z, kl, soft_kept) of this forward."""
        self.kept_now.copy_(self.kept())
        if self.training and self.method == "vib":
            sigma = torch.exp(0.5 * self.log_sigma2)
            eps = torch.randn(x.shape[:-1], device=x.device, dtype=torch.float32)
            z = self.mu + eps * sigma
            if bool(self.has_decision):
                z = z * self.decided
        else:
            z = self.hard_values()
        out = x * z.to(x.dtype).unsqueeze(-1)
        return out, self.kl(), self.soft_kept()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n={self.n}, method={self.method}"


class BlockGain(nn.Module):
    """A block's per-channel output gain (`mask.gains`): one trained float32 scale per hidden channel that multiplies
    an attention or FFN block's output, initialised at 1. It prunes nothing and carries no KL: it lets the masks
    rescale what a pruned block writes to the residual stream, channel by channel (a kept unit's mu rescales the
    unit, this the block's output rows), and materialisation folds it into the block's output projection."""

    def __init__(self, kind: str, n: int):
        super().__init__()
        self.kind, self.n = kind, n
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n={self.n}"
