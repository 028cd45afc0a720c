"""Tiny generated data for the SFT, reward-model and pipeline tests: TL;DR-like prompts, summaries, preferences."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "paper", "green", "quick", "slow", "light", "dark", "house", "road"]


def tldr_prompt(rng: random.Random, index: int) -> str:
    """A short prompt in the TL;DR format."""
    return f"SUBREDDIT: r/test\nTITLE: Post {index}\nPOST: {' '.join(rng.choices(WORDS, k=8))}\nTL;DR:"


def sft_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion rows (the trl-lib/tldr schema) whose completion is always the same short summary."""
    rng = random.Random(seed)
    return [{"prompt": tldr_prompt(rng, i), "completion": " a short summary of the post."} for i in range(count)]


PAIRS = [("good", "bad"), ("yes", "no"), ("happy", "sad"), ("right", "wrong")]
"""The rule of the synthetic preferences: a summary ending in the first word beats the same one ending in the second."""


def preference_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/chosen/rejected rows (the trl-lib/tldr-preference schema): chosen and rejected are the same random
    words, ending in the preferred or the other word of one of `PAIRS` (so no single token decides every pair)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        filler = " ".join(rng.choices(WORDS, k=3))
        better, worse = PAIRS[i % len(PAIRS)]
        rows.append({"prompt": tldr_prompt(rng, i), "chosen": f" {filler} {better}", "rejected": f" {filler} {worse}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write rows as JSON lines; return the path as a string."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
