"""ppo-lm against TRL on the same models, prompts and settings: PPO (`--trainer ppo`, the default) or GRPO.

    uv run python benchmarks/compare_trl.py --trl_python /tmp/trlenv/bin/python --rounds 2 \\
        --regimes small_vocab:tldr,small_vocab:32,small:tldr,small:32 \\
        --ours_settings 'mb1024=--micro_batch_tokens 1024' --trl_settings 'bf16=--bf16 1' \\
        --skip 'small:tldr/*/whole' --out benchmarks/results/regimes.jsonl
    uv run python benchmarks/compare_trl.py --trainer grpo --trl_python /work/trl-grpo-env/bin/python \\
        --arch small_vocab --modes lora --rounds 2

TRL runs in a virtual environment of its own (`--trl_python`), never in ours. Every run is a fresh process, so its
peak memory is that trainer's own; the model directories are saved by a child process too, so that this process
stays small (on Linux a child's peak RSS starts from its parent's, see `build_dirs`).

`--trainer ppo`: `ppo-lm bench` against `benchmarks/trl_reference.py` (TRL 1.12.0's experimental PPOTrainer), both
on `--batch_size` prompts, `--ppo_epochs` epochs, one minibatch, the same sampling (temperature 1, no top-k/top-p).
A *regime* is an architecture and a prompt-length spec, `ARCH:PROMPTS` (`--regimes`; PROMPTS is what
`ppo-lm bench --prompt_lengths` takes: `tldr` for 60..400 tokens, or a number for that length everywhere); without
`--regimes` the one regime is `--arch:--prompt_lengths`. Each architecture's random policy and reward model are
saved once (`ppo_lm.bench.build_model_dirs`). For each regime and each of `--modes` (full fine-tuning, LoRA r=16 on
every linear layer) the script runs every *setting* `--rounds` times, one after the other within a round, so that
drift in a shared machine hits all of them alike:

- ppo-lm `default`: no batching or precision option at all, i.e. what a user who sets none gets (`dtype: auto`,
  float32 on a CPU and bfloat16 on a GPU that has it; `mixed_precision: auto`, bfloat16 autocast on a CPU with
  bfloat16 instructions; micro-batches from `micro_batch_tokens: auto`). `--bf16 1`
  adds `--dtype bfloat16` to every ppo-lm setting.
- ppo-lm extra settings, `--ours_settings 'NAME=ARGS;NAME=ARGS'`: ARGS appended to the bench command of `default`
  (`--ours_micro_batch_size N`, kept for old commands, adds the setting `mbN` = `--micro_batch_size N`).
- TRL `whole`: the whole batch per device (no gradient accumulation, the rollout's forward passes on the whole
  batch); TRL `accum`: `--trl_micro_batch_size` rows per device (default 4) and gradient accumulation up to the
  batch (left out where that is the whole batch). `--bf16 1` gives every TRL setting `--bf16 1`.
- TRL extra settings, `--trl_settings 'NAME=ARGS;...'`: ARGS appended to `accum`'s command (a later
  `--micro_batch_size` wins), e.g. `bf16=--bf16 1` or `bf16whole=--bf16 1 --micro_batch_size 32`.
- In either, ARGS may start with environment variables of that run, `VAR=VALUE` words before the first argument
  (the run goes through `env`), e.g. `jemalloc=LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2` for ppo-lm or
  `jewhole=LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 --micro_batch_size 32` for TRL's whole batch.

`--skip REGIME/MODE/SETTING,...` leaves settings out; each part is a shell-style pattern, and a bare `SETTING`
means `*/*/SETTING` (e.g. `small:tldr/*/whole`: TRL's whole batch, known not to fit there). A run that fails (a
non-zero exit; a kill by signal 9, usually the kernel's out-of-memory killer, reads as out of memory) is recorded
as `{"failed": REASON}` and its setting is not run again in later rounds of that regime and mode.

Output, as JSON lines (also appended to `--out FILE`): every run (regime, mode, setting, trainer, round and the
script's result); then per regime and mode a summary: each setting's median step seconds and peak GiB over the
rounds, ppo-lm's best and TRL's best (the fastest setting that did not fail), and the ratios ppo-lm default / TRL
best and ppo-lm best / TRL best of time and memory. Last, a Markdown table of the summaries, one row per regime and
mode, for RESULTS.md. `--dry_run` prints each command (model directories `DIR/ARCH/policy`, `DIR/ARCH/reward`)
without building models or running anything.

`--trainer grpo`: one regime (`--arch`, `--prompt_lengths`), one command per trainer and mode, as before:
`--batch_size` completions a step, `--batch_size / --num_generations` prompts sampled `--num_generations` times
each, one pass over them, no KL term, one optimizer step. ppo-lm runs

    python -m ppo_lm bench --advantage_estimator grpo --num_generations 4 --kl_coef 0 --ppo_epochs 1 \\
        --batch_size 32 --max_new_tokens 16 --prompt_lengths tldr --steps 2 --warmup 1 --model_name POLICY \\
        --reward_model_name REWARD --use_lora True --top_k 0 --top_p 1.0 --temperature 1.0 --num_mini_batches 1 \\
        --dtype float32

against `benchmarks/trl_grpo_reference.py` (TRL's GRPOTrainer, transformers' generate, beta 0, num_iterations 1)
with the same batch, groups, tokens and prompts; each does the whole batch in one forward/backward pass unless
`--ours_micro_batch_size` / `--trl_micro_batch_size` say otherwise, and prints the ratios ours / TRL. `--dry_run`
prints both commands of each mode.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRL_PPO_MICRO_BATCH = 4
"""TRL PPO's per-device batch in the `accum` setting when `--trl_micro_batch_size` is not given (a whole TL;DR-length
batch of 32 does not fit in 24 GiB there, see RESULTS.md)."""

TRAINERS = ("ppo-lm", "trl")
BUILT_IN = ("default", "whole", "accum")
PLACEHOLDER = "DIR"
"""The model directories' parent in a dry run."""


