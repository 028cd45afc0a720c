"""The run machinery every stage command shares: config files and `--FIELD VALUE` overrides, the stage options,
the run directory, data before any model, the trainer, the shared loop and the final model.

A stage (`ppo-lm train`, `sft`, `reward`, and the demo) is a `Stage`: its command name, its config class, its data
loader, its trainer, and optionally `prepare` (runs before the data loads) and `finish` (runs after the loop).
`run_stage(argv, stage)` runs any of them; `STAGES` holds the three of the `ppo-lm` command.

Config fields come from the YAML file, then from `--FIELD VALUE` overrides (parsed by tyro from the dataclass,
docstrings and all). Everything that can be checked is checked before a model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import difflib
import io
import logging
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tyro
import yaml

from ppo_lm.config import PPOConfig, RewardConfig, RunConfig, SFTConfig

if TYPE_CHECKING:  # the data module is imported by the stages that read rows, not with the command
    from ppo_lm.data import RowCheck

logger = logging.getLogger("ppo_lm")

_TYRO_OPTIONS = dict(config=(tyro.conf.FlagConversionOff,), use_underscores=True)


class CommandLineError(ValueError):
    """The command line or config file asks for something that cannot be done."""


# ----------------------------------------------------------------------------------------------------------------------
# The config: a YAML file, then --FIELD VALUE overrides


# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
KEEP_MALLOC_VARIABLE = "PPO_LM_KEEP_MALLOC"  # set to 1 to leave glibc's own rule (a little faster, see below)
LARGE_ALLOCATION_BYTES = 16 * 2**20


def map_large_allocations(min_bytes: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Make glibc's malloc give every allocation of `min_bytes` or more its own memory map, returned to the system
    when freed; True when it did.

    By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), after which blocks
    of that size come from the heap and stay there once freed. A CPU run frees tens of tensors of 16 to 32 MiB a
    step (a sampling step's logits over a 151,936-token vocabulary for 32 rows are 19 MiB), and the heap they leave
    behind raised `small` LoRA's peak resident memory by up to 0.25 GiB, process by process. The price is a fresh
    map, faulted in page by page, for each such tensor: on `small` 32-token LoRA 1 to 7 % more step time (median 4 %
    over seven alternated pairs), nearly all in sampling (benchmarks/RESULTS.md, session 41). The heap's trim
    threshold goes back to glibc's 128 KiB start value with it. Nothing is done on a C library other than glibc,
    with `PPO_LM_KEEP_MALLOC=1`, or when the environment already sets malloc's thresholds (`MALLOC_MMAP_THRESHOLD_`,
    `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES`): the user's own choice stands. It changes the whole process, so
    the `ppo-lm` command calls it; a program that imports ppo-lm decides for itself.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    kept = os.environ.get(KEEP_MALLOC_VARIABLE, "0") not in ("", "0")
    if kept or any(name in os.environ for name in _MALLOC_VARIABLES):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, min_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 128 * 2**10))


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


# ----------------------------------------------------------------------------------------------------------------------
# A stage and its run


DataLoader = Callable[[Any, Any], tuple[list, list, dict[str, Any]]]
"""`load_data(config, tokenizer)`: train items, eval items, and extra data for `finish`; tokenizer None or the model's
(given only when `max_prompt_length` needs it)."""
Finisher = Callable[[Any, Any, Path, dict[str, Any]], dict[str, Any]]
"""`finish(config, trainer, run_dir, extra)`: runs after the loop (e.g. writes the final model); adds to the result."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage command: what `run_stage` needs besides the options and the loop every stage shares."""

    prog: str
    """The command's name, in its help and errors: 'ppo-lm train'."""
    config_class: type[RunConfig]
    """The dataclass of its config fields."""
    load_data: DataLoader
    """Its train and eval items (see `DataLoader`); called before any model loads."""
    make_trainer: Callable[[Any], Any]
    """`make_trainer(config)`: its trainer."""
    finish: Finisher | None = None
    """After the loop, with the whole weights gathered, on the main process (see `Finisher`)."""
    prepare: Callable[[Any], None] | None = None
    """`prepare(config)`, on every process once the config and run directory are checked and before the data loads:
    may change the config in place (the demo builds its model cache and points `model_name` at it)."""
    trainer_stage: str = "train"
    """Which trainer runs, as the launch backends know it ('train' for PPO, 'sft', 'reward'): a launch that cannot run
    it is refused before any model loads."""


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


