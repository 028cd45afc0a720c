"""The per-step costs that scale with the trained weights, not the tokens: the AdamW step, the rollback copy, and
a fresh allocation the size of the largest weight (as each dense embedding gradient is).

    uv run python benchmarks/per_weight_costs.py --arch small

Builds the trained tensors of a full fine-tuning run of `--arch` (the policy, and with `--value_model` a second,
separate value backbone as a GAE run has), gives them random gradients and prints one JSON line: the median seconds
of torch's default AdamW (its per-tensor loop on the CPU), of `ppo_lm.backend.adamw` (torch's fused kernel where it
applies), of a rollback copy into new tensors and of one into the previous copy's tensors (`Backend.snapshot`), and
of `torch.zeros` the shape of the largest trained tensor (a fresh allocation pays a page fault per page touched).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from timing import seconds_per_call
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_lm.backend import Backend, adamw  # noqa: E402
from ppo_lm.bench import qwen3_config  # noqa: E402


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median seconds of `repeats` calls after one untimed call (AdamW creates its state at its first step)."""
    return seconds_per_call(run, repeats, statistics.median, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small")
    parser.add_argument("--value_model", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [AutoModelForCausalLM.from_config(qwen3_config(args.arch)) for _ in range(1 + args.value_model)]
    parameters = [p for model in models for p in model.parameters()]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    record = {"arch": args.arch, "value_model": args.value_model, "threads": torch.get_num_threads(),
              "trained_gib": round(sum(p.numel() * p.element_size() for p in parameters) / 2**30, 3)}
    for name, make in (("adamw_default_s", lambda: torch.optim.AdamW(parameters, lr=1e-5)),
                       ("adamw_ours_s", lambda: adamw(parameters, lr=1e-5))):
        optimizer = make()
        record[name] = round(median_seconds(optimizer.step, args.repeats), 4)
    backend = Backend()
    backend.optimizer = optimizer  # the fused one, with its state
    record["snapshot_fresh_s"] = round(median_seconds(backend.snapshot, args.repeats), 4)
    record["snapshot_reused_s"] = round(median_seconds(lambda: backend.snapshot(reuse=True), args.repeats), 4)
    largest = max(parameters, key=lambda p: p.numel())
    record["fresh_zeros_s"] = round(median_seconds(lambda: torch.zeros_like(largest), args.repeats), 4)
    record["largest_mb"] = round(largest.numel() * largest.element_size() / 1e6, 1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