@dataclass(frozen=True)
class Setting:
    """One way of running a trainer: `extra` arguments after its base command; TRL's per-device batch."""

    name: str
    trainer: str  # "ppo-lm" or "trl"
    extra: tuple[str, ...] = ()
    trl_micro_batch_size: int | None = None


@dataclass
class Outcome:
    """The runs of one regime and mode: each setting's results, and the failure that stopped a setting."""

    results: dict[str, list[dict]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


# --- parsing ------------------------------------------------------------------------------------------------------


def parse_regimes(text: str) -> list[tuple[str, str]]:
    """`ARCH:PROMPTS,...` as (arch, prompts) pairs, in order; PROMPTS is `tldr` or a positive integer."""
    regimes: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        arch, colon, prompts = item.partition(":")
        if not colon or not arch or not (prompts == "tldr" or (prompts.isdigit() and int(prompts) >= 1)):
            raise ValueError(f"regime {item!r}: expected ARCH:PROMPTS, PROMPTS 'tldr' or a positive integer "
                             "(e.g. small:tldr, small_vocab:32)")
        if (arch, prompts) in regimes:
            raise ValueError(f"regime {item!r} is given twice")
        regimes.append((arch, prompts))
    if not regimes:
        raise ValueError("no regime given")
    return regimes


def regime_name(regime: tuple[str, str]) -> str:
    return f"{regime[0]}:{regime[1]}"


def parse_settings(text: str | None) -> dict[str, list[str]]:
    """`NAME=ARGS;NAME=ARGS` as {name: argument list} (ARGS split as a shell would), in order."""
    settings: dict[str, list[str]] = {}
    for item in (text or "").split(";"):
        if not item.strip():
            continue
        name, equals, args = item.partition("=")
        name = name.strip()
        if not equals or not name or any(char in name for char in "/,:;*?[] "):
            raise ValueError(f"setting {item.strip()!r}: expected NAME=ARGS, NAME without / , : ; * ? [ ] or spaces")
        if name in settings or name in BUILT_IN:
            raise ValueError(f"setting name {name!r} is given twice or is a built-in one ({', '.join(BUILT_IN)})")
        settings[name] = shlex.split(args)
        if not settings[name]:
            raise ValueError(f"setting {name!r} has no arguments (that is `default`)")
    return settings


def parse_skip(text: str | None) -> list[tuple[str, str, str]]:
    """`REGIME/MODE/SETTING,...` (shell-style patterns; a bare SETTING is `*/*/SETTING`) as pattern triples."""
    patterns = []
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        parts = item.split("/")
        if len(parts) == 1:
            parts = ["*", "*", parts[0]]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"--skip {item!r}: expected REGIME/MODE/SETTING (e.g. small:tldr/full/whole) or SETTING")
        patterns.append((parts[0], parts[1], parts[2]))
    return patterns


