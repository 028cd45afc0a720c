"""ppo-lm against TRL on the same models, prompts and settings: PPO (`--trainer ppo`, the default) or GRPO.

    uv run python benchmarks/compare_trl.py --trl_python /tmp/trlenv/bin/python --arch small --rounds 2
    uv run python benchmarks/compare_trl.py --trainer grpo --trl_python /work/trl-grpo-env/bin/python \\
        --arch small_vocab --modes lora --rounds 2

It saves one random policy and reward model of the architecture (`ppo_lm.bench.build_model_dirs`), then, for each of
`--modes` (full fine-tuning, LoRA r=16 on every linear layer), runs ppo-lm's bench and the TRL script alternately
(each in a fresh process, so peak memory is each trainer's own), `--rounds` times each, and prints every result and
the ratios ours / TRL of the median step time and the peak memory as JSON lines. TRL is installed in its own virtual
environment (`--trl_python`), never in ours.

`--trainer ppo`: `ppo-lm bench` against `benchmarks/trl_reference.py` (TRL 1.12.0's experimental PPOTrainer), both on
`--batch_size` prompts, `--ppo_epochs` epochs, one minibatch.

`--trainer grpo`: `--batch_size` completions a step, `--batch_size / --num_generations` prompts sampled
`--num_generations` times each, one pass over them, no KL term, one optimizer step. ppo-lm runs

    python -m ppo_lm bench --advantage_estimator grpo --num_generations 4 --kl_coef 0 --ppo_epochs 1 \\
        --batch_size 32 --max_new_tokens 16 --prompt_lengths tldr --steps 2 --warmup 1 --model_name POLICY \\
        --reward_model_name REWARD --use_lora True --top_k 0 --top_p 1.0 --temperature 1.0 --num_mini_batches 1 \\
        --dtype float32

against `benchmarks/trl_grpo_reference.py` (TRL's GRPOTrainer, transformers' generate, beta 0, num_iterations 1)
with the same batch, groups, tokens and prompts; each does the whole batch in one forward/backward pass unless
`--ours_micro_batch_size` / `--trl_micro_batch_size` say otherwise. `--dry_run` prints both commands of each mode
without building models or running anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ppo_lm.bench import build_model_dirs  # noqa: E402

TRL_PPO_MICRO_BATCH = 4
"""TRL PPO's per-device batch when `--trl_micro_batch_size` is not given (a whole TL;DR-length batch of 32 does not
fit in 24 GiB there, see RESULTS.md)."""


def last_json_line(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in the output:\n{output[-3000:]}")


def run(command: list[str]) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return last_json_line(result.stdout)


def ours_command(arguments: argparse.Namespace, lora: bool, policy_dir: str, reward_dir: str) -> list[str]:
    """The `ppo-lm bench` command line of one mode."""
    command = [arguments.ours_python, "-m", "ppo_lm", "bench"]
    if arguments.trainer == "grpo":
        command += ["--advantage_estimator", "grpo", "--num_generations", str(arguments.num_generations),
                    "--kl_coef", "0", "--ppo_epochs", "1"]
    else:
        command += ["--ppo_epochs", str(arguments.ppo_epochs)]
    command += ["--batch_size", str(arguments.batch_size), "--max_new_tokens", str(arguments.max_new_tokens),
                "--prompt_lengths", arguments.prompt_lengths, "--steps", str(arguments.steps), "--warmup", "1",
                "--model_name", policy_dir, "--reward_model_name", reward_dir, "--use_lora", str(lora),
                "--top_k", "0", "--top_p", "1.0", "--temperature", "1.0", "--num_mini_batches", "1",
                "--dtype", "bfloat16" if arguments.bf16 else "float32"]
    if arguments.ours_micro_batch_size:
        command += ["--micro_batch_size", str(arguments.ours_micro_batch_size)]
    return command


def trl_command(arguments: argparse.Namespace, lora: bool, policy_dir: str, reward_dir: str) -> list[str]:
    """The TRL script's command line of one mode (trl_reference.py for PPO, trl_grpo_reference.py for GRPO)."""
    shared = ["--batch_size", str(arguments.batch_size), "--max_new_tokens", str(arguments.max_new_tokens),
              "--prompt_lengths", arguments.prompt_lengths, "--steps", str(arguments.steps), "--warmup", "1",
              "--policy", policy_dir, "--reward", reward_dir, "--lora", str(int(lora)), "--bf16", str(arguments.bf16)]
    if arguments.trainer == "grpo":
        command = [arguments.trl_python, "benchmarks/trl_grpo_reference.py", "--num_generations",
                   str(arguments.num_generations), *shared]
        if arguments.trl_micro_batch_size:  # else the script's default: the whole batch in one pass
            command += ["--micro_batch_size", str(arguments.trl_micro_batch_size)]
        return command
    return [arguments.trl_python, "benchmarks/trl_reference.py", "--ppo_epochs", str(arguments.ppo_epochs), *shared,
            "--micro_batch_size", str(arguments.trl_micro_batch_size or TRL_PPO_MICRO_BATCH)]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=["ppo", "grpo"], default="ppo",
                        help="ppo: against TRL's experimental PPOTrainer (trl_reference.py, TRL 1.12.0); grpo: "
                             "against TRL's GRPOTrainer (trl_grpo_reference.py, TRL 1.16.0).")
    parser.add_argument("--trl_python", required=True,
                        help="Python of the virtual environment that has TRL (1.12.0 for ppo, 1.16.0 for grpo).")
    parser.add_argument("--ours_python", default=sys.executable)
    parser.add_argument("--arch", default="small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="ppo: prompts (= responses) per step; grpo: completions per step.")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--ppo_epochs", type=int, default=None, help="ppo only (default 4); grpo makes one pass.")
    parser.add_argument("--num_generations", type=int, default=4, help="grpo only: completions per prompt.")
    parser.add_argument("--prompt_lengths", default="tldr")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trl_micro_batch_size", type=int, default=None,
                        help=f"TRL's per-device batch. Default: {TRL_PPO_MICRO_BATCH} for ppo, the whole batch for "
                             "grpo.")
    parser.add_argument("--ours_micro_batch_size", type=int, default=None)
    parser.add_argument("--bf16", type=int, default=0)
    parser.add_argument("--dry_run", action="store_true",
                        help="Print each mode's two commands (with placeholder model directories) and stop.")
    arguments = parser.parse_args(argv)
    if arguments.trainer == "grpo":
        if arguments.ppo_epochs not in (None, 1):
            parser.error("--trainer grpo makes one pass over each batch: leave --ppo_epochs out")
        if arguments.batch_size % arguments.num_generations:
            parser.error(f"--batch_size {arguments.batch_size} is not a whole number of groups of "
                         f"--num_generations {arguments.num_generations}")
    arguments.ppo_epochs = arguments.ppo_epochs or 4
    return arguments


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    modes = arguments.modes.split(",")
    if arguments.dry_run:
        for mode in modes:
            lora = mode == "lora"
            print(json.dumps({"mode": mode, "ppo-lm": ours_command(arguments, lora, "POLICY", "REWARD"),
                              "trl": trl_command(arguments, lora, "POLICY", "REWARD")}))
        return
    with tempfile.TemporaryDirectory() as directory:
        policy_dir, reward_dir = build_model_dirs(arguments.arch, Path(directory))
        for mode in modes:
            lora = mode == "lora"
            ours_cmd = ours_command(arguments, lora, policy_dir, reward_dir)
            trl_cmd = trl_command(arguments, lora, policy_dir, reward_dir)
            ours, theirs = [], []
            for round_index in range(arguments.rounds):  # alternate, so drift in the machine hits both alike
                ours.append(run(ours_cmd))
                print(json.dumps({"mode": mode, "round": round_index, "trainer": "ppo-lm", **ours[-1]}), flush=True)
                theirs.append(run(trl_cmd))
                print(json.dumps({"mode": mode, "round": round_index, **theirs[-1]}), flush=True)
            ours_time = statistics.median(r["median_step_s"] for r in ours)
            trl_time = statistics.median(r["median_step_s"] for r in theirs)
            ours_memory = statistics.median(r["peak_memory_gib"] for r in ours)
            trl_memory = statistics.median(r["peak_memory_gib"] for r in theirs)
            print(json.dumps({
                "summary": mode, "algorithm": arguments.trainer, "arch": arguments.arch, "ppo_lm_step_s": ours_time,
                "trl_step_s": trl_time, "time_ratio": round(ours_time / trl_time, 3), "ppo_lm_peak_gib": ours_memory,
                "trl_peak_gib": trl_memory, "memory_ratio": round(ours_memory / trl_memory, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
