"""The output head's two products at the update's and the rollout's position counts, in either layout of the
logits: position-major (`hidden @ weight.T`, `F.linear`'s, `[positions, vocab]`) and vocabulary-major
(`weight @ hidden.T`, `[vocab, positions]`), the layout of `models.HeadTokenLogprobs` (tried in session 35,
taken out, and back in session 36 after learning over 32 seeds: benchmarks/RESULTS.md).

    uv run python benchmarks/head_layout.py

For each vocabulary (`ppo-lm bench`'s `small_vocab` 4,096, a 32,000-token one and `small`'s 151,936; hidden 512)
and each number of positions, the best alternated seconds over `--repeats` rounds of the forward product in each
layout and of the backward pass's product for the hidden states' gradient (`[positions, vocab] @ weight` from a
position-major gradient, `[vocab, positions].T @ weight` from a vocabulary-major one), with the rate each ran at.
Prints one JSON line per shape.
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import best_alternated


def time_shape(weight: torch.Tensor, positions: int, repeats: int) -> dict[str, float]:
    """One JSON line's figures for `weight` (`[vocab, hidden]`) and `positions` rows of hidden states."""
    vocab, hidden_size = weight.shape
    hidden = torch.randn(positions, hidden_size)
    grad_position_major = torch.randn(positions, vocab)
    grad_vocab_major = grad_position_major.T.contiguous()
    best = best_alternated({
        "forward_position_major": lambda: hidden @ weight.T,
        "forward_vocab_major": lambda: weight @ hidden.T,
        "backward_position_major": lambda: grad_position_major @ weight,
        "backward_vocab_major": lambda: grad_vocab_major.T @ weight,
    }, repeats)
    flop = 2 * positions * hidden_size * vocab
    return {"vocab": vocab, "positions": positions, "hidden": hidden_size,
            **{f"{name}_ms": round(seconds * 1e3, 2) for name, seconds in best.items()},
            **{f"{name}_tflops": round(flop / seconds / 1e12, 3) for name, seconds in best.items()},
            "forward_speedup": round(best["forward_position_major"] / best["forward_vocab_major"], 2),
            "backward_speedup": round(best["backward_position_major"] / best["backward_vocab_major"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabularies", default="4096,32000,151936")
    parser.add_argument("--positions", default="16,32,48,80,160,512")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    for vocab in map(int, arguments.vocabularies.split(",")):
        weight = torch.randn(vocab, arguments.hidden) * 0.02
        for positions in map(int, arguments.positions.split(",")):
            print(json.dumps(time_shape(weight, positions, arguments.repeats)))


if __name__ == "__main__":
    main()
