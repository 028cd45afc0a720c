"""Fixed-seed PPO, SFT and reward-model runs on a tiny random Qwen3, to check that a refactor keeps the numbers.

    uv run python scripts/fixed_seed_runs.py run OUT_DIR           # three short runs (about a minute on 2 CPU cores)
    uv run python scripts/fixed_seed_runs.py compare BEFORE AFTER  # every shared metric equal to 1e-6?

Run it on the commit before a change and on the change itself, then compare. The PPO run exercises micro-batches,
two minibatches, the frozen-layer cache, the entropy bonus, k3, the adaptive KL controller and the missing-EOS
penalty; the SFT and reward runs use LoRA, micro-batches and a linear schedule. `compare` prints each metric that
differs, and the keys present on one side only (a renamed metric shows up there).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import yaml
from transformers import Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import build_qwen_tokenizer, tiny_qwen3_config  # noqa: E402
from rlhf_data import preference_rows, sft_rows, write_jsonl  # noqa: E402

from ppo_lm.cli import main  # noqa: E402

RUNS = ("ppo", "sft", "reward")
REWARD = "def reward(prompts, completions):\n    return [len(c) / 10 for c in completions]\n"


def build_inputs(work: Path) -> dict[str, Path]:
    """The tiny model, the data files and one config per stage."""
    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(0)
    model_dir = work / "model"
    Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer), initializer_range=0.5)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?" + " ok" * (i % 5)})
                               + "\n" for i in range(24)))
    (work / "reward.py").write_text(REWARD)
    common = {"model_name": str(model_dir), "report_to": "none", "seed": 3}
    configs = {
        "ppo": {**common, "dataset": str(prompts), "reward_fn": f"{work / 'reward.py'}:reward", "batch_size": 8,
                "max_new_tokens": 6, "ppo_epochs": 2, "num_mini_batches": 2, "micro_batch_size": 2,
                "learning_rate": 0.003, "value_learning_rate": 0.01, "total_steps": 4, "eval_steps": 2,
                "eval_fraction": 0.2, "save_steps": 2, "lora_target_modules": ["q_proj", "v_proj", "up_proj"],
                "lora_layers": [1], "entropy_coef": 0.01, "kl_estimator": "k3", "kl_coef": 0.2,
                "adaptive_kl_target": 0.5, "adaptive_kl_horizon": 100, "missing_eos_penalty": -1.0,
                "max_grad_norm": 0.5, "lr_scheduler": "linear"},
        "sft": {**common, "dataset": write_jsonl(work / "sft.jsonl", sft_rows(24)), "batch_size": 8,
                "micro_batch_size": 3, "learning_rate": 0.003, "total_steps": 4, "eval_steps": 2,
                "eval_fraction": 0.2, "lr_scheduler": "linear", "warmup_steps": 1, "sample_max_new_tokens": 4},
        "reward": {**common, "dataset": write_jsonl(work / "pref.jsonl", preference_rows(24)), "batch_size": 8,
                   "micro_batch_size": 3, "learning_rate": 0.003, "total_steps": 4, "eval_steps": 2,
                   "eval_fraction": 0.2, "lr_scheduler": "cosine"},
    }
    paths = {}
    for stage, config in configs.items():
        paths[stage] = work / f"{stage}.yaml"
        paths[stage].write_text(yaml.safe_dump(config))
    return paths


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    configs = build_inputs(out / "inputs")
    commands = {"ppo": "train", "sft": "sft", "reward": "reward"}
    for stage in RUNS:
        code = main([commands[stage], "--config", str(configs[stage]), "--output_dir", str(out / stage)])
        if code != 0:
            raise SystemExit(f"{stage} run failed with exit code {code}")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(before: Path, after: Path, tolerance: float = 1e-6) -> int:
    problems = 0
    for stage in RUNS:
        old, new = read_metrics(before / stage / "metrics.jsonl"), read_metrics(after / stage / "metrics.jsonl")
        if len(old) != len(new):
            print(f"{stage}: {len(old)} lines before, {len(new)} after")
            problems += 1
            continue
        compared, only = 0, set()
        for line, (a, b) in enumerate(zip(old, new, strict=True)):
            only |= set(a) ^ set(b)
            for key in sorted(set(a) & set(b)):
                if key.startswith("time/"):
                    continue
                compared += 1
                if not math.isclose(a[key], b[key], rel_tol=tolerance, abs_tol=tolerance):
                    print(f"{stage} line {line} {key}: {a[key]!r} before, {b[key]!r} after")
                    problems += 1
        print(f"{stage}: {len(old)} lines, {compared} numbers compared (times excluded); keys on one side only: "
              f"{sorted(only) or 'none'}")
    print("same numbers" if problems == 0 else f"{problems} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(__doc__)
