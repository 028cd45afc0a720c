"""Stage 7 of a PPO step, the math: the registries of policy losses and KL estimators, the clipped value loss,
exact KL and entropy.

Losses are means over the valid tokens of the minibatch; each also returns the fraction of tokens it clipped.
A policy loss is registered by name in `POLICY_LOSSES` (`PPOConfig.policy_loss`), a per-token KL estimator in
`KL_ESTIMATORS` (`PPOConfig.kl_estimator`).
"""

from __future__ import annotations

from collections.abc import Callable
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
    """The config fields a policy loss may read (`PPOConfig` has them)."""

    clip_epsilon: float


PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossSettings],
                      tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""`loss(logprobs, old_logprobs, advantages, mask, settings) -> (loss, statistics)`: the first four
`[batch, response]`; the loss a scalar to minimise over the valid tokens, the statistics scalars (logged by name)."""

POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: mean of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = exp(logp - logp_old),
    eps = `settings.clip_epsilon`.

    Returns the loss and `policy_clip_fraction`, the fraction of valid tokens where the clipped term won.
    """
    epsilon = settings.clip_epsilon
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - epsilon, 1.0 + epsilon)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"policy_clip_fraction": masked_mean((clipped > unclipped).float(), mask)}


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