def run_stage(argv: list[str], stage: Stage) -> dict[str, Any]:
    """One stage's command: check the config, run dir and data, then build the trainer and run the shared loop.

    Every stage parses the same options and resumes the same way; it only brings what its `Stage` holds.
    """
    prog, config_class = stage.prog, stage.config_class
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

    from ppo_lm.backend import select_backend
    from ppo_lm.distributed import batch_layout, from_main_process, process_state
    from ppo_lm.training import RunDirectoryError, prepare_run_dir

    select_backend(stage.trainer_stage)  # a launch ppo-lm cannot follow stops here, before any model loads
    processes = process_state()
    layout = batch_layout(config.batch_size, processes.num_processes,
                          getattr(config, "num_mini_batches", 1),  # only PPO splits a batch into minibatches
                          config.micro_batch_size, getattr(config, "num_generations", 1),
                          getattr(config, "micro_batch_tokens", None))  # only PPO packs passes by a token budget
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

    if stage.prepare is not None:
        stage.prepare(config)
    # Data errors before any model. With max_prompt_length the data loads again below, with the tokenizer (to cut
    # TL;DR posts); this first pass only finds errors early, so its warnings (rows skipped) wait for the second.
    with _warnings_held(config.max_prompt_length is not None):
        train_items, eval_items, extra = stage.load_data(config, None)
    from ppo_lm.models import load_tokenizer
    from ppo_lm.training import run_training

    if config.max_prompt_length is not None:
        train_items, eval_items, extra = stage.load_data(config, load_tokenizer(config.model_name))
    warn_if_smaller_than_a_step(config, len(train_items))
    trainer = stage.make_trainer(config)
    result = run_training(config, trainer, train_items, eval_items, run_dir, resume_from=resume_dir)
    if stage.finish is not None:
        with trainer.whole_weights():  # every process gathers a sharded model's weights; the main one writes
            if processes.is_main_process:
                result.update(stage.finish(config, trainer, run_dir, extra))
    if processes.is_main_process:
        _print_summary(result)
    processes.wait_for_everyone()
    return result


@contextlib.contextmanager
def _warnings_held(hold: bool) -> Iterator[None]:
    """While the block runs, when `hold`, the data module's warnings are not shown (its errors still are)."""
    data_logger = logging.getLogger("ppo_lm.data")
    level = data_logger.level
    if hold:
        data_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        data_logger.setLevel(level)


def warn_if_smaller_than_a_step(config: RunConfig, num_items: int) -> None:
    """Warn when the training data holds fewer items than one step draws. The prompt stream cycles (see
    `data.PromptStream`), so each step's batch then holds some rows twice or more: fine for a smoke test, but often a
    sign of the wrong file or split."""
    per_step = config.items_per_step
    if num_items < per_step:
        groups = getattr(config, "num_generations", 1)
        batch = f"batch_size={config.batch_size}" + (f" / num_generations={groups}" if groups > 1 else "")
        logger.warning("%s (split %r) gives %d training row(s), fewer than the %d each step draws (%s): every step's "
                       "batch repeats rows. Add rows, or lower batch_size.", config.dataset, config.dataset_split,
                       num_items, per_step, batch)


def _print_summary(result: dict[str, Any]) -> None:
    evaluation = result.get("eval") or {}
    lines = [f"checkpoint: {result['checkpoint']}"]
    lines += [f"{name}: {value:.4g}" for name, value in evaluation.items()]
    lines += [f"{name}: {path}" for name, path in result.get("report", {}).items()]
    lines += [f"{name}: {result[name]}" for name in ("score_offset", "final") if name in result]
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------------
# The stages' pieces: data loaders, trainers, the final model


def _data_options(config: RunConfig, tokenizer: Any) -> dict[str, Any]:
    """The `load_*` arguments every stage takes from its config."""
    return dict(split=config.dataset_split, dataset_config=config.dataset_config, eval_split=config.eval_split,
                eval_fraction=0.0 if config.eval_split else config.eval_fraction, prompt_field=config.prompt_field,
                seed=config.seed, tokenizer=tokenizer,
                max_prompt_length=config.max_prompt_length if tokenizer is not None else None)


