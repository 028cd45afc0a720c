"""Stage 7 of a PPO step, the math: the registries of policy losses and KL estimators, the clipped value loss,
exact KL and entropy.

A policy loss gives a loss on each token, registered by name in `POLICY_LOSSES` (`PPOConfig.policy_loss`); a loss
aggregation in `LOSS_AGGREGATIONS` (`PPOConfig.loss_aggregation`) makes the minibatch's loss of it, a micro-batch's
part at a time; a per-token KL estimator is registered in `KL_ESTIMATORS` (`PPOConfig.kl_estimator`). The value loss
is a mean over the valid tokens. Each loss also returns the fraction of tokens it clipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ppo_lm.advantages import masked_mean
from ppo_lm.registry import Registry

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`estimator(logprobs, ref_logprobs) -> kl`: a per-token estimate of KL(policy || reference) from the logprobs of
the sampled tokens, any shape."""

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """`logp - logp_ref`: unbiased, can be negative."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """`(r - 1) - log r` with `r = p_ref / p`: unbiased, never negative, lower variance."""
    log_ratio = logprobs - ref_logprobs
    return torch.expm1(-log_ratio) + log_ratio


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) by the estimator registered as `estimator` ('k1', 'k3')."""
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) between the two next-token distributions at each position, summed over the vocabulary:
    no sampling estimate. Logits are `[..., vocab]`; returns `[...]`."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(ref_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean k3 estimate of KL(old policy || new policy) over valid tokens: the early-stopping signal."""
    return masked_mean(kl_k3(old_logprobs, logprobs), mask)


class PolicyLossSettings(Protocol):
    """The config fields a policy loss or a loss aggregation may read (`PPOConfig` has them)."""

    clip_epsilon: float
    clip_epsilon_high: float | None
    dual_clip: float | None
    max_new_tokens: int


PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossSettings],
                      tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""`loss(logprobs, old_logprobs, advantages, mask, settings) -> (per_token_loss, statistics)`: the first four and the
loss `[batch, response]`, the loss to minimise on each valid token (a loss aggregation makes it one number); the
statistics are token means over the valid tokens (logged by name)."""

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, settings: PolicyLossSettings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate of `ratio` on each token: max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high)), and
    with a dual clip c, at most c * |A| where A < 0.

    Statistics: `policy_clip_fraction`, the fraction of valid tokens where the clipped term won; with a dual clip,
    `dual_clip_fraction`, where the bound did.
    """
    low = settings.clip_epsilon
    high = settings.clip_epsilon if settings.clip_epsilon_high is None else settings.clip_epsilon_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    stats = {"policy_clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
    if settings.dual_clip is not None:
        bound = -advantages * settings.dual_clip  # = c * |A| where A < 0
        bounded = (advantages < 0) & (loss > bound)
        loss = torch.where(bounded, bound, loss)
        stats["dual_clip_fraction"] = masked_mean(bounded.float(), mask)
    return loss, stats


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (`clipped_surrogate`) of each token's ratio r = exp(logp - logp_old)."""
    return clipped_surrogate(torch.exp(logprobs - old_logprobs), advantages, mask, settings)


@POLICY_LOSSES.register("gspo")
def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): the clipped surrogate of each response's sequence ratio
    s = exp(mean over its tokens of (logp - logp_old)), the geometric mean of its token ratios.

    Written per token as s_t = sg(s) * exp(logp_t - sg(logp_t)): its value on every token is s, and with the
    'sequence_mean' aggregation its gradient is exactly that of the sequence objective (GSPO-token).
    """
    sequence_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1).detach()
    ratio = torch.exp(sequence_log_ratio.unsqueeze(-1) + logprobs - logprobs.detach())
    return clipped_surrogate(ratio, advantages, mask, settings)


@dataclass(frozen=True)
class MinibatchSize:
    """What a minibatch holds over every process: the denominators of the loss aggregations."""

    tokens: torch.Tensor
    """Valid response tokens."""
    responses: torch.Tensor
    """Responses."""


LossAggregation = Callable[[torch.Tensor, torch.Tensor, MinibatchSize, PolicyLossSettings], torch.Tensor]
"""`aggregate(per_token_loss, mask, minibatch, settings) -> loss`: the part of the minibatch's loss that these rows
(a micro-batch on one process) make; the parts of every micro-batch and process add up to the minibatch's loss."""

LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(per_token: torch.Tensor, mask: torch.Tensor, minibatch: MinibatchSize,
               settings: PolicyLossSettings) -> torch.Tensor:
    """The mean over every valid token of the minibatch: each token counts the same."""
    return masked_mean(per_token, mask) * (mask.sum() / minibatch.tokens.clamp(min=1))


@LOSS_AGGREGATIONS.register("sequence_mean")
def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, minibatch: MinibatchSize,
                  settings: PolicyLossSettings) -> torch.Tensor:
    """The mean over the minibatch's responses of each response's token mean: each response counts the same."""
    return masked_mean(per_token, mask, dim=-1).sum() / minibatch.responses.clamp(min=1)


@LOSS_AGGREGATIONS.register("sequence_sum")
def sequence_sum(per_token: torch.Tensor, mask: torch.Tensor, minibatch: MinibatchSize,
                 settings: PolicyLossSettings) -> torch.Tensor:
    """The mean over the minibatch's responses of each response's token sum divided by `max_new_tokens` (Dr. GRPO):
    a token's weight does not depend on the length of its response."""
    summed = torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum()
    return summed / (settings.max_new_tokens * minibatch.responses.clamp(min=1))


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_clip - R)^2), V_clip within value_clip of the old V.

    Returns `(loss, clip_fraction)`, the fraction being that of valid tokens where the clipped term won.
    """
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by `logits`, over the last dimension."""
    log_norm = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_norm - (probs * logits).sum(-1)
