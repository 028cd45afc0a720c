"""benchmarks/profile_step.py: the allocation figures it reads from the profiler's memory events (no profiling)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
profile_step = importlib.util.module_from_spec(_spec)
sys.modules["profile_step"] = profile_step
_spec.loader.exec_module(profile_step)

MIB = 2**20


def fake_profile(events: list[tuple[str, int, int]]) -> SimpleNamespace:
    """A stand-in for a finished `torch.profiler.profile`: events as (name, start in ns, bytes)."""
    made = [SimpleNamespace(name=lambda n=name: n, start_ns=lambda t=start: t, nbytes=lambda b=nbytes: b)
            for name, start, nbytes in events]
    return SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: made)))


def test_allocation_figures_follow_the_events_in_time_order():
    # Listed out of order on purpose; in time order the live bytes go 3, 4, 1, 3, 2, 6, 2, 2.5 MiB.
    events = [
        ("[memory]", 40, -1 * MIB),
        ("[memory]", 10, 3 * MIB),
        ("aten::mm", 15, 99 * MIB),  # not a memory event: ignored
        ("[memory]", 30, 2 * MIB),
        ("[memory]", 20, 1 * MIB),
        ("[memory]", 25, -3 * MIB),
        ("[memory]", 50, 4 * MIB),  # the most live (6 MiB); a 4 MiB block is not one "of 1 to 4 MiB"
        ("[memory]", 60, MIB // 2),
        ("[memory]", 55, -4 * MIB),
    ]
    figures = profile_step.allocation_figures(fake_profile(events))
    assert figures["most_live"] == pytest.approx(6 / 1024)  # GiB
    assert figures["allocated"] == pytest.approx(10.5 / 1024)  # 3 + 1 + 2 + 4 + 0.5 MiB
    assert figures["allocated_1_to_4_mib"] == pytest.approx(6 / 1024)  # 3 + 1 + 2 MiB


def test_allocation_figures_of_no_events_are_zero():
    assert profile_step.allocation_figures(fake_profile([])) == {
        "most_live": 0.0, "allocated": 0.0, "allocated_1_to_4_mib": 0.0}
