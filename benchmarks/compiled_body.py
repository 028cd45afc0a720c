"""What `torch.compile` would save the update's body passes on the CPU: a LoRA policy body's forward and backward
pass, eager against compiled, on micro-batches of a real rollout. An experiment: ppo-lm does not compile.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) uv run python benchmarks/compiled_body.py --prompt_lengths 32 --rows 16
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) uv run python benchmarks/compiled_body.py --prompt_lengths tldr --rows 4 \
        --dynamic

(A fresh compiler cache each time: a warm one makes the first call's compilation several times shorter.)

Builds `--arch`'s random policy and reward model (`ppo_lm.bench.build_model_dirs`), samples one rollout of
`ppo-lm bench`'s shape, and takes micro-batches of `--rows` rows of similar prompt length (up to four of them,
spread over the lengths, one per shape). Each pass runs the policy body (autocast as the trainer runs it) to the
hidden states at the response positions and back from the sum of their squares, which reaches every LoRA weight.
Prints the seconds of the compiled body's first call on each micro-batch (compilation included), the largest
difference of its hidden states from the eager body's, and per micro-batch the best milliseconds of each over
`--repeats` alternated calls.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import best_alternated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_lm.bench import BENCH_DEFAULTS, build_model_dirs, prompt_lengths, synthetic_prompts  # noqa: E402
from ppo_lm.config import PPOConfig  # noqa: E402
from ppo_lm.generation import SequenceBatch, backbone_of  # noqa: E402
from ppo_lm.models import response_hidden_states  # noqa: E402
from ppo_lm.ppo_trainer import PPOTrainer  # noqa: E402
from ppo_lm.runs import parse_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small")
    parser.add_argument("--prompt_lengths", default="32")
    parser.add_argument("--rows", type=int, default=16, help="Rows per micro-batch.")
    parser.add_argument("--dynamic", action="store_true", help="Compile for dynamic shapes (one compilation).")
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    if not 1 <= arguments.rows <= BENCH_DEFAULTS["batch_size"]:
        parser.error(f"--rows {arguments.rows} must be between 1 and the rollout's {BENCH_DEFAULTS['batch_size']} rows")
    with tempfile.TemporaryDirectory() as directory:
        policy, reward = build_model_dirs(arguments.arch, Path(directory))
        defaults = {**BENCH_DEFAULTS, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "model_name": policy,
                    "reward_model_name": reward, "output_dir": str(Path(directory) / "run"), "use_lora": True}
        config = parse_config(PPOConfig, defaults, [], prog="compiled_body.py")
        trainer = PPOTrainer(config)
        prompts = synthetic_prompts(prompt_lengths(arguments.prompt_lengths, config.items_per_step, config.seed))
        batch = trainer.make_rollout(prompts).batch
        order = torch.argsort(batch.attention_mask.sum(1))
        starts = sorted({int(start) for start in torch.linspace(0, len(order) - arguments.rows, 4)})
        micros = list({micro.input_ids.shape: micro for micro in (
            batch.select(order[start : start + arguments.rows]) for start in starts)}.values())  # distinct shapes
        eager = backbone_of(trainer.models.policy)
        compiled = torch.compile(eager, dynamic=arguments.dynamic)

        def forward_backward(body: torch.nn.Module, micro: SequenceBatch) -> torch.Tensor:
            with trainer.models.gradient_mode():
                hidden = response_hidden_states(body, micro)
                hidden.float().pow(2).sum().backward()
            trainer.optimizer.zero_grad()
            return hidden.detach().float()

        for micro in micros:
            start = time.perf_counter()
            compiled_hidden = forward_backward(compiled, micro)
            first = time.perf_counter() - start
            difference = (compiled_hidden - forward_backward(eager, micro)).abs().max().item()
            print(f"{tuple(micro.input_ids.shape)}: first compiled call {first:.1f} s, largest difference "
                  f"{difference:.4f} (hidden states up to {compiled_hidden.abs().max().item():.2f})")
        for micro in micros:
            best = best_alternated({"eager": lambda m=micro: forward_backward(eager, m),
                                    "compiled": lambda m=micro: forward_backward(compiled, m)}, arguments.repeats)
            print(f"{tuple(micro.input_ids.shape)}: eager {best['eager'] * 1e3:.0f} ms, "
                  f"compiled {best['compiled'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