def is_skipped(patterns: list[tuple[str, str, str]], regime: str, mode: str, setting: str) -> bool:
    return any(fnmatch.fnmatchcase(regime, r) and fnmatch.fnmatchcase(mode, m) and fnmatch.fnmatchcase(setting, s)
               for r, m, s in patterns)


def ppo_settings(arguments: argparse.Namespace) -> list[Setting]:
    """Every setting of `--trainer ppo`: ppo-lm's, then TRL's (see the module docstring)."""
    settings = [Setting("default", "ppo-lm")]
    if arguments.ours_micro_batch_size:
        size = arguments.ours_micro_batch_size
        settings.append(Setting(f"mb{size}", "ppo-lm", ("--micro_batch_size", str(size))))
    settings += [Setting(name, "ppo-lm", tuple(args)) for name, args in arguments.ours_settings.items()]
    micro = arguments.trl_micro_batch_size or TRL_PPO_MICRO_BATCH
    settings.append(Setting("whole", "trl", trl_micro_batch_size=arguments.batch_size))
    if micro != arguments.batch_size:
        settings.append(Setting("accum", "trl", trl_micro_batch_size=micro))
    settings += [Setting(name, "trl", tuple(args), micro) for name, args in arguments.trl_settings.items()]
    names = [setting.name for setting in settings]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"setting names used twice: {', '.join(duplicates)}")
    return settings


# --- commands -----------------------------------------------------------------------------------------------------


