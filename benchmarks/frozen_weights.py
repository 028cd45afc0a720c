"""A transformer body's pass under bfloat16 autocast, with its frozen linear weights float32 (autocast casts them on
every call) against stored in bfloat16 (`ppo_lm.models.store_frozen_linear_weights`), alternated.

    uv run python benchmarks/frozen_weights.py --arch qwen3-0.6b --repeats 6

Builds a random body of `--arch` (`ppo_lm.bench.ARCHITECTURES`) with every weight frozen, as a LoRA base, a reference
or a reward model is, and times a pass without gradients over 32 rows of one token (a decoding step without its
key-value cache) and of 48 tokens (a rollout pass), the median of `--repeats`. It also checks that both give the
same hidden states to the bit. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_lm.bench import qwen3_config  # noqa: E402
from ppo_lm.models import store_frozen_linear_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen3-0.6b")
    parser.add_argument("--repeats", type=int, default=6)
    arguments = parser.parse_args()

    from transformers import Qwen3Model

    torch.manual_seed(0)
    as_float32 = Qwen3Model(qwen3_config(arguments.arch)).eval().requires_grad_(False)
    stored = copy.deepcopy(as_float32)
    store_frozen_linear_weights(stored, torch.bfloat16)
    vocab = as_float32.config.vocab_size
    inputs = {"decode": torch.randint(0, vocab, (32, 1)), "rollout": torch.randint(0, vocab, (32, 48))}

    def run(body: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return body(input_ids=input_ids).last_hidden_state

    same = all(torch.equal(run(as_float32, ids), run(stored, ids)) for ids in inputs.values())
    times: dict[str, list[float]] = {f"{kind}_{name}": [] for kind in inputs for name in ("float32", "stored")}
    for _ in range(arguments.repeats):
        for kind, ids in inputs.items():
            for name, body in (("float32", as_float32), ("stored", stored)):
                start = time.perf_counter()
                run(body, ids)
                times[f"{kind}_{name}"].append(time.perf_counter() - start)
    medians = {f"{key}_ms": round(statistics.median(values) * 1e3, 1) for key, values in times.items()}
    print(json.dumps({"arch": arguments.arch, "repeats": arguments.repeats, "same_hidden_states": same, **medians,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
