"""Time TRL's `GRPOTrainer` (transformers' `generate`, no vLLM) on the models and prompts that `ppo-lm bench` uses.

TRL is not a dependency of ppo-lm: this script runs in a virtual environment of its own, which also needs tyro
(importing `ppo_lm.bench` for the prompt helpers imports the `ppo_lm` package), e.g.

    uv venv /work/trl-grpo-env --python 3.12
    uv pip install --python /work/trl-grpo-env/bin/python trl==1.16.0 torch==2.15.0 transformers==5.24.0 \\
        peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 tyro
    /work/trl-grpo-env/bin/python benchmarks/trl_grpo_reference.py --policy DIR --reward DIR --lora 1

(`benchmarks/compare_trl.py --trainer grpo` saves the model directories and calls it.) One step is one optimizer
step on `--batch_size` completions: `--batch_size / --num_generations` prompts, each sampled `--num_generations`
times, scored by the reward model (a sequence classifier passed to TRL as its reward function), advantages from the
group's mean and standard deviation, one pass over the completions (`num_iterations=1`), no KL term (`beta=0`, so no
reference model). Prints one JSON line: the median seconds between successive optimizer steps after the warm-up, the
process's peak memory (max allocated on CUDA, peak RSS on the CPU) and the settings.

How TRL 1.16.0 sizes a step: `per_device_train_batch_size` counts completions per forward/backward pass, and
`generation_batch_size` (unset here) defaults to `per_device_train_batch_size * processes * steps_per_generation`
with `steps_per_generation` defaulting to `gradient_accumulation_steps`. With the per-device batch set to
`--micro_batch_size` and `batch_size / micro_batch_size` accumulation steps, TRL generates the whole batch once per
optimizer step and slices it into the micro-batches; since generation and optimizer steps line up and
`num_iterations=1`, TRL computes no separate "old" log-probabilities (the ratio is exactly 1 by construction).

TRL's own defaults, for reference (checked on the installed GRPOConfig; a user who sets none of them gets these):
`per_device_train_batch_size=8` completions, `gradient_accumulation_steps=1`, `num_generations=8` (so one prompt per
step), `gradient_checkpointing=True`, `bf16=True` (refused on a machine without a GPU unless `use_cpu=True`),
`learning_rate=1e-6` with linear decay, `beta=0.0`, `num_iterations=1`, `loss_type="dapo"`, `scale_rewards="group"`,
`max_completion_length=512`, temperature 1 with top-k and top-p off. Here the micro-batch defaults to the whole
batch (one forward/backward pass over all completions: TRL's default of no accumulation, at this batch size);
gradient checkpointing is off and float32 is used unless `--bf16 1`, to match ppo-lm's defaults
(`--gradient_checkpointing 1` gives TRL's); the learning rate is ppo-lm's default, 1e-5.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppo_lm.bench import prompt_lengths, synthetic_prompts  # noqa: E402  (shape of the prompts only)

STAGES = {"_generate": "generate", "_calculate_rewards": "reward", "_generate_and_score_completions": "rollout"}
"""GRPOTrainer's methods timed as stages (private names of TRL 1.16.0; a missing one is skipped). `rollout` holds
generation, scoring and the advantages; the rest of a step (`update`) is the loss's forward and backward passes and
the optimizer step."""


class StepTimer(TrainerCallback):
    """Notes the wall-clock time at the end of each optimizer step, and the seconds of each stage within the step."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.stages: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)

    def wrap(self, trainer: GRPOTrainer) -> None:
        """Time the trainer's stage methods (see STAGES) on this instance."""
        for method, stage in STAGES.items():
            if hasattr(trainer, method):
                setattr(trainer, method, self._timed(getattr(trainer, method), stage))

    def _timed(self, function: Callable, stage: str) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._current[stage] += time.perf_counter() - start

        return timed

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.stages.append(dict(self._current))
        self._current.clear()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; fails on a batch that does not split into whole groups or whole micro-batches."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="Directory of the causal LM (and its tokenizer).")
    parser.add_argument("--reward", required=True, help="Directory of the reward model (sequence classifier).")
    parser.add_argument("--lora", type=int, default=1, help="1: LoRA r=16 on every linear layer; 0: full fine-tuning.")
    parser.add_argument("--batch_size", type=int, default=32, help="Completions per optimizer step.")
    parser.add_argument("--num_generations", type=int, default=4, help="Completions per prompt (the group).")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="TRL's max_completion_length.")
    parser.add_argument("--prompt_lengths", default="tldr", help="As `ppo-lm bench`: a number, or 'tldr' (60..400).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first (at least 1).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps (the median is reported).")
    parser.add_argument("--bf16", type=int, default=0, help="1: TRL's bf16 mixed precision; 0: float32.")
    parser.add_argument("--micro_batch_size", type=int, default=None,
                        help="Completions per forward/backward pass (TRL's per_device_train_batch_size); the batch is "
                             "reached by gradient accumulation. Default: the whole batch in one pass.")
    parser.add_argument("--gradient_checkpointing", type=int, default=0, help="1: TRL's default; 0: ppo-lm's.")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    arguments = parser.parse_args(argv)
    arguments.micro_batch_size = arguments.micro_batch_size or arguments.batch_size
    if arguments.batch_size % arguments.num_generations:
        parser.error(f"--batch_size {arguments.batch_size} is not a whole number of groups of "
                     f"{arguments.num_generations}")
    if arguments.batch_size % arguments.micro_batch_size:
        parser.error(f"--micro_batch_size {arguments.micro_batch_size} does not divide --batch_size "
                     f"{arguments.batch_size}")
    if arguments.warmup < 1 or arguments.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step is timed from the previous one's end)")
    return arguments


