"""What drawing one token per row costs: `torch.multinomial` (transformers' sampling) against
`generation.inverse_cdf_sample`, on softmax probabilities of random logits, alternated in one process.

    uv run python benchmarks/sampling.py

Prints, per (rows, vocabulary), the best time of each over `--repeats` alternated calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timing import best_alternated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_lm.generation import inverse_cdf_sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    for rows, vocab in ((32, 151_936), (8, 49_152), (32, 4_096)):
        probs = (torch.randn(rows, vocab) * 3).softmax(-1)
        samplers = {"multinomial": lambda p=probs: torch.multinomial(p, 1),
                    "inverse_cdf": lambda p=probs: inverse_cdf_sample(p)}
        best = best_alternated(samplers, arguments.repeats)
        print(f"rows {rows:3d}, vocabulary {vocab:7,d}: " +
              ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in best.items()))


if __name__ == "__main__":
    main()
