"""How the benchmark scripts time a call: a statistic of several runs, or several calls alternated run by run.

The scripts run as `python benchmarks/NAME.py`, which puts this folder first on the import path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping


def seconds_per_call(run: Callable[[], object], repeats: int, statistic: Callable[[list[float]], float] = min,
                     warmup: int = 0, free_after_clock: bool = False) -> float:
    """`statistic` (the best, by default) of the seconds of `repeats` calls of `run`, after `warmup` untimed ones.
    What a call returns is freed inside its time (as a caller that drops it pays), or with `free_after_clock` once
    its time is taken (to time making a large tensor without unmapping it)."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        if free_after_clock:
            result = run()
            seconds.append(time.perf_counter() - start)
            del result
        else:
            run()
            seconds.append(time.perf_counter() - start)
    return statistic(seconds)


def best_alternated(calls: Mapping[Hashable, Callable[[], object]], repeats: int) -> dict[Hashable, float]:
    """The best seconds of each of `calls` over `repeats` rounds that call each once, in order: a machine whose
    speed drifts slows them alike."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, run in calls.items():
            best[name] = min(best[name], seconds_per_call(run, 1))
    return best