def main(argv: list[str] | None = None) -> dict:
    arguments = parse_arguments(argv)
    dtype = torch.bfloat16 if arguments.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(arguments.policy)
    num_prompts = arguments.batch_size // arguments.num_generations
    # The prompts `ppo-lm bench` builds with its default seed 0: the same texts, so the same token lengths.
    prompts = synthetic_prompts(prompt_lengths(arguments.prompt_lengths, num_prompts, 0))
    dataset = Dataset.from_dict({"prompt": prompts})
    policy = AutoModelForCausalLM.from_pretrained(arguments.policy, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(arguments.reward, num_labels=1, dtype=dtype)
    peft_config = None
    if arguments.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    steps = arguments.warmup + arguments.steps
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir, max_steps=steps, seed=0, report_to="none", save_strategy="no", logging_steps=1,
            per_device_train_batch_size=arguments.micro_batch_size,
            gradient_accumulation_steps=arguments.batch_size // arguments.micro_batch_size,
            num_generations=arguments.num_generations, max_completion_length=arguments.max_new_tokens,
            num_iterations=1, beta=0.0, temperature=1.0, top_p=1.0, top_k=0, use_vllm=False,
            learning_rate=arguments.learning_rate, bf16=bool(arguments.bf16), use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=bool(arguments.gradient_checkpointing),
        )
        if config.generation_batch_size != arguments.batch_size:  # one generation per optimizer step, as intended
            raise RuntimeError(f"TRL would generate {config.generation_batch_size} completions per step, "
                               f"not {arguments.batch_size}")
        timer = StepTimer()
        trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, reward_processing_classes=tokenizer,
                              peft_config=peft_config, callbacks=[timer])
        timer.wrap(trainer)
        trainer.train()
        history = trainer.state.log_history
    timed = timer.ends[arguments.warmup - 1 :]  # the end of the last warm-up step, then of each timed step
    durations = [later - earlier for earlier, later in zip(timed, timed[1:], strict=False)]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    stage_s = {stage: round(statistics.median(step.get(stage, 0.0) for step in timer.stages[arguments.warmup :]), 4)
               for stage in STAGES.values()}
    stage_s["update"] = round(statistics.median(
        duration - step.get("rollout", 0.0) for duration, step in zip(durations, timer.stages[arguments.warmup :],
                                                                      strict=True)), 4)
    lengths = [entry["completions/mean_length"] for entry in history if "completions/mean_length" in entry]
    result = {
        "trainer": f"trl-{trl.__version__}-grpo", "median_step_s": round(statistics.median(durations), 4),
        "steps_timed": len(durations), "step_s": [round(d, 4) for d in durations],
        "peak_memory_gib": round(peak, 3), "stage_s": stage_s,
        "mean_completion_tokens": round(statistics.mean(lengths), 2) if lengths else None,
        "settings": {
            "device": str(trainer.accelerator.device), "dtype": "bfloat16" if arguments.bf16 else "float32",
            "lora": bool(arguments.lora), "batch_size": arguments.batch_size, "prompts": num_prompts,
            "num_generations": arguments.num_generations, "micro_batch_size": arguments.micro_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "generation_batch_size": config.generation_batch_size,
            "steps_per_generation": config.steps_per_generation, "max_new_tokens": arguments.max_new_tokens,
            "prompt_lengths": arguments.prompt_lengths, "vocab_size": policy.config.vocab_size,
            "gradient_checkpointing": bool(arguments.gradient_checkpointing), "loss_type": config.loss_type,
            "learning_rate": arguments.learning_rate, "warmup": arguments.warmup,
        },
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
