"""Time the reference trainer, TRL 1.12.0's `trl.experimental.ppo.PPOTrainer`, on the same models and prompts.

Runs in its own virtual environment (TRL is not a dependency of ppo-lm); `compare_trl.py` calls it:

    /path/to/trl-venv/bin/python benchmarks/trl_reference.py --policy DIR --reward DIR --lora 1 ...

Prints one JSON line with the median seconds between successive PPO updates and the process's peak memory.

How a step is sized here: `--batch_size` prompts, `per_device_train_batch_size=--micro_batch_size` rows per
forward/backward pass, `gradient_accumulation_steps=batch_size // micro_batch_size` to reach the batch, one minibatch
(`num_mini_batches=1`), and the rollout's forward passes (logprobs, reference, values, rewards) also on
`--micro_batch_size` rows at a time (`local_rollout_forward_batch_size`). `--micro_batch_size` equal to
`--batch_size` is the whole batch in every pass, with no accumulation.

TRL 1.12.0's own defaults (checked on the installed `trl.experimental.ppo.PPOConfig`; a user who sets none of them
gets these): `per_device_train_batch_size=8`, `gradient_accumulation_steps=1` (so a batch of 8 prompts per device
and step), `local_rollout_forward_batch_size=64`, `num_mini_batches=1`, `num_ppo_epochs=4`,
`gradient_checkpointing=True` and `bf16=None`, which becomes True unless `fp16` is set. Two of these do less than
their names say in the PPOTrainer of 1.12.0:

- `gradient_checkpointing`: the PPOTrainer has its own training loop and never calls
  `gradient_checkpointing_enable`, so the default True has no effect there (no activation recomputation).
- `bf16`: the PPOTrainer builds its own `Accelerator(gradient_accumulation_steps=...)` without `mixed_precision`, so
  `bf16=True` gives no autocast (only an `ACCELERATE_MIXED_PRECISION=bf16` environment, e.g. from `accelerate launch
  --mixed_precision bf16`, would); bfloat16 comes only from the weights' dtype, which `--bf16 1` sets here. And
  transformers' `TrainingArguments` refuses `bf16=True` on a machine without a bf16 GPU unless `use_cpu=True`, so
  TRL's default config fails on a CPU as it is; this script passes `use_cpu=True` where there is no GPU. (In
  transformers' own `Trainer`, `bf16=True` with `use_cpu=True` does mean bfloat16 autocast on the CPU: it passes
  `mixed_precision="bf16"` to its Accelerator, which wraps the model's forward in `torch.autocast("cpu",
  torch.bfloat16)`.)

So by default this script runs float32 weights, no autocast, no gradient checkpointing (as TRL's default would
run in effect), with `--micro_batch_size 4` unless told otherwise; `compare_trl.py` runs it with the whole batch
(`whole`) and with micro-batches and accumulation (`accum`).
"""

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppo_lm.bench import prompt_lengths, synthetic_prompts  # noqa: E402  (shape of the prompts only)


class StepTimer(TrainerCallback):
    """Records the wall-clock time at the end of every PPO update."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--lora", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--prompt_lengths", default="tldr")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", type=int, default=0)
    parser.add_argument("--micro_batch_size", type=int, default=4,
                        help="TRL's per-device batch (and rollout forward batch); the batch is reached by gradient "
                             "accumulation. A whole batch of 32 TL;DR-length prompts does not fit in 24 GiB.")
    arguments = parser.parse_args()

    dtype = torch.bfloat16 if arguments.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(arguments.policy)
    prompts = synthetic_prompts(prompt_lengths(arguments.prompt_lengths, arguments.batch_size, 0))
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(arguments.policy, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(arguments.reward, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(arguments.reward, num_labels=1, dtype=dtype)
    peft_config, reference = None, None
    if arguments.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    else:
        reference = AutoModelForCausalLM.from_pretrained(arguments.policy, dtype=dtype)
    steps = arguments.warmup + arguments.steps
    with tempfile.TemporaryDirectory() as output_dir:
        config = PPOConfig(
            output_dir=output_dir, per_device_train_batch_size=arguments.micro_batch_size,
            gradient_accumulation_steps=arguments.batch_size // arguments.micro_batch_size,
            num_mini_batches=1, num_ppo_epochs=arguments.ppo_epochs, response_length=arguments.max_new_tokens,
            local_rollout_forward_batch_size=arguments.micro_batch_size, total_episodes=arguments.batch_size * steps,
            temperature=1.0, stop_token="eos", num_sample_generations=0, report_to="none", save_strategy="no",
            logging_steps=10_000, learning_rate=1e-5, bf16=bool(arguments.bf16), seed=0,
            use_cpu=not torch.cuda.is_available(),  # else TrainingArguments refuses bf16 on a CPU
        )
        timer = StepTimer()
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward, train_dataset=dataset, value_model=value, callbacks=[timer],
                             peft_config=peft_config)
        trainer.train()
    durations = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)][arguments.warmup - 1 :]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"trainer": "trl-1.12.0", "median_step_s": round(statistics.median(durations), 4),
                      "steps_timed": len(durations), "peak_memory_gib": round(peak, 3)}))


if __name__ == "__main__":
    main()
