"""Time the reference trainer, TRL 1.12.0's `trl.experimental.ppo.PPOTrainer`, on the same models and prompts.

Runs in its own virtual environment (TRL is not a dependency of ppo-lm); `compare_trl.py` calls it:

    /path/to/trl-venv/bin/python benchmarks/trl_reference.py --policy DIR --reward DIR --lora 1 ...

Prints one JSON line with the median seconds between successive PPO updates and the process's peak memory.
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
