"""The `ppo-lm` command: train, report, export; sft and reward for the stages before PPO; a demo.

    ppo-lm demo [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]       (PPO on a bundled model, offline, minutes)
    ppo-lm train --config FILE.yaml [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]
    ppo-lm sft --config FILE.yaml [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]
    ppo-lm reward --config FILE.yaml [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]
    ppo-lm report RUN_DIR
    ppo-lm export CHECKPOINT OUT_DIR [--overwrite]

Config fields come from the YAML file, then from `--FIELD VALUE` overrides (parsed by tyro from the dataclass,
docstrings and all). Everything that can be checked is checked before a model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import io
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tyro
import yaml

from ppo_lm.config import PPOConfig, RewardConfig, RunConfig, SFTConfig

logger = logging.getLogger("ppo_lm")

_TYRO_OPTIONS = dict(config=(tyro.conf.FlagConversionOff,), use_underscores=True)


class CommandLineError(ValueError):
    """The command line or config file asks for something that cannot be done."""


def read_config_file(path: str | Path, config_class: type[RunConfig] = PPOConfig) -> dict[str, Any]:
    """Field values from a YAML file; an unknown field is an error that suggests the closest one."""
    path = Path(path)
    if not path.is_file():
        raise CommandLineError(f"Config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise CommandLineError(f"Config file {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise CommandLineError(f"Config file {path} must be a mapping of field: value, not a {type(values).__name__}.")
    known = config_class.field_names()
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known fields: {', '.join(known)}."
            raise CommandLineError(f"Unknown field {name!r} in {path}.{hint}")
    return values


def parse_config(
    config_class: type[RunConfig], file_values: dict[str, Any], overrides: list[str], prog: str
) -> RunConfig:
    """The config: dataclass defaults, then the file's values, then `--FIELD VALUE` overrides."""
    try:
        base = config_class(**file_values)
    except TypeError as error:
        raise CommandLineError(str(error)) from error
    overrides = _capitalised_booleans(config_class, overrides)
    return tyro.cli(config_class, args=overrides, default=base, prog=prog, **_TYRO_OPTIONS)


def _capitalised_booleans(config_class: type[RunConfig], overrides: list[str]) -> list[str]:
    """`--FIELD true` or `--FIELD=false` for a yes/no field, spelled as in YAML, becomes the True/False tyro takes."""
    booleans = {f"--{field.name}" for field in dataclasses.fields(config_class) if field.type in (bool, "bool")}
    spelled = {"true": "True", "false": "False"}
    result = []
    for position, argument in enumerate(overrides):
        name, equals, value = argument.partition("=")
        if equals and name in booleans:
            argument = f"{name}={spelled.get(value.lower(), value)}"
        elif position > 0 and overrides[position - 1] in booleans:
            argument = spelled.get(argument.lower(), argument)
        result.append(argument)
    return result


