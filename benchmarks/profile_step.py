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
kept (freed, not returned, not reused).
Options other than the four above are PPOConfig fields, as in `ppo-lm bench`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch.profiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_lm.bench import BENCH_DEFAULTS, build_model_dirs, prompt_lengths, synthetic_prompts  # noqa: E402
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


def main() -> None:
    imported = resident_gib()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vocab")
    parser.add_argument("--prompt_lengths", default="32")
    parser.add_argument("--rows", type=int, default=30, help="Operators in the table.")
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
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=arguments.live_memory) as profile:
            stats = all_or_nothing_step(trainer, prompts, rollback=True)
    print(f"resident memory: {imported:.3f} GiB after the imports, {loaded:.3f} GiB after the models load")
    if arguments.live_memory:
        figures = allocation_figures(profile)
        print(f"tensor memory the profiled step held at once, at most, over what it started with: "
              f"{figures['most_live']:.3f} GiB; the process's peak resident memory after the warm-up step (the same "
              f"shapes, no profiler): {warmed_peak:.3f} GiB; tensor bytes the step allocated: "
              f"{figures['allocated']:.2f} GiB, {figures['allocated_1_to_4_mib']:.2f} GiB of them in blocks of 1 to "
              "4 MiB")
    print("stage seconds:", {key[5:]: round(value, 3) for key, value in stats.items() if key.startswith("time/")})
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=arguments.rows,
                                       max_name_column_width=60))


if __name__ == "__main__":
    main()
