"""ppo-lm: a fast, correct, resumable PPO (RLHF) trainer for causal language models."""

from ppo_lm.advantages import compute_gae, masked_mean, masked_whiten
from ppo_lm.config import PPOConfig, RewardConfig, SFTConfig
from ppo_lm.losses import (
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    exact_kl,
    kl_estimate,
)
from ppo_lm.ppo_trainer import PPOTrainer
from ppo_lm.reward_trainer import RewardTrainer
from ppo_lm.rewards import KLController, RewardFunctionError, shape_rewards
from ppo_lm.sft_trainer import SFTTrainer

__all__ = [
    "KLController",
    "PPOConfig",
    "PPOTrainer",
    "RewardConfig",
    "RewardFunctionError",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
    "approx_kl",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_gae",
    "entropy_from_logits",
    "exact_kl",
    "kl_estimate",
    "masked_mean",
    "masked_whiten",
    "shape_rewards",
]
