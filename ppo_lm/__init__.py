"""ppo-lm: a fast, correct, resumable PPO (RLHF) trainer for causal language models.

The names below load with the module that defines them, on first use: `import ppo_lm` (and the `ppo-lm` command,
which checks its arguments and config before any model loads) does not import transformers and peft until a
trainer is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULE_OF = {
    "compute_gae": "advantages", "masked_mean": "advantages", "masked_whiten": "advantages",
    "PPOConfig": "config", "RewardConfig": "config", "SFTConfig": "config",
    "approx_kl": "losses", "clipped_policy_loss": "losses", "clipped_value_loss": "losses",
    "entropy_from_logits": "losses", "exact_kl": "losses", "kl_estimate": "losses",
    "PPOTrainer": "ppo_trainer", "RewardTrainer": "reward_trainer", "SFTTrainer": "sft_trainer",
    "KLController": "rewards", "RewardFunctionError": "rewards", "shape_rewards": "rewards",
}
"""Each public name and the module of the package that defines it."""

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


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'ppo_lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ppo_lm.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])
