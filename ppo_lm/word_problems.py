"""The reasoning demo's task: one-step addition word problems, generated from a seed, each with its integer answer.

"Mia has 7 shells and finds 12 more. How many shells does Mia have now? Answer with the number only." The bundled
SmolLM2-135M-Instruct gets about half of these right when greedy and far fewer when sampled: it often tells a story,
subtracts or multiplies, or runs out of tokens before the number (see `ppo_lm.demo` for the measured figures). So
there is a signal to learn from and room to learn. The problems are conversations (one user message) with an
`answer` column, the form any conversational dataset takes (`ppo_lm.data`), scored by
`ppo_lm.verifiable_rewards.exact_integer`.
"""

from __future__ import annotations

import random
from typing import Any

NAMES = ("Tom", "Anna", "Ravi", "Mia", "Leo", "Sara", "Ken", "Lucy", "Omar", "Zoe", "Ben", "Ivy")
THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "coins", "cards", "stamps")
GAINS = ("buys", "finds", "gets", "is given", "picks up", "wins")
SMALLEST, LARGEST = 2, 20
"""Both numbers of a problem are drawn from this range, inclusive."""
INSTRUCTION = "Answer with the number only."


def word_problem(rng: random.Random) -> tuple[str, int]:
    """One problem drawn with `rng`: its question (ending in `INSTRUCTION`) and its answer."""
    name, thing, gain = rng.choice(NAMES), rng.choice(THINGS), rng.choice(GAINS)
    first, second = rng.randint(SMALLEST, LARGEST), rng.randint(SMALLEST, LARGEST)
    question = (f"{name} has {first} {thing} and {gain} {second} more. How many {thing} does {name} have now? "
                f"{INSTRUCTION}")
    return question, first + second


def word_problem_rows(count: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """`count` distinct problems drawn from `seed`, none of whose questions is in `exclude`, as dataset rows:
    `{"prompt": [{"role": "user", "content": question}], "answer": answer}`."""
    rng, seen, rows = random.Random(seed), set(exclude), []
    while len(rows) < count:
        question, answer = word_problem(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"prompt": [{"role": "user", "content": question}], "answer": answer})
    return rows


HELD_OUT_SEED = 1_000_003
"""The held-out problems are drawn from this seed alone: the same ones for every run, so runs can be compared."""


def train_and_held_out(train_count: int, held_out_count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out problems that share no question: the held-out ones drawn first, from `HELD_OUT_SEED`
    (the same ones whatever `seed` and `train_count` are), then the training ones from `seed` with those excluded."""
    held_out = word_problem_rows(held_out_count, HELD_OUT_SEED)
    train = word_problem_rows(train_count, seed, exclude={row["prompt"][0]["content"] for row in held_out})
    return train, held_out