def _is_final_pass(config: RunConfig, tokenizer: Any) -> bool:
    """Whether this `load_data` call gives the items the run trains on: `run_stage` loads the data a second time, with
    the tokenizer, only when `max_prompt_length` needs one to cut TL;DR posts."""
    return tokenizer is not None or config.max_prompt_length is None


def _tokenizer_loader(config: RunConfig, tokenizer: Any) -> Callable[[], Any]:
    """A function that returns `tokenizer`, or else the model's, loaded on the first call only (and never when no
    split needs it)."""
    loaded = [tokenizer]

    def the_tokenizer() -> Any:
        if loaded[0] is None:
            from ppo_lm.models import load_tokenizer

            loaded[0] = load_tokenizer(config.model_name)
        return loaded[0]

    return the_tokenizer


def context_length(model_name: str) -> int | None:
    """The context length (`max_position_embeddings`) in the config of `model_name`, read without loading the model;
    None when the config has none or cannot be read."""
    from transformers import AutoConfig

    from ppo_lm.models import ModelLoadError, load_pretrained

    try:
        config = load_pretrained(AutoConfig.from_pretrained, model_name, "model_name")
    except ModelLoadError:
        return None  # the trainer says so in one line, once the data has passed all of its own checks
    return getattr(config, "max_position_embeddings", None)


