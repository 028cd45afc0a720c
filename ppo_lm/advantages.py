"""Stage 6 of a PPO step: advantages and returns, the registry of advantage estimators, and masked whitening.

Every function works on `[batch, time]` tensors with a 0/1 `mask` that is 1 on the valid response tokens (a
prefix of each row). Nothing loops over tokens in Python: GAE is a matrix product with a discount matrix.

An advantage estimator is a function of `AdvantageInputs` returning `(advantages, returns)`, registered by name in
`ADVANTAGE_ESTIMATORS` with what it needs (the value model's estimates, groups of responses to one prompt) and whether
its advantages are whitened by default; `PPOConfig.advantage_estimator` names one. docs/estimators.md gives each
one's formula and source.

Group estimators read the rows of a process's batch as consecutive groups of `group_size` responses to one prompt
(the trainer samples them so, and keeps a group on one process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
    group_size: int = 1
    """Responses per prompt (`num_generations`); rows `[g * group_size, (g + 1) * group_size)` are group g."""
    scale_rewards: str = "group"
    """grpo: divide by the group's std ('group'), the batch's ('batch') or nothing ('none')."""
    all_sum: Callable[[torch.Tensor], torch.Tensor] = _no_reduce
    """Sums a tensor over the processes (for batch statistics); by default this process's rows are the batch."""


AdvantageEstimator = Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]
"""`estimator(inputs) -> (advantages, returns)`, both `[batch, response]` and 0 where the mask is 0; the returns are
the value model's targets."""

ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("gae", needs_values=True, whitens=True)
def gae(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's estimator: GAE over the shaped per-token rewards and the value model's estimates (`compute_gae`)."""
    return compute_gae(inputs.rewards, inputs.values, inputs.mask, inputs.gamma, inputs.lam)


GROUP_STD_EPSILON = 1e-4
"""Added to a group's std before dividing by it, so that a group of equal rewards gets advantage 0, not NaN."""


def grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[batch]` scores as `[groups, group_size]`; raises when the rows do not make whole groups."""
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} responses do not make groups of {group_size}.")
    return scores.reshape(-1, group_size)


def zero_variance_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Whether each group's scores are all equal (its group advantages are all 0), `[groups]`."""
    groups = grouped(scores, group_size)
    return (groups == groups[:, :1]).all(-1)


def sequence_return(inputs: AdvantageInputs) -> torch.Tensor:
    """Each response's undiscounted return, `[batch]`: its score minus kl_coef x its summed KL (the sum of its shaped
    rewards); the score alone when the KL is not in the reward."""
    return torch.where(inputs.mask.bool(), inputs.rewards, torch.zeros_like(inputs.rewards)).sum(-1)


def on_every_token(per_response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A `[batch]` value on each valid token of its row, 0 elsewhere."""
    values = per_response.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask.bool(), values, torch.zeros_like(values))


@ADVANTAGE_ESTIMATORS.register("grpo", needs_groups=True)
def grpo(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean of the group) / (std of the group + 1e-4) on every token of
    response i, R_i its return (`sequence_return`). `scale_rewards` 'batch' divides by the std of every response of
    the step instead, 'none' by nothing (Dr. GRPO, Liu et al. 2025). The std is the unbiased one. Returns
    `(advantages, returns)` with the returns R_i on every token."""
    returns = sequence_return(inputs)
    groups = grouped(returns, inputs.group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if inputs.scale_rewards == "group":
        centred = centred / (groups.std(-1, keepdim=True) + GROUP_STD_EPSILON)
    elif inputs.scale_rewards == "batch":
        ones = torch.ones_like(returns)
        totals = inputs.all_sum(torch.stack([returns.sum(), (returns**2).sum(), ones.sum()]).double())
        mean = totals[0] / totals[2]
        variance = (totals[1] - totals[2] * mean**2) / (totals[2] - 1).clamp(min=1)
        centred = centred / (variance.clamp(min=0).sqrt().to(returns.dtype) + GROUP_STD_EPSILON)
    return on_every_token(_zero_where_equal(centred, groups), inputs.mask), on_every_token(returns, inputs.mask)


def _zero_where_equal(advantages: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Exactly 0 for the groups whose returns are all equal (rounding would leave a tiny advantage), flattened."""
    equal = zero_variance_groups(groups.flatten(), groups.shape[1]).unsqueeze(-1)
    return torch.where(equal, torch.zeros_like(advantages), advantages).flatten()


@ADVANTAGE_ESTIMATORS.register("rloo", needs_groups=True)
def rloo(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): A_i = R_i - the mean return of the other
    K - 1 responses of its group, on every token of response i. Returns `(advantages, returns)`."""
    returns = sequence_return(inputs)
    groups = grouped(returns, inputs.group_size)
    size = inputs.group_size
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (size - 1)
    advantages = _zero_where_equal(groups - others_mean, groups)
    return on_every_token(advantages, inputs.mask), on_every_token(returns, inputs.mask)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", whitens=True)
def reinforce_pp(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): the discounted return-to-go of the shaped per-token rewards (-kl_coef x KL on each
    token, the score on the last), G_t = sum_{l >= 0} gamma^l r_{t+l}; whitened over every valid token of the batch
    (the registered default). No value model: GAE with V = 0 and lambda = 1. Returns `(G, G)`."""
    returns, _ = compute_gae(inputs.rewards, torch.zeros_like(inputs.rewards), inputs.mask, inputs.gamma, 1.0)
    return returns, returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", needs_groups=True, whitens=True)
def reinforce_pp_baseline(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with a group baseline: the group's mean score is subtracted from each response's score on its last
    token, then as `reinforce_pp`. Returns `(G, G)`."""
    group_mean = grouped(inputs.scores, inputs.group_size).mean(-1).repeat_interleave(inputs.group_size)
    last = (inputs.mask.sum(-1) - 1).clamp(min=0).unsqueeze(-1)
    rewards = inputs.rewards.scatter_add(1, last, -group_mean.to(inputs.rewards.dtype).unsqueeze(-1))
    return reinforce_pp(replace(inputs, rewards=rewards))
