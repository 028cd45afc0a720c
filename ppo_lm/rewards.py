"""Stages 3 and 4 of a PPO step: score each response, then shape the score into per-token rewards.

The score comes from a reward model or from Python reward functions `fn(prompts, completions, **columns) ->
list[float]`, where `columns` are the dataset row's other columns (one value per completion), as in TRL. This module
checks what a function returns before anything uses it, and `WeightedRewards` sums several functions with weights.
Shaping adds the KL penalty against the reference on every token and the score on the last one; the KL coefficient
is fixed or follows an adaptive controller.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# `fn(prompts, completions, **columns) -> scores`: the two lists positionally, dataset columns by keyword (TRL's way).
RewardFn = Callable[..., Sequence[float]]


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not one finite number per completion."""


def reward_function_name(reward_fn: Callable[..., Any]) -> str:
    """The name a reward function goes by in messages and metrics: its `__name__`, else its class name.

    A `functools.partial` or a callable object has no `__name__`, so it is named by its type ("partial", "MyScorer").
    """
    name = getattr(reward_fn, "__name__", None)
    return name if isinstance(name, str) and name else type(reward_fn).__name__


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


def load_reward_functions(specs: str | Sequence[str]) -> list[RewardFn]:
    """Import one reward function per spec (see `load_reward_function`); a single string is one spec.

    Raises ValueError for an empty list or for any spec that cannot be imported.
    """
    if isinstance(specs, str):
        specs = [specs]
    if len(specs) == 0:
        raise ValueError("No reward function given: pass at least one 'package.module:function' or 'file.py:function'.")
    return [load_reward_function(spec) for spec in specs]


def _column_kwargs(reward_fn: RewardFn, columns: dict[str, list] | None) -> dict[str, list]:
    """The columns `reward_fn` accepts as keywords: all of them with `**kwargs`, else those its parameters name.

    The first two positional parameters receive the prompts and completions, so a column of the same name is not
    passed again (it would be "multiple values for argument"). A signature that cannot be read gets no columns.
    """
    if not columns:
        return {}
    try:
        parameters = list(inspect.signature(reward_fn).parameters.values())
    except (TypeError, ValueError):  # some builtins and C extensions expose no signature
        return {}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = {p.name for p in positional[:2]}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        accepted = set(columns) - taken
    else:
        accepted = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - taken
    # A copy of each list, so one function that edits its argument cannot change what the next one reads.
    return {name: list(values) for name, values in columns.items() if name in accepted}


def check_reward_columns(functions: Sequence[RewardFn], columns: Sequence[str], source: str) -> None:
    """Raise ValueError when a reward function has a parameter with no default (besides the prompts and the
    completions) that names none of `columns`, the dataset's columns other than the prompt: the call would fail at
    the first step. `source` names the dataset in the message."""
    for function in functions:
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):  # no signature to read: nothing to check
            continue
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        needed = [p.name for p in parameters if p.default is p.empty and p not in positional[:2]
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [name for name in needed if name not in columns]
        if missing:
            raise ValueError(
                f"Reward function {reward_function_name(function)!r} needs the column(s) {missing} (parameters "
                f"without a default), which {source} lacks; its columns besides the prompt are {sorted(columns)}. "
                "Add the column to the data, or give the parameter a default."
            )


def call_reward_fn(
    reward_fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None
) -> torch.Tensor:
    """Call `reward_fn` and return its scores as a float32 tensor, `[batch]`.

    `columns` maps a dataset column's name to its values, one per completion. The function gets, as keyword
    arguments, every column if it takes `**kwargs`, else only the columns its parameters name; a plain
    `fn(prompts, completions)` gets none. Raises ValueError when a column does not hold one value per completion,
    and RewardFunctionError (naming the function) when the function raises, returns the wrong number of scores, or
    returns a score that is not a finite number.
    """
    for column, values in (columns or {}).items():
        if len(values) != len(completions):
            raise ValueError(
                f"Column {column!r} holds {len(values)} values for {len(completions)} completions; reward function "
                "columns need one value per completion."
            )
    name = f"Reward function {reward_function_name(reward_fn)!r}"
    try:
        scores = reward_fn(prompts, completions, **_column_kwargs(reward_fn, columns))
    except Exception as error:
        raise RewardFunctionError(f"{name}: reward_fn raised {type(error).__name__}: {error}") from error
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().flatten().tolist()
    try:
        scores = list(scores)
    except TypeError:
        raise RewardFunctionError(
            f"{name}: reward_fn must return a list of floats, one per completion; it returned "
            f"{type(scores).__name__}."
        ) from None
    if len(scores) != len(completions):
        raise RewardFunctionError(
            f"{name}: reward_fn returned {len(scores)} scores for {len(completions)} completions; return one per "
            "completion."
        )
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise RewardFunctionError(
                f"{name}: reward_fn returned {score!r} for completion {i} ({completions[i]!r:.60}); every score must "
                "be a finite number."
            )
    return torch.tensor(scores, dtype=torch.float32)


class WeightedRewards:
    """Several reward functions scored together: the weighted sum of their scores, and each one's own scores.

    `weights` defaults to 1.0 for every function. `names` holds each function's `reward_function_name`, made unique
    with `_2`, `_3`, ... for repeats, so each can be logged as a metric of its own.
    """

    def __init__(self, functions: Sequence[RewardFn], weights: Sequence[float] | None = None) -> None:
        functions = list(functions)
        if not functions:
            raise ValueError("WeightedRewards needs at least one reward function.")
        for function in functions:
            if not callable(function):
                raise TypeError(f"Reward functions must be callable; got {type(function).__name__}.")
        self.functions = functions
        self.names = _unique_names([reward_function_name(f) for f in functions])
        if weights is None:
            weights = [1.0] * len(functions)
        weights = list(weights)
        if len(weights) != len(functions):
            raise ValueError(
                f"Got {len(weights)} reward weight(s) for {len(functions)} reward function(s) {self.names}; give one "
                "weight per function, in the same order, or none (each then weighs 1.0)."
            )
        for name, weight in zip(self.names, weights, strict=True):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"The weight of reward function {name!r} is {weight!r}; it must be a finite number.")
        self.weights = [float(weight) for weight in weights]

    def __len__(self) -> int:
        return len(self.functions)

    def __call__(
        self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score the completions with every function (see `call_reward_fn` for `columns` and the errors).

        Returns `(scores, per_function)`: `scores` the weighted sum, float32 `[batch]`; `per_function` each
        function's unweighted scores, float32 `[batch]`, under its name in `names`.
        """
        per_function = {
            name: call_reward_fn(function, prompts, completions, columns)
            for name, function in zip(self.names, self.functions, strict=True)
        }
        # Summed in float64 and rounded once; one function of weight 1 thus comes back bit for bit.
        stacked = torch.stack(list(per_function.values())).double()
        weights = torch.tensor(self.weights, dtype=torch.float64).unsqueeze(-1)
        scores = (weights * stacked).sum(0).float()
        if not torch.isfinite(scores).all():  # finite scores times large weights can still overflow float32
            raise RewardFunctionError(
                f"The weighted sum of the reward functions {self.names} (weights {self.weights}) overflows float32; "
                "use smaller weights or scores."
            )
        return scores, per_function


def _unique_names(names: list[str]) -> list[str]:
    """`names` with each repeat suffixed `_2`, `_3`, ... (skipping any suffix that is already taken)."""
    seen: set[str] = set()
    unique = []
    for name in names:
        candidate, count = name, 1
        while candidate in seen:
            count += 1
            candidate = f"{name}_{count}"
        seen.add(candidate)
        unique.append(candidate)
    return unique


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
