"""Stage 6 of a PPO step: advantages and returns by GAE, and masked whitening.

Every function works on `[batch, time]` tensors with a 0/1 `mask` that is 1 on the valid response tokens (a
prefix of each row). Nothing loops over tokens in Python: GAE is a matrix product with a discount matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
