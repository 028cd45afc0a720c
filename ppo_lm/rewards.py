"""Stages 3 and 4 of a PPO step: score each response, then shape the score into per-token rewards.

The score comes from a reward model or from a Python `reward_fn(prompts, completions) -> list[float]`; this module
checks what a function returns before anything uses it. Shaping adds the KL penalty against the reference on every
token and the score on the last one; the KL coefficient is fixed or follows an adaptive controller.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not one finite number per completion."""


def load_reward_function(spec: str) -> RewardFn:
    """Import a reward function named 'package.module:function' or 'path/to/file.py:function'."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise ValueError(f"reward_fn={spec!r} must look like 'package.module:function' or 'file.py:function'.")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward_fn={spec!r}: the file {path} does not exist.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"reward_fn={spec!r}: cannot import {module_name!r} ({error}).") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward_fn={spec!r}: {module_name} has no function {function_name!r}.")
    return function


def call_reward_fn(reward_fn: RewardFn, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """Call `reward_fn` and return its scores as a float32 tensor, `[batch]`.

    Raises RewardFunctionError when the function raises, returns the wrong number of scores, or returns a
    score that is not a finite number.
    """
    try:
        scores = reward_fn(prompts, completions)
    except Exception as error:
        raise RewardFunctionError(f"reward_fn raised {type(error).__name__}: {error}") from error
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().flatten().tolist()
    try:
        scores = list(scores)
    except TypeError:
        raise RewardFunctionError(
            f"reward_fn must return a list of floats, one per completion; it returned {type(scores).__name__}."
        ) from None
    if len(scores) != len(completions):
        raise RewardFunctionError(
            f"reward_fn returned {len(scores)} scores for {len(completions)} completions; return one per completion."
        )
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise RewardFunctionError(
                f"reward_fn returned {score!r} for completion {i} ({completions[i]!r:.60}); every score must be a "
                "finite number."
            )
    return torch.tensor(scores, dtype=torch.float32)


def check_finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """Raise RewardFunctionError if a reward model produced NaN or inf; return the scores otherwise."""
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise RewardFunctionError(f"The reward model scored completion {bad} as {scores[bad].item()}.")
    return scores


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of each response that did not end with a stop token by `penalty` (None: unchanged)."""
    if penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards `[batch, response]`: `-kl_coef * kl` on every valid token, plus the score on the last one."""
    valid = response_mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    return rewards.scatter_add(1, last.unsqueeze(-1), scores.to(rewards.dtype).unsqueeze(-1))


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019) when a target is given.

    The adaptive rule moves the coefficient by `clip(kl / target - 1, -0.2, 0.2) * episodes / horizon` of itself
    after each step, raising it when the policy drifts further from the reference than the target.
    """

    def __init__(self, initial: float, target: float | None = None, horizon: int = 10000):
        self.value = initial
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, episodes: int) -> None:
        """Adapt the coefficient to the mean summed KL of the last batch of `episodes` responses."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * episodes / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the controller exactly."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by `state_dict`."""
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
