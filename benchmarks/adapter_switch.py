"""What switching between the policy and value LoRA adapters costs, on a model of a named shape.

    python benchmarks/adapter_switch.py --arch qwen3-0.6b --device cuda [--out OUT.jsonl]

With LoRA and GAE, ppo-lm keeps both adapters on one base and makes the value adapter the active one around each
value pass (`RoleModels.value_mode`), and turns both adapters off around the reference pass
(`RoleModels.reference_model`); peft walks the whole module tree on each switch. This times one entry and exit of
each context (no forward pass inside), the best of `--repeats`, and counts the model's modules. A step of the bench's
defaults (one minibatch, 4 epochs) enters `value_mode` about 5 times and `reference_model` once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from timing import seconds_per_call

from ppo_lm.bench import BENCH_DEFAULTS, build_model_dirs
from ppo_lm.config import PPOConfig
from ppo_lm.models import load_role_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="qwen3-0.6b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    with tempfile.TemporaryDirectory() as directory:
        policy, reward = build_model_dirs(arguments.arch, Path(directory))
        config = PPOConfig(**{**BENCH_DEFAULTS, "model_name": policy, "reward_model_name": reward,
                              "device": arguments.device})
        models = load_role_models(config, device, torch.bfloat16)

    def value_switch() -> None:
        with models.value_mode():
            pass

    def reference_switch() -> None:
        with models.reference_model():
            pass

    line = {"arch": arguments.arch, "device": arguments.device, "modules": sum(1 for _ in models.policy.modules()),
            "value_mode_s": seconds_per_call(value_switch, arguments.repeats, warmup=2),
            "reference_model_s": seconds_per_call(reference_switch, arguments.repeats, warmup=2),
            "keep_adapters_trainable_s": seconds_per_call(models.keep_adapters_trainable, arguments.repeats,
                                                          warmup=2)}
    print(json.dumps(line), flush=True)
    if arguments.out:
        with arguments.out.open("a") as file:
            file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
