"""How often the bundled SmolLM2-135M-Instruct answers candidate demo tasks right before any training: the
measurement behind the choice of the word-problems demo task (README).

    uv run python scripts/starting_accuracy.py [--problems 64] [--max_new_tokens 40]

Each task's problems go through the chat template as one user message; an answer is right when its last integer is
the answer (`verifiable_rewards.exact_integer`, the demo's reward). Greedy, and sampled at temperature 0.7 (the
demo's), bfloat16 on the CPU. A task worth training on is right sometimes but not mostly: a group of answers to one
problem then often holds a right and a wrong one (the signal), and there is room to improve.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo_lm.demo import ensure_demo_model
from ppo_lm.verifiable_rewards import exact_integer
from ppo_lm.word_problems import HELD_OUT_SEED, word_problem_rows

ASK = "Answer with the number only."


def arithmetic(count: int, seed: int, operator: str, first: tuple[int, int], second: tuple[int, int]) -> list[dict]:
    rng, rows = random.Random(seed), []
    for _ in range(count):
        a, b = rng.randint(*first), rng.randint(*second)
        answer = {"+": a + b, "-": a - b, "times": a * b}[operator]
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} {operator} {b}? {ASK}"}], "answer": answer})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    arguments = parser.parse_args()
    n = arguments.problems
    tasks = {
        "A + B, one digit": arithmetic(n, 0, "+", (1, 9), (1, 9)),
        "A + B, two digits": arithmetic(n, 0, "+", (10, 99), (10, 99)),
        "A times B, one digit": arithmetic(n, 0, "times", (2, 9), (2, 9)),
        "A - B, two digits minus one": arithmetic(n, 0, "-", (20, 99), (1, 19)),
        "word problems (the demo's held-out set)": word_problem_rows(n, HELD_OUT_SEED),
    }
    path = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    print(f"| task ({n} problems) | greedy | sampled, temperature 0.7 |\n|---|---|---|")
    for name, rows in tasks.items():
        texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
                 for row in rows]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        accuracy = []
        for sample in (False, True):
            torch.manual_seed(0)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=arguments.max_new_tokens, do_sample=sample,
                                        temperature=0.7 if sample else None, top_k=0 if sample else None,
                                        top_p=1.0 if sample else None, pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            accuracy.append(sum(exact_integer([], answers, [row["answer"] for row in rows])) / n)
        print(f"| {name} | {accuracy[0]:.0%} | {accuracy[1]:.0%} |", flush=True)


if __name__ == "__main__":
    main()
