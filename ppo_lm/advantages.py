"""Stage 6 of a PPO step: advantages and returns, the registry of advantage estimators, and masked whitening.

Every function works on `[batch, time]` tensors with a 0/1 `mask` that is 1 on the valid response tokens (a
prefix of each row). Nothing loops over tokens in Python: GAE is a matrix product with a discount matrix.

An advantage estimator is a function of `AdvantageInputs` returning `(advantages, returns)`, registered by name in
`ADVANTAGE_ESTIMATORS` with whether it needs the value model's estimates; `PPOConfig.advantage_estimator` names one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppo_lm.registry import Registry


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1. Masked entries may hold NaN or inf: they are never read."""
    mask = mask.to(values.dtype)
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    if dim is None:
        return masked.sum() / mask.sum().clamp(min=1)
    return masked.sum(dim) / mask.sum(dim).clamp(min=1)


def _no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    all_sum: Callable[[torch.Tensor], torch.Tensor] = _no_reduce,
) -> torch.Tensor:
    """Scale `values` to unit variance (and mean 0 when `shift_mean`) over the valid entries; 0 elsewhere.

    The variance is the unbiased one. `all_sum` sums a tensor over the processes of a data-parallel run, so that the
    mean and the variance cover every process's entries (`distributed.all_sum`); by default only these are used.
    """
    valid = mask.bool()
    zeros = torch.zeros_like(values)
    totals = all_sum(torch.stack([torch.where(valid, values, zeros).sum(), valid.sum().to(values.dtype)]))
    count = totals[1]
    mean = totals[0] / count.clamp(min=1)
    squares = all_sum(torch.where(valid, (values - mean) ** 2, zeros).sum())
    whitened = (values - mean) * torch.rsqrt(squares / (count - 1).clamp(min=1) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, zeros)


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid prefix of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last valid token (the episode ends there), and
    A_t = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}. Returns `(advantages, returns)` with
    `returns = advantages + values`; both are 0 where `mask` is 0.
    """
    valid = mask.bool()
    values = torch.where(valid, values, torch.zeros_like(values))
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    deltas = torch.where(valid, deltas, torch.zeros_like(deltas))
    # discount[s, t] = (gamma * lam)^(s - t) for s >= t: A = deltas @ discount sums each future delta once.
    steps = torch.arange(rewards.shape[1], device=rewards.device)
    offsets = steps[:, None] - steps[None, :]
    base = torch.tensor(gamma * lam, dtype=torch.float64, device=rewards.device)
    discount = torch.where(offsets >= 0, base ** offsets.clamp(min=0).to(torch.float64), 0.0)
    advantages = (deltas.to(torch.float64) @ discount).to(rewards.dtype)
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read of one process's rollout; `[batch, response]` unless noted."""

    rewards: torch.Tensor
    """Shaped per-token rewards: -kl_coef * KL on each valid token, plus the score on the last."""
    values: torch.Tensor | None
    """The value model's estimate before each response token; None for an estimator that does not need them."""
    mask: torch.Tensor
    """1 on valid response tokens."""
    scores: torch.Tensor
    """The score of each response (after the missing-EOS penalty), `[batch]`."""
    gamma: float
    """Discount factor."""
    lam: float
    """GAE lambda."""


AdvantageEstimator = Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]
"""`estimator(inputs) -> (advantages, returns)`, both `[batch, response]` and 0 where the mask is 0; the returns are
the value model's targets."""

ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("gae", needs_values=True)
def gae(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's estimator: GAE over the shaped per-token rewards and the value model's estimates (`compute_gae`)."""
    return compute_gae(inputs.rewards, inputs.values, inputs.mask, inputs.gamma, inputs.lam)
