"""Registries of the algorithm's variable parts: a name for each small function, with what it declares it needs.

The advantage estimators (`advantages.ADVANTAGE_ESTIMATORS`), policy losses (`losses.POLICY_LOSSES`) and KL
estimators (`losses.KL_ESTIMATORS`) are each a `Registry`. The config's allowed values come from them, and the
trainer calls the function registered under the configured name, so a variant is one decorated function:

    @ADVANTAGE_ESTIMATORS.register("my_estimator", needs_values=False)
    def my_estimator(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered function and what it declared about itself."""

    name: str
    """The name configs use."""
    function: F
    """The function itself; calling the entry calls it."""
    needs_values: bool = False
    """Whether the function reads the value model's estimates (a run whose estimator does not need them runs no value
    pass and trains no value model)."""
    needs_groups: bool = False
    """Whether the function compares the responses to one prompt (it needs `num_generations >= 2`)."""
    whitens: bool = False
    """Whether its advantages are whitened over the batch unless the config says otherwise."""

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


class Registry(Generic[F]):
    """Names mapped to functions of one kind, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        """What the functions are, for error messages ('advantage estimator')."""
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, *, needs_values: bool = False, needs_groups: bool = False,
                 whitens: bool = False) -> Callable[[F], F]:
        """Decorator: register the function under `name` (a name is registered once) and return it unchanged; the
        flags are what it declares (`Entry`)."""

        def add(function: F) -> F:
            if name in self._entries:
                raise ValueError(f"A {self.kind} named {name!r} is already registered.")
            self._entries[name] = Entry(name, function, needs_values, needs_groups, whitens)
            return function

        return add

    def unregister(self, name: str) -> None:
        """Remove `name` (for a variant registered for a while, e.g. by a test)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> Entry[F]:
        if name not in self._entries:
            raise ValueError(f"Unknown {self.kind} {name!r}: use one of {', '.join(self._entries)}.")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)
