"""Where one PPO step's time goes: torch's profiler over a step, after a warm-up step, on `ppo-lm bench`'s models.

    uv run python benchmarks/profile_step.py --arch small_vocab --prompt_lengths 32 --use_lora true

Builds `--arch`'s random policy and reward model (`ppo_lm.bench.build_model_dirs`), makes `ppo-lm bench`'s
prompts and step shape (`ppo_lm.bench.BENCH_DEFAULTS`, sampling at temperature 1 without top-k or top-p, as
`benchmarks/compare_trl.py` runs it), and prints the process's resident memory after the imports and after the
models load (read from /proc/self/statm, Linux only), the step's stage times, and the profiler's table of the
operators that took the most time themselves. With `--live_memory`, also the most tensor memory the profiled step
held at once and the bytes it allocated in all (from the profiler's allocation events), beside the process's peak
resident memory over the warm-up step (the same shapes, before the profiler's own records): what is resident after
the models load plus the first figure is about what a step needs; the rest of the peak is memory the C allocator
kept (freed, not returned, not reused). With `--matmul_shapes`, also a table of the step's matrix products grouped
by shape (`aten::mm`, `aten::addmm`, `aten::bmm`): calls, seconds, FLOPs and the rate each shape ran at, beside the
rate of a square product in the weights' dtype (`ppo_lm.bench.matmul_rate`, measured after the step), and how the
profiled step's seconds split into products at that rate, the products' time beyond it, and the rest. Under a
bodies' autocast the bodies' products run in bfloat16, faster than that rate, so the split then understates the
time beyond it. The profiler adds its own time to the operators it records, unevenly: the unprofiled step's stage
seconds are printed beside the profiled one's (on a 2-core AVX2 EPYC, `small_vocab` LoRA in float32: 33.72 s
against 22.32 s, benchmarks/RESULTS.md, session 29): compare operators within one table, and time a suspect with a
wall-clock timer in an unprofiled step before trusting its share.
Options other than the five above are PPOConfig fields, as in `ppo-lm bench`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch.profiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_lm.bench import (  # noqa: E402
    BENCH_DEFAULTS,
    build_model_dirs,
    matmul_rate,
    prompt_lengths,
    synthetic_prompts,
)
from ppo_lm.config import PPOConfig  # noqa: E402
from ppo_lm.ppo_trainer import PPOTrainer  # noqa: E402
from ppo_lm.runs import parse_config  # noqa: E402
from ppo_lm.training import all_or_nothing_step  # noqa: E402


def resident_gib() -> float:
    """This process's resident memory now, in GiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**30


