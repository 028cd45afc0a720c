"""benchmarks/profile_step.py: the figures it reads from the profiler's memory events and matrix products (no
profiling)."""

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


def test_product_flops_read_each_operator_s_own_input_shapes():
    assert profile_step.product_flops("aten::mm", [[4, 3], [3, 5]]) == 2 * 4 * 3 * 5
    assert profile_step.product_flops("aten::addmm", [[5], [4, 3], [3, 5], [], []]) == 2 * 4 * 3 * 5
    assert profile_step.product_flops("aten::bmm", [[2, 4, 3], [2, 3, 5]]) == 2 * 2 * 4 * 3 * 5


def test_matmul_rows_keep_the_products_slowest_first_with_their_rates():
    averages = [
        SimpleNamespace(key="aten::mm", input_shapes=[[4, 3], [3, 5]], count=10, self_cpu_time_total=60.0),
        SimpleNamespace(key="aten::add", input_shapes=[[4, 5], [4, 5]], count=99, self_cpu_time_total=900.0),
        SimpleNamespace(key="aten::addmm", input_shapes=[[5], [8, 3], [3, 5], [], []], count=2,
                        self_cpu_time_total=240.0),
    ]
    rows = profile_step.matmul_rows(averages)
    assert [row["op"] for row in rows] == ["aten::addmm", "aten::mm"]  # no aten::add; the most seconds first
    assert rows[0]["calls"] == 2 and rows[0]["flops"] == 2 * 2 * 8 * 3 * 5
    assert rows[0]["seconds"] == pytest.approx(240e-6)  # the profiler counts microseconds
    assert rows[1]["rate"] == pytest.approx(10 * 2 * 4 * 3 * 5 / 60e-6)
