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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import build_qwen_tokenizer, save_qwen_tokenizer, tiny_config, tiny_qwen3_config  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

from ppo_lm.ppo_trainer import PPOTrainer  # noqa: E402


def starts_with_space(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for a completion that starts with a space, else 0: the test's reward."""
    return [1.0 if completion.startswith(" ") else 0.0 for completion in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16, help="Seeds 0..N-1.")
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as model_dir:
        tokenizer = build_qwen_tokenizer()
        torch.manual_seed(0)  # the suite's peaked model, whatever the run's seed
        Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer), initializer_range=0.5)).save_pretrained(model_dir)
        save_qwen_tokenizer(tokenizer, model_dir)
        prompts = ["The weather today is", "My favourite food:", "Once upon a time", "TL;DR:"] * 4
        for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds):
            config = tiny_config(model_dir, batch_size=16, max_new_tokens=2, learning_rate=1e-2, ppo_epochs=2,
                                 value_learning_rate=1e-2, kl_coef=0.0, gamma=1.0, top_k=0, top_p=1.0, seed=seed)
            trainer = PPOTrainer(config, reward_fn=starts_with_space)
            rewards = [trainer.ppo_step(prompts)["reward_mean"] for _ in range(arguments.steps)]
            print(json.dumps({"seed": seed, "first5": round(sum(rewards[:5]) / 5, 4),
                              "last5": round(sum(rewards[-5:]) / 5, 4),
                              "rewards": [round(r, 4) for r in rewards]}), flush=True)


if __name__ == "__main__":
    main()
