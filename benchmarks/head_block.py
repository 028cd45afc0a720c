"""What reusing one logits block saves the fused output head on the CPU (`models.LogitsBlocks`): a pass of
`HeadTokenLogprobs` with the pool against one that allocates a fresh `[positions, vocab]` tensor each time.

    uv run python benchmarks/head_block.py

For each vocabulary, times a pass without gradients (a rollout's logprobs) and a forward and backward pass (an
update's), the two settings alternated call by call in one process, and prints the best of `--repeats` of each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from timing import best_alternated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppo_lm.models as models  # noqa: E402


class FreshBlocks(models.LogitsBlocks):
    """No pool: every pass allocates its logits as `F.linear` does."""

    def take(self, size: int, device: torch.device) -> None:
        return None


def head_passes(vocab: int, positions: int, hidden: int) -> dict[str, Callable[[], None]]:
    """A pass without gradients (a rollout's logprobs) and a forward and backward pass (an update's) of the fused
    head over random states and a random `[vocab, hidden]` weight."""
    weight = torch.randn(vocab, hidden) * 0.02
    states = torch.randn(positions, hidden, requires_grad=True)
    tokens = torch.randint(0, vocab, (positions,))

    def rollout() -> None:
        with torch.no_grad():
            models.HeadTokenLogprobs.apply(states, weight, None, tokens, 1.0, False, False)

    def update() -> None:
        logprobs, _ = models.HeadTokenLogprobs.apply(states, weight, None, tokens, 1.0, False, True)
        logprobs.sum().backward()

    return {"rollout": rollout, "update": update}


def with_pool(pool: models.LogitsBlocks, run: Callable[[], None]) -> Callable[[], None]:
    """`run` with `pool` as the head's pool."""

    def call() -> None:
        models.LOGITS_BLOCKS = pool
        run()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=256, help="Response positions in a pass.")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=8)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    pools = {"fresh": FreshBlocks(), "pooled": models.LogitsBlocks()}
    for vocab in (151_936, 49_152, 4_096):
        passes = head_passes(vocab, arguments.positions, arguments.hidden)
        best = best_alternated({(pool_name, name): with_pool(pool, run) for name, run in passes.items()
                                for pool_name, pool in pools.items()}, arguments.repeats)
        print(f"vocabulary {vocab:7,d}, {arguments.positions} positions: " + ", ".join(
            f"{name} {best['fresh', name] * 1e3:.1f} ms fresh, {best['pooled', name] * 1e3:.1f} ms pooled"
            for name in passes))


if __name__ == "__main__":
    main()