def allocation_figures(profile: torch.profiler.profile) -> dict[str, float]:
    """From the profiler's memory events (+ bytes at each allocation, - at each free), in GiB: the largest sum of
    tensor bytes allocated and not yet freed at any moment of the profiled region, counted from its start; the bytes
    allocated in all; and those of them in blocks of 1 to 4 MiB."""
    events = sorted((event.start_ns(), event.nbytes()) for event in profile.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    live = most = allocated = middling = 0
    for _, nbytes in events:
        live += nbytes
        most = max(most, live)
        allocated += max(nbytes, 0)
        middling += nbytes if 2**20 <= nbytes < 2**22 else 0
    return {"most_live": most / 2**30, "allocated": allocated / 2**30, "allocated_1_to_4_mib": middling / 2**30}


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def product_flops(name: str, shapes: list[list[int]]) -> int:
    """FLOPs of one matrix product from its input shapes: `mm` [M, K] x [K, N], `addmm` (bias, [M, K], [K, N]),
    `bmm` [B, M, K] x [B, K, N]; 2 FLOPs per multiply-add."""
    left, right = shapes[1:3] if name == "aten::addmm" else shapes[:2]
    batch = left[0] if name == "aten::bmm" else 1
    return 2 * batch * left[-2] * left[-1] * right[-1]


def matmul_rows(averages: list) -> list[dict]:
    """The matrix products of a profile grouped by input shape (`key_averages(group_by_input_shape=True)`), most
    self time first: operator, shapes, calls, seconds, FLOPs and the rate they ran at (FLOP/s)."""
    rows = []
    for event in averages:
        if event.key in MATRIX_PRODUCTS and event.input_shapes:
            seconds, flops = event.self_cpu_time_total / 1e6, event.count * product_flops(event.key, event.input_shapes)
            rows.append({"op": event.key, "shapes": event.input_shapes, "calls": event.count, "seconds": seconds,
                         "flops": flops, "rate": flops / seconds if seconds else 0.0})
    return sorted(rows, key=lambda row: -row["seconds"])


def main() -> None:
    imported = resident_gib()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vocab")
    parser.add_argument("--prompt_lengths", default="32")
    parser.add_argument("--rows", type=int, default=30, help="Operators in the table.")
    parser.add_argument("--matmul_shapes", action="store_true",
                        help="Also print the step's matrix products by shape, with the rate each ran at.")
    parser.add_argument("--live_memory", action="store_true",
                        help="Also record torch's CPU allocations in the profiled step (slower) and print the most "
                             "tensor memory it held at once, beside the process's peak resident memory.")
    arguments, overrides = parser.parse_known_args()

    with tempfile.TemporaryDirectory() as directory:
        policy, reward = build_model_dirs(arguments.arch, Path(directory))
        defaults = {**BENCH_DEFAULTS, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "model_name": policy,
                    "reward_model_name": reward, "output_dir": str(Path(directory) / "run")}
        config = parse_config(PPOConfig, defaults, overrides, prog="profile_step.py")
        trainer = PPOTrainer(config)
        loaded = resident_gib()
        prompts = synthetic_prompts(prompt_lengths(arguments.prompt_lengths, config.items_per_step, config.seed))
        all_or_nothing_step(trainer, prompts, rollback=True)
        warmed_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; before the profiler
        unprofiled = all_or_nothing_step(trainer, prompts, rollback=True)  # the profiler's own cost, by difference
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=arguments.live_memory,
                                    record_shapes=arguments.matmul_shapes) as profile:
            stats = all_or_nothing_step(trainer, prompts, rollback=True)
        square_rate = matmul_rate(trainer.device, trainer.dtype) if arguments.matmul_shapes else 0.0
    print(f"resident memory: {imported:.3f} GiB after the imports, {loaded:.3f} GiB after the models load")
    if arguments.live_memory:
        figures = allocation_figures(profile)
        print(f"tensor memory the profiled step held at once, at most, over what it started with: "
              f"{figures['most_live']:.3f} GiB; the process's peak resident memory after the warm-up step (the same "
              f"shapes, no profiler): {warmed_peak:.3f} GiB; tensor bytes the step allocated: "
              f"{figures['allocated']:.2f} GiB, {figures['allocated_1_to_4_mib']:.2f} GiB of them in blocks of 1 to "
              "4 MiB")
    for name, figures in (("profiled", stats), ("unprofiled", unprofiled)):
        print(f"stage seconds, {name} step:",
              {key[5:]: round(value, 3) for key, value in figures.items() if key.startswith("time/")})
    if arguments.matmul_shapes:
        print_matmul_table(matmul_rows(profile.key_averages(group_by_input_shape=True)), square_rate,
                           stats["time/step"], arguments.rows)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=arguments.rows,
                                       max_name_column_width=60))


def print_matmul_table(rows: list[dict], square_rate: float, step_seconds: float, limit: int) -> None:
    """The products by shape (the `limit` slowest), then the step's seconds split three ways."""
    print(f"matrix products by shape; a square product ran at {square_rate / 1e12:.3f} TFLOP/s")
    print(f"{'op':<12} {'shapes':<44} {'calls':>6} {'seconds':>8} {'GFLOP':>9} {'TFLOP/s':>8}")
    for row in rows[:limit]:
        print(f"{row['op'][6:]:<12} {str(row['shapes'])[:44]:<44} {row['calls']:>6} {row['seconds']:>8.3f} "
              f"{row['flops'] / 1e9:>9.1f} {row['rate'] / 1e12:>8.3f}")
    seconds, flops = sum(row["seconds"] for row in rows), sum(row["flops"] for row in rows)
    at_rate = flops / square_rate if square_rate else 0.0
    print(f"profiled step {step_seconds:.2f} s: products {seconds:.2f} s ({flops / 1e12:.3f} TFLOP, {at_rate:.2f} s "
          f"at the square rate, {seconds - at_rate:.2f} s beyond it), everything else {step_seconds - seconds:.2f} s")


if __name__ == "__main__":
    main()