def fields_help(config_class: type[RunConfig], prog: str = "ppo-lm train") -> str:
    """Every field of `config_class` with its docstring and default, as the help of `--FIELD VALUE`."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.suppress(SystemExit):
        tyro.cli(config_class, args=["--help"], prog=prog, **_TYRO_OPTIONS)
    return captured.getvalue().split("\n", 1)[1]


def _stage_arguments(prog: str, config_class: type[RunConfig]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--config", help=f"YAML file of {config_class.__name__} fields.")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                        help="Continue from the newest complete checkpoint of the run in output_dir (or DIR: a run "
                             "directory or one checkpoint-<step> folder).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Delete a non-empty output_dir and start again.")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


DataLoader = Callable[[Any, Any], tuple[list, list, dict[str, Any]]]
"""`load_data(config, tokenizer)`: train items, eval items, and extra data for `finish`; tokenizer None or the model's
(given only when `max_prompt_length` needs it)."""


def run_stage(
    argv: list[str],
    prog: str,
    config_class: type[RunConfig],
    load_data: DataLoader,
    make_trainer: Callable[[Any], Any],
    finish: Callable[[Any, Any, Path, dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One stage's command: check the config, run dir and data, then build the trainer and run the shared loop.

    Every stage (`train`, `sft`, `reward`) parses the same options and resumes the same way; it only brings its
    config class, its data, its trainer, and `finish(config, trainer, run_dir, extra)`, which runs after the loop
    (e.g. writes the final model) and adds to the result.
    """
    arguments, overrides = _stage_arguments(prog, config_class).parse_known_args(argv)
    if arguments.help:
        print(_stage_arguments(prog, config_class).format_help())
        print("Config fields (set them in the YAML file or as --FIELD VALUE):")
        print(fields_help(config_class, prog))
        raise SystemExit(0)

    resume_dir = None
    file_values: dict[str, Any] = {}
    if arguments.resume not in (None, True):
        resume_dir = Path(arguments.resume)
        run_dir = resume_dir.parent if (resume_dir / "checkpoint.json").exists() else resume_dir
        saved_config = run_dir / "config.yaml"
        if arguments.config is None and saved_config.is_file():
            file_values = read_config_file(saved_config, config_class)
        file_values["output_dir"] = str(run_dir)
    if arguments.config is not None:
        file_values = {**read_config_file(arguments.config, config_class), **file_values}
    if arguments.resume is None and arguments.config is None and not overrides:
        raise CommandLineError(f"{prog} needs --config FILE.yaml (or --FIELD VALUE options); see --help.")
    config = parse_config(config_class, file_values, overrides, prog=prog)
    if config.dataset is None:
        raise CommandLineError("No training data: set `dataset` (a hub dataset or a local .jsonl/.json/.csv/.parquet "
                               "file) in the config or with --dataset.")

    from ppo_lm.distributed import batch_layout, from_main_process, process_state
    from ppo_lm.training import RunDirectoryError, prepare_run_dir

    processes = process_state()
    layout = batch_layout(config.batch_size, processes.num_processes,
                          getattr(config, "num_mini_batches", 1),  # only PPO splits a batch into minibatches
                          config.micro_batch_size)
    if not processes.is_main_process:  # one copy of the log: the main process's
        logging.getLogger().setLevel(logging.ERROR)
        import transformers

        transformers.utils.logging.disable_progress_bar()
    logger.info("%s", layout.describe())

    resuming = arguments.resume is not None
    problem, run_dir = None, Path(config.output_dir)
    if processes.is_main_process:  # only the main process may create or delete the run directory
        try:
            run_dir = prepare_run_dir(config.output_dir, resume=resuming, overwrite=arguments.overwrite)
        except RunDirectoryError as error:
            problem = str(error)
    problem = from_main_process(problem)  # every process stops, not only the main one
    if problem is not None:
        raise RunDirectoryError(problem)
    if resuming:
        from ppo_lm.checkpoint import find_checkpoint

        resume_dir = find_checkpoint(resume_dir or run_dir)

    train_items, eval_items, extra = load_data(config, None)  # data errors before any model
    from ppo_lm.models import load_tokenizer
    from ppo_lm.training import run_training

    if config.max_prompt_length is not None:
        train_items, eval_items, extra = load_data(config, load_tokenizer(config.model_name))
    trainer = make_trainer(config)
    result = run_training(config, trainer, train_items, eval_items, run_dir, resume_from=resume_dir)
    if finish is not None:
        with trainer.whole_weights():  # every process gathers a sharded model's weights; the main one writes
            if processes.is_main_process:
                result.update(finish(config, trainer, run_dir, extra))
    if processes.is_main_process:
        _print_summary(result)
    processes.wait_for_everyone()
    return result


