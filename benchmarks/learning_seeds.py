"""Learning over many seeds: the suite's "the mean reward rises" run (tests/test_ppo_trainer.py,
`test_mean_reward_rises_on_a_simple_reward`) repeated with seeds 0..N-1, one JSON line per seed.

    uv run python benchmarks/learning_seeds.py --seeds 16 > results/learning_seeds_NAME.jsonl

A tiny Qwen3 with large initial weights (the suite's `peaked_model_dir`, built the same way) is trained for 20 PPO
steps to start its completions with a space (reward 1, else 0). Each line has the seed, the first and last five
steps' mean rewards and every step's. A change that is meant to keep the math (a faster product, another summation
order) changes the rounding, so it may send one seed down another sampled path; comparing the spread of the last
five steps' means over many seeds, before and after, tells a changed learning behaviour from one seed's draw.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import build_qwen_tokenizer, space_reward_run, write_peaked_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16, help="Seeds 0..N-1.")
    parser.add_argument("--first_seed", type=int, default=0, help="The first seed (then --seeds in a row).")
    parser.add_argument("--steps", type=int, default=20, help="PPO steps per seed (the test's 20).")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as model_dir:
        write_peaked_model(model_dir, build_qwen_tokenizer())  # the suite's peaked model, whatever the run's seed
        for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds):
            rewards = space_reward_run(model_dir, seed, arguments.steps)
            print(json.dumps({"seed": seed, "first5": round(sum(rewards[:5]) / 5, 4),
                              "last5": round(sum(rewards[-5:]) / 5, 4),
                              "rewards": [round(r, 4) for r in rewards]}), flush=True)


if __name__ == "__main__":
    main()