def ours_command(arguments: argparse.Namespace, lora: bool, policy_dir: str, reward_dir: str,
                 prompts: str | None = None, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The `ppo-lm bench` command line of one mode (and regime's prompts), `extra` appended."""
    command = [arguments.ours_python, "-m", "ppo_lm", "bench"]
    if arguments.trainer == "grpo":
        command += ["--advantage_estimator", "grpo", "--num_generations", str(arguments.num_generations),
                    "--kl_coef", "0", "--ppo_epochs", "1"]
    else:
        command += ["--ppo_epochs", str(arguments.ppo_epochs)]
    command += ["--batch_size", str(arguments.batch_size), "--max_new_tokens", str(arguments.max_new_tokens),
                "--prompt_lengths", prompts or arguments.prompt_lengths, "--steps", str(arguments.steps),
                "--warmup", "1", "--model_name", policy_dir, "--reward_model_name", reward_dir, "--use_lora",
                str(lora), "--top_k", "0", "--top_p", "1.0", "--temperature", "1.0", "--num_mini_batches", "1"]
    if arguments.trainer == "grpo":  # its old command: float32 unless --bf16 1, micro-batches as asked
        command += ["--dtype", "bfloat16" if arguments.bf16 else "float32"]
        if arguments.ours_micro_batch_size:
            command += ["--micro_batch_size", str(arguments.ours_micro_batch_size)]
    elif arguments.bf16:  # else ppo-lm's own default (`dtype: auto`)
        command += ["--dtype", "bfloat16"]
    return command + list(extra)


def trl_command(arguments: argparse.Namespace, lora: bool, policy_dir: str, reward_dir: str,
                prompts: str | None = None, micro_batch_size: int | None = None,
                extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The TRL script's command line of one mode (trl_reference.py for PPO, trl_grpo_reference.py for GRPO)."""
    shared = ["--batch_size", str(arguments.batch_size), "--max_new_tokens", str(arguments.max_new_tokens),
              "--prompt_lengths", prompts or arguments.prompt_lengths, "--steps", str(arguments.steps), "--warmup",
              "1", "--policy", policy_dir, "--reward", reward_dir, "--lora", str(int(lora)), "--bf16",
              str(arguments.bf16)]
    if arguments.trainer == "grpo":
        command = [arguments.trl_python, "benchmarks/trl_grpo_reference.py", "--num_generations",
                   str(arguments.num_generations), *shared]
        if arguments.trl_micro_batch_size:  # else the script's default: the whole batch in one pass
            command += ["--micro_batch_size", str(arguments.trl_micro_batch_size)]
        return command + list(extra)
    micro = micro_batch_size or arguments.trl_micro_batch_size or TRL_PPO_MICRO_BATCH
    return [arguments.trl_python, "benchmarks/trl_reference.py", "--ppo_epochs", str(arguments.ppo_epochs), *shared,
            "--micro_batch_size", str(micro), *extra]


def split_environment(extra: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """A setting's leading `NAME=VALUE` words (NAME in capitals, digits and underscores, as a shell's variables), and
    the arguments after them."""
    count = 0
    while count < len(extra) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", extra[count]):
        count += 1
    return list(extra[:count]), list(extra[count:])


def setting_command(arguments: argparse.Namespace, setting: Setting, regime: tuple[str, str], lora: bool,
                    dirs: tuple[str, str]) -> list[str]:
    """The setting's command line; its environment words, if any, go first through `env`."""
    policy_dir, reward_dir = dirs
    environment, extra = split_environment(setting.extra)
    if setting.trainer == "ppo-lm":
        command = ours_command(arguments, lora, policy_dir, reward_dir, regime[1], extra)
    else:
        command = trl_command(arguments, lora, policy_dir, reward_dir, regime[1], setting.trl_micro_batch_size, extra)
    return ["env", *environment, *command] if environment else command


# --- running ------------------------------------------------------------------------------------------------------


def last_json_line(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in the output:\n{output[-3000:]}")


def run_process(command: list[str]) -> subprocess.CompletedProcess:
    """Run one benchmark process from the repository root (the tests replace this)."""
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def failure_reason(returncode: int, stderr: str) -> str:
    """One line on why a run ended with `returncode`: a kill by signal 9 (negative: Python's; 137: a shell's) is
    taken as the out-of-memory killer's."""
    if returncode in (-9, 137):
        return "out of memory (killed, signal 9)"
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    last = lines[-1][:300] if lines else ""
    if "out of memory" in (stderr or "").lower() or "OutOfMemoryError" in (stderr or ""):
        return f"out of memory ({last})" if last else "out of memory"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}: {last}" if last else f"exit status {returncode}"


def run(command: list[str]) -> dict:
    """The run's JSON result, or `{"failed": REASON}`."""
    result = run_process(command)
    if result.returncode != 0:
        return {"failed": failure_reason(result.returncode, result.stderr)}
    try:
        return last_json_line(result.stdout)
    except (RuntimeError, json.JSONDecodeError):
        return {"failed": "no JSON result in the output"}


def run_strict(command: list[str]) -> dict:
    """The run's JSON result; a failure stops the script (the GRPO comparison's behaviour)."""
    result = run_process(command)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return last_json_line(result.stdout)


def build_dirs(python: str, arch: str, directory: Path) -> tuple[str, str]:
    """Save `arch`'s random policy and reward model under `directory` (`ppo_lm.bench.build_model_dirs`) in a child
    process. Done here, it would raise this process's peak RSS to a GiB or more (torch, transformers and the models),
    and on Linux a child started from here begins with that peak as its own `ru_maxrss`, which is what the CPU runs
    report as peak memory."""
    code = ("import json, sys; from pathlib import Path; from ppo_lm.bench import build_model_dirs; "
            "print(json.dumps(build_model_dirs(sys.argv[1], Path(sys.argv[2]))))")
    result = subprocess.run([python, "-c", code, arch, str(directory)], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"building the {arch} models failed:\n{result.stderr[-3000:]}")
    policy_dir, reward_dir = json.loads(result.stdout.strip().splitlines()[-1])
    return policy_dir, reward_dir


def run_settings(arguments: argparse.Namespace, regime: tuple[str, str], mode: str, settings: list[Setting],
                 dirs: tuple[str, str], emit: Callable[[dict], None]) -> Outcome:
    """`--rounds` rounds of every setting, in turn; a setting that failed is not run again."""
    outcome = Outcome({setting.name: [] for setting in settings})
    for round_index in range(arguments.rounds):
        for setting in settings:
            if setting.name in outcome.failed:
                continue
            result = run(setting_command(arguments, setting, regime, mode == "lora", dirs))
            record = {"regime": regime_name(regime), "arch": regime[0], "prompt_lengths": regime[1], "mode": mode,
                      "setting": setting.name, "trainer": setting.trainer, "round": round_index}
            for key, value in result.items():  # the script's own `trainer` / `arch` are kept as `reported_...`
                record.setdefault(key if key not in record else f"reported_{key}", value)
            emit(record)
            if "failed" in result:
                outcome.failed[setting.name] = result["failed"]
            else:
                outcome.results[setting.name].append(result)
    return outcome


# --- summary ------------------------------------------------------------------------------------------------------


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def summarise(regime: tuple[str, str], mode: str, settings: list[Setting], outcome: Outcome,
              skipped: list[Setting] = ()) -> dict:
    """Each setting's medians (or why it has none), the fastest setting of each trainer, and the ratios."""
    table: dict[str, dict] = {}
    for setting in settings:
        entry: dict = {"trainer": setting.trainer}
        runs = outcome.results.get(setting.name, [])
        if setting.name in outcome.failed:
            entry["failed"] = outcome.failed[setting.name]
        if runs:
            entry.update(step_s=round(statistics.median(r["median_step_s"] for r in runs), 4),
                         peak_gib=round(statistics.median(r["peak_memory_gib"] for r in runs), 3), runs=len(runs))
        table[setting.name] = entry
    for setting in skipped:
        table[setting.name] = {"trainer": setting.trainer, "skipped": True}

    def best(trainer: str) -> str | None:
        """The fastest setting of `trainer` that ran and never failed."""
        candidates = [(entry["step_s"], name) for name, entry in table.items()
                      if entry["trainer"] == trainer and "step_s" in entry and "failed" not in entry]
        return min(candidates)[1] if candidates else None

    ours_best, trl_best = best("ppo-lm"), best("trl")

    def figure(name: str | None, key: str) -> float | None:
        entry = table.get(name or "", {})
        return None if "failed" in entry else entry.get(key)

    return {
        "summary": f"{regime_name(regime)}/{mode}", "algorithm": "ppo", "regime": regime_name(regime),
        "arch": regime[0], "prompt_lengths": regime[1], "mode": mode, "settings": table,
        "ppo_lm_best": ours_best, "trl_best": trl_best,
        "time_ratio_default": ratio(figure("default", "step_s"), figure(trl_best, "step_s")),
        "memory_ratio_default": ratio(figure("default", "peak_gib"), figure(trl_best, "peak_gib")),
        "time_ratio_best": ratio(figure(ours_best, "step_s"), figure(trl_best, "step_s")),
        "memory_ratio_best": ratio(figure(ours_best, "peak_gib"), figure(trl_best, "peak_gib")),
    }


def cell(summary: dict, name: str | None, named: bool = False) -> str:
    """A setting's step time and peak memory as a table cell (or why there are none)."""
    entry = summary["settings"].get(name or "")
    if entry is None:
        return "—"
    if entry.get("skipped"):
        return "skipped"
    if "failed" in entry:
        return f"failed: {entry['failed']}"
    text = f"{entry['step_s']:.2f} s, {entry['peak_gib']:.2f} GiB"
    return f"`{name}` {text}" if named else text


def markdown_table(summaries: list[dict]) -> str:
    """One row per regime and mode: ppo-lm's default and best, TRL's whole, accum and best, and the ratios."""
    lines = ["| regime | mode | ppo-lm default | ppo-lm best | TRL whole batch | TRL accumulation | TRL best | "
             "time default / TRL best | memory default / TRL best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for summary in summaries:
        ratios = [f"**{value:.2f}**" if value is not None else "—"
                  for value in (summary["time_ratio_default"], summary["memory_ratio_default"])]
        lines.append(f"| {summary['regime']} | {summary['mode']} | {cell(summary, 'default')} | "
                     f"{cell(summary, summary['ppo_lm_best'], named=True)} | {cell(summary, 'whole')} | "
                     f"{cell(summary, 'accum')} | {cell(summary, summary['trl_best'], named=True)} | "
                     f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=["ppo", "grpo"], default="ppo",
                        help="ppo: against TRL's experimental PPOTrainer (trl_reference.py, TRL 1.12.0); grpo: "
                             "against TRL's GRPOTrainer (trl_grpo_reference.py, TRL 1.16.0).")
    parser.add_argument("--trl_python", required=True,
                        help="Python of the virtual environment that has TRL (1.12.0 for ppo, 1.16.0 for grpo).")
    parser.add_argument("--ours_python", default=sys.executable)
    parser.add_argument("--arch", default="small", help="The architecture when --regimes is not given.")
    parser.add_argument("--prompt_lengths", default="tldr", help="The prompt lengths when --regimes is not given.")
    parser.add_argument("--regimes", default=None,
                        help="ppo: ARCH:PROMPTS,... e.g. small_vocab:tldr,small:32 (default: --arch:--prompt_lengths).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="ppo: prompts (= responses) per step; grpo: completions per step.")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--ppo_epochs", type=int, default=None, help="ppo only (default 4); grpo makes one pass.")
    parser.add_argument("--num_generations", type=int, default=4, help="grpo only: completions per prompt.")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trl_micro_batch_size", type=int, default=None,
                        help=f"ppo: TRL's per-device batch in the `accum` setting (default {TRL_PPO_MICRO_BATCH}); "
                             "grpo: TRL's per-device batch (default: the whole batch).")
    parser.add_argument("--ours_micro_batch_size", type=int, default=None,
                        help="ppo: adds the ppo-lm setting mbN = --micro_batch_size N; grpo: ppo-lm's micro-batch.")
    parser.add_argument("--ours_settings", default=None,
                        help="ppo: more ppo-lm settings, 'NAME=ARGS;NAME=ARGS' (ARGS appended to the bench command).")
    parser.add_argument("--trl_settings", default=None,
                        help="ppo: more TRL settings, 'NAME=ARGS;...' (ARGS appended to the `accum` command).")
    parser.add_argument("--skip", default=None,
                        help="ppo: settings to leave out, REGIME/MODE/SETTING,... (shell patterns) or SETTING,...")
    parser.add_argument("--bf16", type=int, default=0,
                        help="1: bfloat16 weights for ppo-lm (--dtype bfloat16) and TRL (--bf16 1) in every setting.")
    parser.add_argument("--out", default=None, help="Also append every JSON line to this file.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print each command (with placeholder model directories) and stop.")
    arguments = parser.parse_args(argv)
    if arguments.trainer == "grpo":
        if arguments.ppo_epochs not in (None, 1):
            parser.error("--trainer grpo makes one pass over each batch: leave --ppo_epochs out")
        if arguments.batch_size % arguments.num_generations:
            parser.error(f"--batch_size {arguments.batch_size} is not a whole number of groups of "
                         f"--num_generations {arguments.num_generations}")
        given = [name for name in ("regimes", "ours_settings", "trl_settings", "skip") if getattr(arguments, name)]
        if given:
            parser.error(f"--{', --'.join(given)}: --trainer ppo only (grpo compares one regime, one command each)")
    else:
        micro = arguments.trl_micro_batch_size or TRL_PPO_MICRO_BATCH
        if arguments.batch_size % micro:
            parser.error(f"--trl_micro_batch_size {micro} does not divide --batch_size {arguments.batch_size}")
    arguments.ppo_epochs = arguments.ppo_epochs or 4
    try:
        arguments.regime_list = parse_regimes(arguments.regimes or f"{arguments.arch}:{arguments.prompt_lengths}")
        arguments.ours_settings = parse_settings(arguments.ours_settings)
        arguments.trl_settings = parse_settings(arguments.trl_settings)
        arguments.skip_patterns = parse_skip(arguments.skip)
        if arguments.trainer == "ppo":
            names = [setting.name for setting in ppo_settings(arguments)]
            unknown = [s for _, _, s in arguments.skip_patterns if not any(fnmatch.fnmatchcase(n, s) for n in names)]
            if unknown:
                raise ValueError(f"--skip names no setting: {', '.join(unknown)} (settings: {', '.join(names)})")
    except ValueError as error:
        parser.error(str(error))
    arguments.mode_list = [mode.strip() for mode in arguments.modes.split(",") if mode.strip()]
    if not arguments.mode_list or any(mode not in ("full", "lora") for mode in arguments.mode_list):
        parser.error(f"--modes {arguments.modes!r}: a comma list of full and lora")
    return arguments


def emitter(out: str | None) -> Callable[[dict], None]:
    """Print a JSON line (and append it to `out`)."""
    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            with open(out, "a") as handle:
                handle.write(line + "\n")
    return emit


def main_grpo(arguments: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    """The GRPO comparison: one regime, ppo-lm's and TRL's command alternately for each mode."""
    if arguments.dry_run:
        for mode in arguments.mode_list:
            lora = mode == "lora"
            print(json.dumps({"mode": mode, "ppo-lm": ours_command(arguments, lora, "POLICY", "REWARD"),
                              "trl": trl_command(arguments, lora, "POLICY", "REWARD")}))
        return
    with tempfile.TemporaryDirectory() as directory:
        policy_dir, reward_dir = build_dirs(arguments.ours_python, arguments.arch, Path(directory))
        for mode in arguments.mode_list:
            lora = mode == "lora"
            ours_cmd = ours_command(arguments, lora, policy_dir, reward_dir)
            trl_cmd = trl_command(arguments, lora, policy_dir, reward_dir)
            ours, theirs = [], []
            for round_index in range(arguments.rounds):  # alternate, so drift in the machine hits both alike
                ours.append(run_strict(ours_cmd))
                emit({"mode": mode, "round": round_index, "trainer": "ppo-lm", **ours[-1]})
                theirs.append(run_strict(trl_cmd))
                emit({"mode": mode, "round": round_index, **theirs[-1]})
            ours_time = statistics.median(r["median_step_s"] for r in ours)
            trl_time = statistics.median(r["median_step_s"] for r in theirs)
            ours_memory = statistics.median(r["peak_memory_gib"] for r in ours)
            trl_memory = statistics.median(r["peak_memory_gib"] for r in theirs)
            emit({
                "summary": mode, "algorithm": arguments.trainer, "arch": arguments.arch, "ppo_lm_step_s": ours_time,
                "trl_step_s": trl_time, "time_ratio": round(ours_time / trl_time, 3), "ppo_lm_peak_gib": ours_memory,
                "trl_peak_gib": trl_memory, "memory_ratio": round(ours_memory / trl_memory, 3),
            })


def main(argv: list[str] | None = None) -> list[dict] | None:
    arguments = parse_arguments(argv)
    emit = emitter(None if arguments.dry_run else arguments.out)
    if arguments.trainer == "grpo":
        main_grpo(arguments, emit)
        return None
    settings = ppo_settings(arguments)
    summaries = []
    with tempfile.TemporaryDirectory() as directory:
        built: dict[str, tuple[str, str]] = {}
        for regime in arguments.regime_list:
            arch = regime[0]
            if arch not in built:  # each architecture's models are saved once, for all its regimes
                if arguments.dry_run:
                    built[arch] = (f"{PLACEHOLDER}/{arch}/policy", f"{PLACEHOLDER}/{arch}/reward")
                else:
                    built[arch] = build_dirs(arguments.ours_python, arch, Path(directory) / arch)
            for mode in arguments.mode_list:
                chosen = [s for s in settings
                          if not is_skipped(arguments.skip_patterns, regime_name(regime), mode, s.name)]
                left_out = [s for s in settings if s not in chosen]
                if arguments.dry_run:
                    for setting in settings:
                        line = {"regime": regime_name(regime), "mode": mode, "setting": setting.name,
                                "trainer": setting.trainer}
                        if setting in chosen:
                            line["command"] = setting_command(arguments, setting, regime, mode == "lora", built[arch])
                        else:
                            line["skipped"] = True
                        print(json.dumps(line))
                    continue
                outcome = run_settings(arguments, regime, mode, chosen, built[arch], emit)
                summaries.append(summarise(regime, mode, chosen, outcome, left_out))
                emit(summaries[-1])
    if not arguments.dry_run:
        print(markdown_table(summaries), flush=True)
    return summaries


if __name__ == "__main__":
    main()
