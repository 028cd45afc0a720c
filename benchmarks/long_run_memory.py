"""Does a long run's memory stay flat? Peak resident memory of a `ppo-lm train` run at each step, on a tiny random
model, through the whole loop (rollouts, updates, logging, evaluation, checkpoints, the KL controller).

    uv run python benchmarks/long_run_memory.py [--steps 300] [--arch tiny] [--out DIR]

A leak (metrics kept in memory, evaluation samples piling up, a growing KL history, tensors held across steps) shows
as a peak that keeps climbing; a flat run's peak at the last step is its peak at step 50, give or take the
allocator. Prints a JSON line per checkpoint step (50, 100, ...) and the ratio of the last step's peak to step 50's.
The peak is the process's `ru_maxrss` (Linux: KiB), read after each step. Since a peak set early (loading the
models) could hide a slow climb below it, each line also gives the resident memory at that step (`VmRSS` in
/proc/self/status), and the last line its ratio too.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident memory now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--arch", default="tiny", help="a ppo_lm.bench architecture (random weights)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    arguments = parser.parse_args()

    from ppo_lm.bench import build_model_dirs
    from ppo_lm.cli import main as ppo_lm
    from ppo_lm.ppo_trainer import PPOTrainer

    work = Path(tempfile.mkdtemp(prefix="ppo-lm-memory-"))
    policy, _ = build_model_dirs(arguments.arch, work / "models")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n"
                               for i in range(64)))
    reward = work / "reward.py"
    reward.write_text("def reward(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")

    peaks: dict[int, float] = {}
    resident: dict[int, float] = {}
    train_step = PPOTrainer.train_step

    def measured_step(self: PPOTrainer, items: list) -> dict:
        stats = train_step(self, items)
        peaks[self.step_count] = peak_rss_mib()
        resident[self.step_count] = rss_mib()
        return stats

    PPOTrainer.train_step = measured_step  # the benchmark's own probe; the run is otherwise `ppo-lm train`'s
    run_dir = arguments.out or work / "run"
    status = ppo_lm(["train", "--model_name", policy, "--dataset", str(prompts), "--reward_fn", f"{reward}:reward",
                     "--output_dir", str(run_dir), "--overwrite", "--total_steps", str(arguments.steps),
                     "--batch_size", "8", "--max_new_tokens", "8", "--eval_fraction", "0.25", "--eval_steps", "25",
                     "--save_steps", "50", "--save_total_limit", "2", "--adaptive_kl_target", "1.0",
                     "--report_to", "tensorboard", "--device", "cpu"])
    if status != 0:
        return status
    for step in range(50, arguments.steps + 1, 50):
        print(json.dumps({"arch": arguments.arch, "step": step, "peak_rss_mib": round(peaks[step], 1),
                          "rss_mib": round(resident[step], 1)}))
    last = max(peaks)
    print(json.dumps({"peak_at_last_over_peak_at_50": round(peaks[last] / peaks[50], 4),
                      "rss_at_last_over_rss_at_50": round(resident[last] / resident[50], 4), "last_step": last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
