"""Which estimator, measured: the word-problems demo under PPO (gae), GRPO, Dr. GRPO, RLOO and REINFORCE++, each
given the same training time, over several seeds; prints a Markdown table of held-out accuracy before and after.

    uv run python scripts/compare_estimators.py [--minutes 2] [--seeds 0 1 2] [--samples 2]
        [--out runs/compare-estimators] [--only grpo rloo] [--table]   (--table: print the finished runs' table)

Each run is `ppo-lm demo --task word-problems` with the demo's config, the estimator's own settings below and
`--max_train_minutes`: the same training time for every estimator (a PPO step, with its value model, costs more
than a GRPO step, so PPO takes fewer steps). The held-out problems and the starting model are the same in every
run, so each seed's "before" figures are the same for every estimator. Runs are sequential: on a 2-core machine two
at once would share the cores and each would get fewer steps. A finished run (its summary.json exists) is not run
again, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ESTIMATORS: dict[str, tuple[str, list[str]]] = {
    # PPO: one response per problem; the value model (a second LoRA adapter and a head) is the baseline.
    "gae": ("PPO (gae)", ["--advantage_estimator", "gae", "--num_generations", "1", "--gamma", "1.0", "--lam", "0.95",
                          "--value_learning_rate", "5e-4"]),
    "grpo": ("GRPO", ["--advantage_estimator", "grpo"]),
    # Dr. GRPO: no division by the group's std, and a loss summed over tokens with a constant divisor.
    "dr_grpo": ("Dr. GRPO", ["--advantage_estimator", "grpo", "--scale_rewards", "none", "--loss_aggregation",
                             "sequence_sum"]),
    "rloo": ("RLOO", ["--advantage_estimator", "rloo"]),
    "reinforce_pp": ("REINFORCE++", ["--advantage_estimator", "reinforce_pp"]),
}
"""Each estimator's key (--only, run directory), its name in the table, and its settings on top of the demo's."""


def run(name: str, seed: int, minutes: float, samples: int, out: Path) -> Path:
    run_dir = out / f"{name}-seed{seed}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    command = ["ppo-lm", "demo", "--task", "word-problems", *ESTIMATORS[name][1], "--seed", str(seed),
               "--max_train_minutes", str(minutes), "--total_steps", "1000", "--eval_samples_per_prompt",
               str(samples), "--output_dir", str(run_dir), "--overwrite"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return run_dir


def mean_se(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return f"{mean:.3f} ± {se:.3f}"


def table(out: Path, names: list[str], seeds: list[int]) -> str:
    rows = ["| estimator | seeds | steps in the budget | greedy before | greedy after | sampled before | "
            "sampled after | KL after (sampled) |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        files = [out / f"{name}-seed{seed}" / "summary.json" for seed in seeds]
        summaries = [json.loads(file.read_text()) for file in files if file.is_file()]
        if not summaries:
            continue
        steps = [s["steps"][1] for s in summaries]
        cells = [mean_se([s[phase]["accuracy"] for s in summaries])
                 for phase in ("greedy_before", "greedy_after", "sampled_before", "sampled_after")]
        kl = mean_se([s["sampled_after"]["kl"] for s in summaries])
        rows.append(f"| {ESTIMATORS[name][0]} | {len(summaries)} | {min(steps)}-{max(steps)} | "
                    + " | ".join(cells) + f" | {kl} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="training time of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=2,
                        help="sampled answers per held-out problem at each evaluation (the demo's: 4)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-estimators"))
    parser.add_argument("--only", nargs="+", choices=list(ESTIMATORS), help="run only these estimators")
    parser.add_argument("--table", action="store_true", help="print the table of the finished runs; run nothing")
    arguments = parser.parse_args()
    names = arguments.only or list(ESTIMATORS)
    if not arguments.table:
        for seed in arguments.seeds:  # seed-major: an early stop still leaves every estimator with some seeds
            for name in names:
                run(name, seed, arguments.minutes, arguments.samples, arguments.out)
    print(f"\nHeld-out accuracy (64 problems; mean ± standard error over seeds), {arguments.minutes:g} min of "
          "training each:\n")
    print(table(arguments.out, names, arguments.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