def load_prompt_data(config: PPOConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """PPO's data loader: the prompts of `dataset` (train and eval), conversations put into the chat template.

    Each split is checked in turn: its prompts, then the columns the reward functions read (so that a missing column
    stops the run before any model loads), then the chat template, then the prompts' lengths: rows too long for the
    model's context less `max_new_tokens` get a warning that names the first (the trainer keeps their last tokens).
    Chat prompts and that length check need the tokenizer, so it is loaded here when none is given (a tokenizer and
    the model's config, never a model).
    """
    from ppo_lm.data import DataError, load_items, needs_chat_template, prompt_items_from_rows, render_chat_prompts

    options = _data_options(config, tokenizer)
    the_tokenizer = _tokenizer_loader(config, tokenizer)
    uses_chat = False

    def convert(rows: Any, source: str) -> list:
        nonlocal uses_chat
        items = prompt_items_from_rows(rows, config.prompt_field, options["tokenizer"], options["max_prompt_length"],
                                       source=source)
        if config.reward_fn is not None:
            _check_reward_columns(config.reward_fn, items, source)
        if needs_chat_template(items, config.chat_template):
            uses_chat = True
            items = render_chat_prompts(items, the_tokenizer(), config.system_prompt, config.chat_template)
        if _is_final_pass(config, tokenizer):
            _warn_long_prompts(config, items, the_tokenizer, source)
        return items

    train, evaluation = load_items(config.dataset, convert, options["split"], options["eval_split"],
                                   options["eval_fraction"], options["seed"], options["dataset_config"], what="prompts")
    if config.system_prompt is not None and not uses_chat:
        raise DataError(f"system_prompt is set, but the prompts of {config.dataset} are plain text, which go to the "
                        "model as they are. Set chat_template: true to put them into the chat template, or drop "
                        "system_prompt.")
    return train, evaluation, {}


def _check_reward_columns(reward_fn: Any, items: list, source: str) -> None:
    """Stop when a reward function reads a column that the items of `source` lack."""
    from ppo_lm.data import PROMPT_KEY
    from ppo_lm.rewards import check_reward_columns, load_reward_functions

    columns = [key for key in items[0] if key != PROMPT_KEY] if isinstance(items[0], dict) else []
    check_reward_columns(load_reward_functions(reward_fn), columns, source)


def _warn_long_prompts(config: RunConfig, items: list, tokenizer: Callable[[], Any], source: str,
                       completion_keys: tuple[str, ...] = (), rows: list[int] | None = None) -> None:
    """Warn, naming the first row, about the prompts of `items` that the trainer will cut to fit the model's context:
    PPO's prompts in the context less `max_new_tokens`; an SFT or reward row's prompt in the context less the row's
    longest completion (under `completion_keys`) and its EOS (see `data.warn_long_prompts`). `rows` numbers the
    items as the data does (default: 0, 1, ...)."""
    from ppo_lm.data import PROMPT_KEY, warn_long_prompts

    context = context_length(config.model_name)
    if context is None:
        return
    prompts = [item[PROMPT_KEY] if isinstance(item, dict) else item for item in items]
    if completion_keys:
        warn_long_prompts(prompts, context, tokenizer, source,
                          f"the model's context of {context} tokens beside their completion and EOS",
                          [[item[key] for key in completion_keys] for item in items],
                          getattr(config, "max_completion_length", None), rows)
    else:
        room = config.check_prompt_room(context)  # also stops here when max_new_tokens fills the whole context
        warn_long_prompts(prompts, room, tokenizer, source, f"{room} tokens (the model's context of {context} less "
                          f"max_new_tokens={config.max_new_tokens})", rows=rows)


def make_ppo_trainer(config: PPOConfig) -> Any:
    """A PPOTrainer of `config`."""
    from ppo_lm.ppo_trainer import PPOTrainer

    return PPOTrainer(config)


def _long_row_check(config: RunConfig, tokenizer: Any, completion_keys: tuple[str, ...]) -> RowCheck | None:
    """The SFT or reward stage's `data.RowCheck`: a warning for rows too long for the model's context, on the pass
    whose items the run trains on (None on the other)."""
    if not _is_final_pass(config, tokenizer):
        return None
    the_tokenizer = _tokenizer_loader(config, tokenizer)
    return lambda items, rows, source: _warn_long_prompts(config, items, the_tokenizer, source, completion_keys, rows)


def load_sft_data(config: SFTConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """SFT's data loader: prompt/completion rows of `dataset` (train and eval); rows too long for the model's context
    get a warning (see `data.warn_long_prompts`)."""
    from ppo_lm.data import load_completion_rows

    return (*load_completion_rows(config.dataset, completion_field=config.completion_field,
                                  check_rows=_long_row_check(config, tokenizer, ("completion",)),
                                  **_data_options(config, tokenizer)), {})


def make_sft_trainer(config: SFTConfig) -> Any:
    """An SFTTrainer of `config`."""
    from ppo_lm.sft_trainer import SFTTrainer

    return SFTTrainer(config)


def load_reward_data(config: RewardConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """The reward stage's data loader: preference rows of `dataset` (rows too long for the model's context get a
    warning), and `reference_dataset`'s rows (for the score normalisation) as extra `reference`."""
    from ppo_lm.data import load_completion_rows, load_preference_rows

    train, evaluation = load_preference_rows(config.dataset,
                                             check_rows=_long_row_check(config, tokenizer, ("chosen", "rejected")),
                                             **_data_options(config, tokenizer))
    reference = None
    if config.reference_dataset is not None:
        reference, _ = load_completion_rows(config.reference_dataset, split=config.reference_split,
                                            prompt_field=config.prompt_field, tokenizer=tokenizer,
                                            max_prompt_length=config.max_prompt_length if tokenizer else None)
    return train, evaluation, {"reference": reference}


def make_reward_trainer(config: RewardConfig) -> Any:
    """A RewardTrainer of `config`."""
    from ppo_lm.reward_trainer import RewardTrainer

    return RewardTrainer(config)


def write_final_model(config: Any, trainer: Any, run_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """After an SFT or reward run: (normalise the reward model, then) write `<run_dir>/final`, replacing one there."""
    from ppo_lm.finetune import FINAL_DIR

    result: dict[str, Any] = {}
    if extra.get("reference"):
        result["score_offset"] = trainer.normalize(extra["reference"])
    final = run_dir / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)
    result["final"] = trainer.save_final(final)
    return result


STAGES: dict[str, Stage] = {
    "train": Stage("ppo-lm train", PPOConfig, load_prompt_data, make_ppo_trainer),
    "sft": Stage("ppo-lm sft", SFTConfig, load_sft_data, make_sft_trainer, finish=write_final_model,
                 trainer_stage="sft"),
    "reward": Stage("ppo-lm reward", RewardConfig, load_reward_data, make_reward_trainer, finish=write_final_model,
                    trainer_stage="reward"),
}
"""The stages of the `ppo-lm` command, by subcommand: PPO on prompts, supervised fine-tuning, a reward model."""
