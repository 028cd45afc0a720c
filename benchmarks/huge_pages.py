"""What page faults cost a float32 output-head product on the CPU: the head's `F.linear` into a fresh tensor
against into one allocated before, and a fresh `[positions, vocab]` tensor allocated and filled, in a child process
with torch's huge-page allocation off and in one with it on (`THP_MEM_ALLOC_ENABLE`, read once per process).

    uv run python benchmarks/huge_pages.py

Prints one line per setting with the best of `--repeats` calls of each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from timing import seconds_per_call


def measure(positions: int, hidden: int, vocab: int, repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    weight, states = torch.randn(vocab, hidden) * 0.02, torch.randn(positions, hidden)
    out = torch.empty(positions, vocab)
    calls = {
        "head into a fresh tensor": lambda: F.linear(states, weight),
        "head into an allocated tensor": lambda: torch.matmul(states, weight.T, out=out),
        "fresh tensor, allocate and fill": lambda: torch.empty(positions, vocab).fill_(1.0),
    }
    figures = {name: seconds_per_call(call, repeats, free_after_clock=True) * 1e3 for name, call in calls.items()}
    setting = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    print(f"THP_MEM_ALLOC_ENABLE={setting}: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in figures.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        measure(arguments.positions, arguments.hidden, arguments.vocab, arguments.repeats)
        return
    for setting in ("0", "1", "0", "1"):  # alternated, a fresh process each
        subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], check=True,
                       env={**os.environ, "THP_MEM_ALLOC_ENABLE": setting})


if __name__ == "__main__":
    main()
