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
import time
from collections.abc import Callable


def best_ms(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        del result
    return min(times) * 1e3


def measure(positions: int, hidden: int, vocab: int, repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    weight, states = torch.randn(vocab, hidden) * 0.02, torch.randn(positions, hidden)
    out = torch.empty(positions, vocab)
    figures = {
        "head into a fresh tensor": best_ms(lambda: F.linear(states, weight), repeats),
        "head into an allocated tensor": best_ms(lambda: torch.matmul(states, weight.T, out=out), repeats),
        "fresh tensor, allocate and fill": best_ms(lambda: torch.empty(positions, vocab).fill_(1.0), repeats),
    }
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
