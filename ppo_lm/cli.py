"""The `ppo-lm` command: train, report, export; sft and reward for the stages before PPO; a demo.

    ppo-lm demo [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]       (PPO on a bundled model, offline, minutes)
    ppo-lm train --config FILE.yaml [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]
    ppo-lm sft --config FILE.yaml [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]
    ppo-lm reward --config FILE.yaml [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]
    ppo-lm report RUN_DIR
    ppo-lm export CHECKPOINT OUT_DIR [--overwrite]
    ppo-lm verify DIR                                                     (a checkpoint, or a run's checkpoints)

Config fields come from the YAML file, then from `--FIELD VALUE` overrides (parsed by tyro from the dataclass,
docstrings and all). Everything that can be checked is checked before a model loads.

This module is the top of the package: it only dispatches the command line. The run machinery the stage commands
share is in `ppo_lm.runs`; nothing in the package imports this module. A command imports its own module (demo,
bench, export, report) only when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Any

from accelerate import PartialState

from ppo_lm.config import PPOConfig
from ppo_lm.runs import STAGES, fields_help, map_large_allocations, run_stage


def train_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm train`: PPO on prompts (see `runs.run_stage`)."""
    return run_stage(argv, STAGES["train"])


def sft_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm sft`: supervised fine-tuning on prompt/completion rows; the model goes to `<output_dir>/final`."""
    return run_stage(argv, STAGES["sft"])


def reward_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm reward`: a pairwise reward model from preference rows; the model goes to `<output_dir>/final`."""
    return run_stage(argv, STAGES["reward"])


def report_command(argv: list[str]) -> None:
    """`ppo-lm report RUN_DIR`: the curves PNG and the samples file of a run."""
    parser = argparse.ArgumentParser(prog="ppo-lm report", description="Write report.png and samples.md of a run.")
    parser.add_argument("run_dir")
    arguments = parser.parse_args(argv)
    from ppo_lm.report import write_report

    for name, path in write_report(arguments.run_dir).items():
        print(f"{name}: {path}")


def export_command(argv: list[str]) -> None:
    """`ppo-lm export CHECKPOINT OUT_DIR`: a merged model that plain transformers loads."""
    parser = argparse.ArgumentParser(prog="ppo-lm export",
                                     description="Merge a checkpoint's policy into a plain transformers model.")
    parser.add_argument("checkpoint", help="A checkpoint-<step> folder, or a run directory (its newest checkpoint).")
    parser.add_argument("out_dir")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    arguments = parser.parse_args(argv)
    from ppo_lm.export import export_policy

    print(f"exported: {export_policy(arguments.checkpoint, arguments.out_dir, overwrite=arguments.overwrite)}")


def verify_command(argv: list[str]) -> int:
    """`ppo-lm verify DIR`: check that a checkpoint (or each checkpoint of a run directory) is complete and
    undamaged; exit status 1 when any is not."""
    parser = argparse.ArgumentParser(prog="ppo-lm verify",
                                     description="Check checkpoints against their manifests (sizes and SHA-256).")
    parser.add_argument("path", help="A checkpoint-<step> folder, or a run directory (every checkpoint in it).")
    arguments = parser.parse_args(argv)
    from ppo_lm.checkpoint import verify

    results = verify(arguments.path)
    for checkpoint, problem in results:
        print(f"{checkpoint}: {'good' if problem is None else 'BAD: ' + problem}")
    bad = sum(problem is not None for _, problem in results)
    good = [checkpoint for checkpoint, problem in results if problem is None]
    if bad:
        newest = f"; --resume would use {good[-1].name}" if good else "; none is usable"
        print(f"{bad} of {len(results)} checkpoint(s) damaged or incomplete{newest}.", file=sys.stderr)
    return 1 if bad else 0


def bench_command(argv: list[str]) -> None:
    """`ppo-lm bench`: time PPO steps on a random model of a named architecture (see ppo_lm/bench.py)."""
    from ppo_lm.bench import bench_command as run_bench

    run_bench(argv)


def demo_command(argv: list[str]) -> None:
    """`ppo-lm demo`: PPO on SmolLM2-135M-Instruct with bundled TL;DR prompts and reward (see ppo_lm/demo.py)."""
    from ppo_lm.demo import demo_command as run_demo

    run_demo(argv)


COMMANDS = {"demo": demo_command, "train": train_command, "report": report_command, "export": export_command,
            "verify": verify_command, "bench": bench_command, "sft": sft_command, "reward": reward_command}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ppo-lm` command."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip().split("\n\n")[0])
        print(__doc__.strip().split("\n\n")[1])
        print("\nConfig fields of `ppo-lm train` (YAML keys or --FIELD VALUE):")
        print(fields_help(PPOConfig))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)}.", file=sys.stderr)
            return 2
        return 0 if argv else 2
    map_large_allocations()  # the command owns its process: freed large tensors go back to the system
    try:
        status = COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        _end_launch_after(error, exit_code=2)
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Stopped at once (interrupted twice): the newest checkpoint in the output directory is the last one "
              "saved; continue with --resume.", file=sys.stderr)
        return 130
    except Exception as error:
        if (status := _planned_stop(error)) is not None:
            return status
        _end_launch_after(error, exit_code=1, traceback_text=traceback.format_exc())
        raise
    return status if isinstance(status, int) else 0


def _planned_stop(error: Exception) -> int | None:
    """The exit status of a run that stopped as designed, after saying why: a signal (`training.Preempted`, on
    every process together, once its checkpoint is saved) or a step whose loss was not finite (undone, on every
    process together); None for any other error."""
    from ppo_lm.backend import NonFiniteLossError  # raised only once a stage has imported them
    from ppo_lm.training import Preempted

    if isinstance(error, Preempted):
        if PartialState().is_main_process:
            print(error, file=sys.stderr)
        return error.exit_code
    if isinstance(error, NonFiniteLossError):
        _end_launch_after(error, exit_code=1)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return None


def _end_launch_after(error: Exception, exit_code: int, traceback_text: str | None = None) -> None:
    """In one process of a multi-process launch, end it now with `error` shown, so that the launcher stops the
    others instead of leaving them waiting in a collective (`distributed.end_failed_process`); else return."""
    if "torch" not in sys.modules:  # nothing started processes talking yet (and `ppo-lm --help` stays light)
        return
    from ppo_lm.distributed import end_failed_process

    end_failed_process(error, exit_code, traceback_text)
