"""Learning over many seeds: one of the suite's "the mean reward rises" runs (tests/test_ppo_trainer.py) repeated
with seeds 0..N-1, one JSON line per seed.

    uv run python benchmarks/learning_seeds.py --seeds 16 > results/learning_seeds_NAME.jsonl
    uv run python benchmarks/learning_seeds.py --run grpo --seeds 16

A tiny Qwen3 with large initial weights (the suite's `peaked_model_dir`, built the same way) is trained to start its
completions with a space (reward 1, else 0): `--run ppo` (the default) is `test_mean_reward_rises_on_a_simple_reward`'s
run (PPO with GAE, 20 steps), any other name one of `test_each_critic_free_estimator_raises_the_mean_reward`'s
(`conftest.CRITIC_FREE_RUNS`: groups of 4, 16 steps). Each line has the run, the seed, the mean reward over the first
and the last few steps (5 for PPO, 4 for the critic-free runs), whether that one seed passes a one-seed check (last
window above 0.8 and 0.2 above the first: the critic-free test's check before session 37, which now asks two seeds),
and every step's mean reward. A change that is
meant to keep the math (a faster product, another summation order) changes the rounding, so it may send one seed down
another sampled path; comparing the spread over many seeds, before and after, tells a changed learning behaviour from
one seed's draw, and the share of seeds that pass says how often a one-seed test would fail by chance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import (  # noqa: E402
    CRITIC_FREE_RUNS,
    build_qwen_tokenizer,
    space_reward_run,
    write_peaked_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="ppo", choices=["ppo", *CRITIC_FREE_RUNS], help="Which learning test's run.")
    parser.add_argument("--seeds", type=int, default=16, help="Seeds 0..N-1.")
    parser.add_argument("--first_seed", type=int, default=0, help="The first seed (then --seeds in a row).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per seed (the test's: 20 PPO, 16 critic-free).")
    arguments = parser.parse_args()
    critic_free = arguments.run != "ppo"
    steps = arguments.steps or (16 if critic_free else 20)
    window = 4 if critic_free else 5
    overrides = CRITIC_FREE_RUNS[arguments.run] if critic_free else {}
    with tempfile.TemporaryDirectory() as model_dir:
        write_peaked_model(model_dir, build_qwen_tokenizer())  # the suite's peaked model, whatever the run's seed
        for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds):
            rewards = space_reward_run(model_dir, seed, steps, **overrides)
            first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
            print(json.dumps({"run": arguments.run, "seed": seed, f"first{window}": round(first, 4),
                              f"last{window}": round(last, 4), "passes": last > first + 0.2 and last > 0.8,
                              "rewards": [round(r, 4) for r in rewards]}), flush=True)


if __name__ == "__main__":
    main()
