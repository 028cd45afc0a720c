"""Seconds per step of the GSM8K recipe (configs/gsm8k/*.yaml) on the Qwen2.5-0.5B architecture with random weights.

    python scripts/time_gsm8k_recipe.py [--recipes ppo,grpo] [--steps 2] [--eval] [--out FILE.jsonl]
    python scripts/time_gsm8k_recipe.py --tiny      # a 2-layer model on the CPU: checks the script, times nothing

Builds a random Qwen2 causal LM of Qwen2.5-0.5B-Instruct's shape (24 layers, hidden 896, 151,936-token vocabulary,
tied embeddings; nothing is downloaded), then runs `PPOTrainer.ppo_step` with each recipe config's settings on
synthetic prompts of 80 to 200 tokens (GSM8K questions in the chat template are about that long) and a reward that
is 0 or 1 at random. Prints one JSON line per step: the seconds of each stage and the peak GPU memory; with `--eval`,
also the seconds of one evaluation of 1,319 prompts (the test split's size). A random model almost never samples
EOS, so every response runs to `max_new_tokens` (512): the figures are an upper bound for a trained model, whose
answers are shorter.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ppo_lm import PPOConfig, PPOTrainer
from ppo_lm.bench import qwen_tokenizer
from ppo_lm.runs import read_config_file

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "gsm8k"
TEST_QUESTIONS = 1319

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643, bos_token_id=None)
TINY = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def synthetic_prompts(count: int, seed: int = 0) -> list[str]:
    """Prompts of 80 to 200 tokens (' hello' is one Qwen token)."""
    rng = random.Random(seed)
    return ["hello" + " hello" * (rng.randint(80, 200) - 1) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="ppo,grpo")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--eval", action="store_true", help="Also time one evaluation of 1,319 prompts.")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer model, tiny batches, on the CPU.")
    parser.add_argument("--out", help="Also append the JSON lines to this file.")
    args = parser.parse_args()

    model_dir = Path(tempfile.mkdtemp()) / "qwen2.5-0.5b-random"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**(TINY if args.tiny else QWEN25_05B))).save_pretrained(model_dir)
    tokenizer = qwen_tokenizer()
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"  # as Qwen2.5-Instruct's tokenizer
    tokenizer.save_pretrained(model_dir)
    prompts = synthetic_prompts(TEST_QUESTIONS)
    rng = random.Random(1)

    def coin_reward(prompt_texts: list[str], completions: list[str], **columns) -> list[float]:
        return [float(rng.random() < 0.5) for _ in completions]  # groups with both outcomes, as early in training

    def record(line: dict) -> None:
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(line) + "\n")

    cuda = torch.cuda.is_available() and not args.tiny
    for name in args.recipes.split(","):
        settings = read_config_file(RECIPES / f"{name}.yaml", PPOConfig)
        settings.update(model_name=str(model_dir), report_to="none", device="cuda" if cuda else "cpu",
                        reward_fn=None, reward_weights=None)  # the coin reward below takes their place
        if args.tiny:
            settings.update(batch_size=16, micro_batch_size=8, max_new_tokens=4)
        config = PPOConfig(**settings)
        trainer = PPOTrainer(config, reward_fn=coin_reward)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        per_step = config.items_per_step
        for step in range(args.steps):
            stats = trainer.ppo_step(prompts[step * per_step:(step + 1) * per_step])
            record({"recipe": name, "step": step, "responses": config.batch_size,
                    "micro_batch": config.micro_batch_size, "response_length": round(stats["response_length"], 1),
                    **{key: round(value, 1) for key, value in stats.items() if key.startswith("time/")},
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                    "device": torch.cuda.get_device_name() if cuda else "cpu"})
        if args.eval:
            eval_prompts = prompts[:2 if args.tiny else TEST_QUESTIONS]
            start = time.perf_counter()
            trainer.evaluate(eval_prompts)
            record({"recipe": name, "eval_prompts": len(eval_prompts), "eval_greedy": config.eval_greedy,
                    "seconds": round(time.perf_counter() - start, 1)})
        del trainer
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