def _data_options(config: RunConfig, tokenizer: Any) -> dict[str, Any]:
    """The `load_*` arguments every stage takes from its config."""
    return dict(split=config.dataset_split, eval_split=config.eval_split,
                eval_fraction=0.0 if config.eval_split else config.eval_fraction, prompt_field=config.prompt_field,
                seed=config.seed, tokenizer=tokenizer,
                max_prompt_length=config.max_prompt_length if tokenizer is not None else None)


def _prompt_data(config: PPOConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    from ppo_lm.data import load_prompts

    return (*load_prompts(config.dataset, **_data_options(config, tokenizer)), {})


def _ppo_trainer(config: PPOConfig) -> Any:
    from ppo_lm.ppo_trainer import PPOTrainer

    return PPOTrainer(config)


def train_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm train`: PPO on prompts (see `run_stage`)."""
    return run_stage(argv, "ppo-lm train", PPOConfig, _prompt_data, _ppo_trainer)


def _sft_data(config: SFTConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    from ppo_lm.data import load_completion_rows

    return (*load_completion_rows(config.dataset, completion_field=config.completion_field,
                                  **_data_options(config, tokenizer)), {})


def _sft_trainer(config: SFTConfig) -> Any:
    from ppo_lm.sft_trainer import SFTTrainer

    return SFTTrainer(config)


def _write_final(config: Any, trainer: Any, run_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """After an SFT or reward run: (normalise the reward model, then) write `<run_dir>/final`, replacing one there."""
    from ppo_lm.finetune import FINAL_DIR

    result: dict[str, Any] = {}
    if extra.get("reference"):
        result["score_offset"] = trainer.normalize(extra["reference"])
    final = run_dir / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)
    result["final"] = trainer.save_final(final)
    return result


def sft_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm sft`: supervised fine-tuning on prompt/completion rows; the model goes to `<output_dir>/final`."""
    return run_stage(argv, "ppo-lm sft", SFTConfig, _sft_data, _sft_trainer, _write_final)


def _reward_data(config: RewardConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    from ppo_lm.data import load_completion_rows, load_preference_rows

    train, evaluation = load_preference_rows(config.dataset, **_data_options(config, tokenizer))
    reference = None
    if config.reference_dataset is not None:
        reference, _ = load_completion_rows(config.reference_dataset, split=config.reference_split,
                                            prompt_field=config.prompt_field, tokenizer=tokenizer,
                                            max_prompt_length=config.max_prompt_length if tokenizer else None)
    return train, evaluation, {"reference": reference}


def _reward_trainer(config: RewardConfig) -> Any:
    from ppo_lm.reward_trainer import RewardTrainer

    return RewardTrainer(config)


def reward_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm reward`: a pairwise reward model from preference rows; the model goes to `<output_dir>/final`."""
    return run_stage(argv, "ppo-lm reward", RewardConfig, _reward_data, _reward_trainer, _write_final)


def _print_summary(result: dict[str, Any]) -> None:
    evaluation = result.get("eval") or {}
    lines = [f"checkpoint: {result['checkpoint']}"]
    lines += [f"{name}: {value:.4g}" for name, value in evaluation.items()]
    lines += [f"{name}: {path}" for name, path in result.get("report", {}).items()]
    lines += [f"{name}: {result[name]}" for name in ("score_offset", "final") if name in result]
    print("\n".join(lines))


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


def bench_command(argv: list[str]) -> None:
    """`ppo-lm bench`: time PPO steps on a random model of a named architecture (see ppo_lm/bench.py)."""
    from ppo_lm.bench import bench_command as run_bench

    run_bench(argv)


def demo_command(argv: list[str]) -> None:
    """`ppo-lm demo`: PPO on SmolLM2-135M-Instruct with bundled TL;DR prompts and reward (see ppo_lm/demo.py)."""
    from ppo_lm.demo import demo_command as run_demo

    run_demo(argv)


COMMANDS = {"demo": demo_command, "train": train_command, "report": report_command, "export": export_command,
            "bench": bench_command, "sft": sft_command, "reward": reward_command}


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
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
