"""Where one PPO step's time goes: torch's profiler over a step, after a warm-up step, on `ppo-lm bench`'s models.

    uv run python benchmarks/profile_step.py --arch small_vocab --prompt_lengths 32 --use_lora true

Builds `--arch`'s random policy and reward model (`ppo_lm.bench.build_model_dirs`), makes `ppo-lm bench`'s
prompts and step shape (`ppo_lm.bench.BENCH_DEFAULTS`, sampling at temperature 1 without top-k or top-p, as
`benchmarks/compare_trl.py` runs it), and prints the process's resident memory after the imports and after the
models load (read from /proc/self/statm, Linux only), the step's stage times, and the profiler's table of the
operators that took the most time themselves. Options other than the three above are PPOConfig fields, as in
`ppo-lm bench`.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    imported = resident_gib()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vocab")
    parser.add_argument("--prompt_lengths", default="32")
    parser.add_argument("--rows", type=int, default=30, help="Operators in the table.")
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
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            stats = all_or_nothing_step(trainer, prompts, rollback=True)
    print(f"resident memory: {imported:.3f} GiB after the imports, {loaded:.3f} GiB after the models load")
    print("stage seconds:", {key[5:]: round(value, 3) for key, value in stats.items() if key.startswith("time/")})
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=arguments.rows,
                                       max_name_column_width=60))


if __name__ == "__main__":
    main()
