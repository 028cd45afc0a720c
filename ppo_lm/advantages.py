"""Stage 6 of a PPO step: advantages and returns by GAE, and masked whitening.

Every function works on `[batch, time]` tensors with a 0/1 `mask` that is 1 on the valid response tokens (a
prefix of each row). Nothing loops over tokens in Python: GAE is a matrix product with a discount matrix.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1. Masked entries may hold NaN or inf: they are never read."""
    mask = mask.to(values.dtype)
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    if dim is None:
        return masked.sum() / mask.sum().clamp(min=1)
    return masked.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of `values` where `mask` is 1 (0 when fewer than two entries are valid)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    sum_sq = masked_mean((values - mean) ** 2, mask) * count
    return sum_sq / (count - 1).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale `values` to unit variance (and mean 0 when `shift_mean`) over the valid entries; 0 elsewhere."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


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
