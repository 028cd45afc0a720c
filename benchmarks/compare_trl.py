"""ppo-lm against the reference trainer (TRL 1.12.0's experimental PPOTrainer): same models, prompts and settings.

    uv run python benchmarks/compare_trl.py --trl_python /tmp/trlenv/bin/python --arch small --rounds 2

It saves one random policy and reward model of the architecture, then, for full fine-tuning and then LoRA, runs
`ppo-lm bench` and `benchmarks/trl_reference.py` alternately (each in a fresh process, so peak memory is each
trainer's own), `--rounds` times each, and prints every result and the ratios ours / TRL of the median step time and
the peak memory as JSON lines. TRL is installed in its own virtual environment (`--trl_python`), never in ours.
"""

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl_python", required=True, help="Python of the virtual environment that has trl==1.12.0.")
    parser.add_argument("--ours_python", default=sys.executable)
    parser.add_argument("--arch", default="small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--prompt_lengths", default="tldr")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trl_micro_batch_size", type=int, default=4)
    parser.add_argument("--ours_micro_batch_size", type=int, default=None)
    parser.add_argument("--bf16", type=int, default=0)
    arguments = parser.parse_args()

    shared = ["--batch_size", str(arguments.batch_size), "--max_new_tokens", str(arguments.max_new_tokens),
              "--ppo_epochs", str(arguments.ppo_epochs), "--prompt_lengths", arguments.prompt_lengths,
              "--steps", str(arguments.steps), "--warmup", "1"]
    with tempfile.TemporaryDirectory() as directory:
        policy_dir, reward_dir = build_model_dirs(arguments.arch, Path(directory))
        for mode in arguments.modes.split(","):
            lora = mode == "lora"
            ours_command = [arguments.ours_python, "-m", "ppo_lm", "bench", *shared, "--model_name", policy_dir,
                            "--reward_model_name", reward_dir, "--use_lora", str(lora), "--top_k", "0",
                            "--top_p", "1.0", "--temperature", "1.0", "--num_mini_batches", "1",
                            "--dtype", "bfloat16" if arguments.bf16 else "float32"]
            if arguments.ours_micro_batch_size:
                ours_command += ["--micro_batch_size", str(arguments.ours_micro_batch_size)]
            trl_command = [arguments.trl_python, "benchmarks/trl_reference.py", *shared, "--policy", policy_dir,
                           "--reward", reward_dir, "--lora", str(int(lora)), "--bf16", str(arguments.bf16),
                           "--micro_batch_size", str(arguments.trl_micro_batch_size)]
            ours, theirs = [], []
            for round_index in range(arguments.rounds):  # alternate, so drift in the machine hits both alike
                ours.append(run(ours_command))
                print(json.dumps({"mode": mode, "round": round_index, "trainer": "ppo-lm", **ours[-1]}), flush=True)
                theirs.append(run(trl_command))
                print(json.dumps({"mode": mode, "round": round_index, **theirs[-1]}), flush=True)
            ours_time = statistics.median(r["median_step_s"] for r in ours)
            trl_time = statistics.median(r["median_step_s"] for r in theirs)
            ours_memory = statistics.median(r["peak_memory_gib"] for r in ours)
            trl_memory = statistics.median(r["peak_memory_gib"] for r in theirs)
            print(json.dumps({
                "summary": mode, "arch": arguments.arch, "ppo_lm_step_s": ours_time, "trl_step_s": trl_time,
                "time_ratio": round(ours_time / trl_time, 3), "ppo_lm_peak_gib": ours_memory,
                "trl_peak_gib": trl_memory, "memory_ratio": round(ours_memory / trl_memory, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
