"""The network of the learned scheduling policies, shared by training and serving.

Permutation-equivariant: one MLP scores every candidate row with the same weights, so a
decision with 3 or 300 candidates uses the same model, and a batch of decisions is one padded
tensor with a mask. Two heads:

- ``scores``: a logit per candidate (PPO: Plackett-Luce ranking logits; DQN: Q(s, pick j)).
- ``value``: from the masked mean and max of the rows' embeddings (PPO: the critic V(s);
  DQN: Q(s, wait)).

Inputs are normalised inside the module with the training set's mean and standard deviation
(buffers, so they travel with the weights). The scores add a linear *prior* over the raw
features, initialised to Tiresias' order (:data:`PRIOR`): a freshly initialised policy
already behaves like a sensible heuristic plus noise, and training only has to learn the
difference (the MLP's last layer starts near zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ganglion.rl.features import FEATURES, NUM_FEATURES

_CLIP = 10.0  # normalised inputs are clipped to +-this many standard deviations

PRIOR = {
    "attained_below_1_gpu_h": 24.0,
    "running": 12.0,
    "log_attained_gpu_h": -3.0,
}
"""The prior's initial weights: jobs under 1 GPU-hour of attained service first (Tiresias'
two queues), running jobs keep their GPUs within a queue, then least attained service first
(on the September-October training windows this beat FIFO inside a queue: 1.02x vs 1.04x
Gittins' avg JCT). Margins are large against the sampling noise (Gumbel, scale 1) so that
exploring rarely preempts a job by accident."""


@dataclass(frozen=True)
class NetConfig:
    """Shape of the network (recorded in the model manifest)."""

    num_features: int = NUM_FEATURES
    """Input columns (the observation schema's width)."""
    hidden: int = 64
    """Width of the hidden layers."""


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inp, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, out),
    )


class SchedulerNet(nn.Module):
    """Per-candidate scores and a pooled value (see the module docstring)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: NetConfig = NetConfig()) -> None:
        super().__init__()
        self.config = config
        f, h = config.num_features, config.hidden
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.prior = nn.Linear(f, 1, bias=False)
        self.actor = _mlp(f, h, 1)
        self.embed = nn.Sequential(nn.Linear(f, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        self.critic = nn.Sequential(nn.Linear(2 * h, h), nn.Tanh(), nn.Linear(h, 1))
        with torch.no_grad():
            self.prior.weight.zero_()
            if config.num_features == NUM_FEATURES:
                for name, weight in PRIOR.items():
                    self.prior.weight[0, FEATURES.index(name)] = weight
            last = self.actor[-1]
            assert isinstance(last, nn.Linear)
            last.weight.mul_(0.01)
            last.bias.zero_()

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(torch.clamp(std, min=0.05))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp((x - self.mean) / self.std, -_CLIP, _CLIP)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """(..., k, F) -> (..., k): the learned part of the scores (the MLP), without the
        prior."""
        r: torch.Tensor = self.actor(self._norm(x)).squeeze(-1)
        return r

    def scores(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(..., k, F), (..., k) -> (..., k) logits; masked rows are -inf."""
        s: torch.Tensor = self.residual(x) + self.prior(x).squeeze(-1)
        return s.masked_fill(~mask, float("-inf"))

    def value(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(..., k, F), (..., k) -> (...,) a scalar per decision."""
        e = self.embed(self._norm(x))
        m = mask.unsqueeze(-1).to(e.dtype)
        count = m.sum(-2).clamp(min=1.0)
        mean = (e * m).sum(-2) / count
        peak = e.masked_fill(~mask.unsqueeze(-1), -1.0).amax(-2)
        v: torch.Tensor = self.critic(torch.cat([mean, peak], -1)).squeeze(-1)
        return v


def plackett_luce_logp(
    logits: torch.Tensor, order: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    """Log-probability of the first ``prefix`` positions of each ranking ``order``.

    ``logits`` (B, k) with -inf on invalid rows; ``order`` (B, k) a permutation with the
    valid rows first; ``prefix`` (B,) how many leading positions count. The probability of
    a ranking under Plackett-Luce is the product over positions of the softmax of the
    chosen row among those not yet chosen.
    """
    # -inf (padding) would turn into NaN gradients inside logcumsumexp; a large finite
    # negative number has the same softmax.
    finite = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, -1e9))
    ranked = torch.gather(finite, 1, order)
    # logsumexp of ranked[k:] for each k: a reversed cumulative logsumexp.
    tail = torch.flip(torch.logcumsumexp(torch.flip(ranked, [1]), 1), [1])
    terms = ranked - tail
    pos = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    keep = pos < prefix.unsqueeze(1)
    return torch.where(keep, terms, torch.zeros_like(terms)).sum(1)


def first_pick_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the first pick (a tractable stand-in for the ranking's entropy)."""
    # Finite stand-ins for -inf: 0 * -inf would make the gradient NaN even where masked.
    safe = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, -1e9))
    logp = torch.log_softmax(safe, -1)
    return -(logp.exp() * logp).sum(-1)
