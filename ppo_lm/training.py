"""The training loop every stage shares: schedule, progress bar, evaluation, logging, checkpoints, report.

A stage's trainer (`PPOTrainer`, `SFTTrainer`, `RewardTrainer`) provides `optimizer`, `train_step(items)`,
`evaluate(items)`, `save_state(dir)`, `load_state(dir)`, `extra_state()` and `load_extra_state(state)`, and its
`backend`. The loop owns everything around them: which items each step sees, when to evaluate and save, and what
gets written. Every process calls `save_state` with the checkpoint's directory (gathering sharded weights is
collective): the main process writes the whole tensors, and under DeepSpeed each process also writes its partition
of the optimizer state.

What the loop promises when something goes wrong:
- A step is all or nothing (`all_or_nothing_step`): if it raises, the trained weights, the optimizer state and the
  trainer's own state are as before it. A step whose loss is not finite stops the run, or with `on_nonfinite: skip`
  is skipped (`max_skipped_steps` in a row stop it).
- SIGTERM or SIGINT (`StopSignals`) lets the current step finish, then saves a checkpoint of it and stops with
  `Preempted` (the command exits with 128 + the signal's number); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import torch
import yaml
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import get_scheduler

from ppo_lm.backend import Backend, NonFiniteLossError
from ppo_lm.checkpoint import (
    CheckpointWriteError,
    find_checkpoint,
    load_state,
    open_checkpoint,
    partial_checkpoint,
    rng_state,
    save_state,
    seal_checkpoint,
    set_rng_state,
    write_failure,
)
from ppo_lm.config import RunConfig, TrainConfig
from ppo_lm.data import PromptStream
from ppo_lm.distributed import all_sum, failed_process, from_main_process, gather_rows, shard
from ppo_lm.report import write_report

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class StageTrainer(Protocol):
    """What the loop needs from a stage's trainer."""

    optimizer: torch.optim.Optimizer
    backend: Backend

    def train_step(self, items: list) -> dict: ...
    def evaluate(self, items: list) -> tuple[dict[str, float], list[dict]]: ...
    def save_state(self, directory: Path) -> None: ...
    def load_state(self, directory: Path) -> None: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (it holds another run, or nothing to resume)."""


def prepare_run_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Check the run directory before anything is loaded; never overwrite a run unless asked.

    A new run needs a missing or empty directory, or `overwrite` (which deletes what is there). A resumed run
    needs the directory to exist.
    """
    run_dir = Path(output_dir)
    if resume:
        if not run_dir.is_dir():
            raise RunDirectoryError(f"Cannot resume: {run_dir} does not exist.")
        return run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"output_dir {run_dir} is a file; give a directory.")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirectoryError(
                f"output_dir {run_dir} is not empty. Pass --resume to continue that run, --overwrite to delete it "
                "and start again, or choose another --output_dir."
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_config(config: RunConfig, path: Path) -> None:
    """Write the config as YAML, one key per field."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule: warmup, then constant, linear decay to 0, or cosine."""
    name = config.lr_scheduler
    if name == "constant" and config.warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.total_steps)


class MetricsLogger:
    """Writes metrics to `metrics.jsonl` always, and to the trackers of `report_to` (through accelerate).

    Only the main process of a multi-process run writes (`active`); on the others every method does nothing.
    """

    def __init__(self, run_dir: Path, config: RunConfig, resumed_step: int | None, active: bool = True):
        self.metrics_path = run_dir / METRICS_FILE
        self.samples_path = run_dir / SAMPLES_FILE
        self.active = active
        self.accelerator = None
        if not active:
            return
        if resumed_step is not None:  # steps after the checkpoint will run again: drop their old lines
            for path in (self.metrics_path, self.samples_path):
                _truncate_jsonl_after(path, resumed_step)
        if config.trackers():
            from accelerate import Accelerator

            self.accelerator = Accelerator(log_with=config.trackers(), project_dir=str(run_dir))
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in dataclasses.asdict(config).items()}
            self.accelerator.init_trackers("tensorboard", config=hparams)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append one line of numbers (lists and texts stay out of the trackers)."""
        if not self.active:
            return
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **numbers}) + "\n")
        if self.accelerator is not None:
            self.accelerator.log(numbers, step=step)

    def log_samples(self, samples: list[dict], step: int) -> None:
        """Append the evaluation samples of one step."""
        if not self.active:
            return
        with open(self.samples_path, "a") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.accelerator is not None:
            self.accelerator.end_training()


def _truncate_jsonl_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut short by an interrupted run
    path.write_text("".join(line + "\n" for line in kept))


def all_or_nothing_step(trainer: StageTrainer, items: list, rollback: bool = True) -> dict:
    """`trainer.train_step(items)`, undone if it raises: the trained weights, the optimizer state and the trainer's
    own state (`extra_state`: the step count, PPO's KL controller) are then exactly as before the step, and the error
    goes on. `rollback` False runs the step as it is (no copy is kept: a failure leaves what it leaves)."""
    if not rollback:
        return trainer.train_step(items)
    before = trainer.backend.snapshot(reuse=True)
    extra = copy.deepcopy(trainer.extra_state())
    try:
        return trainer.train_step(items)
    except Exception:
        trainer.backend.restore(before)
        trainer.load_extra_state(extra)
        raise


def steps_can_be_undone(config: TrainConfig, backend: Backend) -> bool:
    """Whether the run's steps are all or nothing: `step_rollback` asks for it and the backend can. Without it,
    `on_nonfinite: skip` is refused (a skipped step must leave no trace)."""
    if config.step_rollback and not backend.can_roll_back:
        if config.on_nonfinite == "skip":
            raise ValueError(f"on_nonfinite: skip needs a step that can be undone, which {backend.title} cannot do; "
                             "set on_nonfinite: raise (a failed step then ends the run, which resumes from its last "
                             "checkpoint).")
        logger.warning("%s cannot undo a failed step: a failure ends the run with the weights as it left them; "
                       "resume from the last checkpoint.", backend.title)
    return config.step_rollback and backend.can_roll_back


class Preempted(Exception):
    """The run stopped on a signal, after saving a checkpoint of its last completed step."""

    def __init__(self, signal_number: int, step: int, run_dir: Path) -> None:
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
        """The shell's convention for a process ended by that signal (143 for SIGTERM, 130 for SIGINT)."""
        super().__init__(f"Stopped by {signal.Signals(signal_number).name} after step {step}: checkpoint-{step} is "
                         f"saved in {run_dir}. To continue, run the same command with --resume {run_dir}.")


class StopSignals:
    """Inside, SIGTERM and SIGINT ask the loop to stop after the current step (`requested` is the signal's number)
    instead of ending the process; a second SIGINT raises KeyboardInterrupt at once.

    A launcher passes the signal it gets on to its workers, which a terminal's Ctrl-C reaches too, so a signal within
    `REPEAT_SECONDS` of the first counts as the same request. A SIGTERM that torchrun's agent sends because another
    process failed (`distributed.failed_process`) ends the process at once, as it would without a handler. Outside
    the main thread (where Python cannot set handlers) nothing changes.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_SECONDS = 2.0

    def __init__(self) -> None:
        self.requested: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested is None and number == signal.SIGTERM and failed_process() is not None:
            # the launcher is ending the launch because another process failed: no checkpoint can be written
            # without that process, so end as SIGTERM would have without this handler
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        if self.requested is None:
            self.requested, self._first_at = number, time.monotonic()
            logger.warning("%s received: the current step finishes, then a checkpoint is saved and the run stops "
                           "(press Ctrl-C again to stop at once, without saving).", signal.Signals(number).name)
        elif number == signal.SIGINT and time.monotonic() - self._first_at > self.REPEAT_SECONDS:
            raise KeyboardInterrupt


def run_training(
    config: TrainConfig,
    trainer: StageTrainer,
    train_items: list,
    eval_items: list,
    run_dir: Path,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Train for `config.total_steps`, evaluating, logging and saving along the way; resume when asked.

    In a multi-process run every process calls this with the same items: each step's batch is drawn from the same
    stream everywhere and each process trains on its share; evaluation prompts are split the same way. Only the
    main process writes metrics, checkpoints and the report; the others wait for it at each checkpoint.

    Each step is all or nothing (see the module docstring). On SIGTERM or SIGINT the step under way finishes, its
    checkpoint is saved and `Preempted` is raised, on every process alike.

    Returns the last training metrics and the last evaluation metrics, and writes the report at the end.
    """
    processes = PartialState()
    rank, world, is_main = processes.process_index, processes.num_processes, processes.is_main_process
    run_dir = Path(run_dir)
    eval_items = eval_items[: config.max_eval_prompts]
    if 0 < len(eval_items) < world:
        raise ValueError(f"{len(eval_items)} evaluation prompt(s) cannot be shared by {world} processes; give at "
                         f"least {world} or none.")
    local_eval_items = shard(eval_items, rank, world)
    stream = PromptStream(train_items, config.items_per_step, config.seed)
    scheduler = build_scheduler(trainer.optimizer, config)
    rollback = steps_can_be_undone(config, trainer.backend)
    skipped = {"total": 0, "in_row": 0}  # steps skipped for a loss that was not finite
    step = 0
    if resume_from is not None:
        checkpoint = find_checkpoint(resume_from)
        loop_state = load_state(checkpoint, "loop_state")
        rng_states = loop_state["rng"] if isinstance(loop_state["rng"], list) else [loop_state["rng"]]
        if len(rng_states) != world:
            raise ValueError(
                f"{checkpoint} was written by a run of {len(rng_states)} process(es); this one has {world}. Resume "
                f"with the same number (`accelerate launch --num_processes {len(rng_states)} ...`), or start a new "
                "run from its weights."
            )
        trainer.load_state(checkpoint)
        scheduler.load_state_dict(loop_state["scheduler"])
        stream.load_state_dict(loop_state["data"])
        trainer.load_extra_state(loop_state["trainer"])
        set_rng_state(rng_states[rank])
        skipped = loop_state.get("skipped", skipped)  # absent from checkpoints written before it was kept
        step = loop_state["step"]
        logger.warning("Resuming from %s at step %d.", checkpoint, step)
    if is_main:
        save_config(config, run_dir / CONFIG_FILE)
    metrics_logger = MetricsLogger(run_dir, config, step if resume_from is not None else None, active=is_main)

    def save(at_step: int) -> Path:
        rng_states = gather_rows([rng_state()])  # each process's generators, so that a resume continues each one
        try:
            directory = open_checkpoint(run_dir, at_step) if is_main else partial_checkpoint(run_dir, at_step)
            processes.wait_for_everyone()  # the directory exists before any process writes into it
            trainer.save_state(directory)  # every process: sharded weights are gathered together
            if is_main:
                save_state({"step": at_step, "scheduler": scheduler.state_dict(), "data": stream.state_dict(),
                            "trainer": trainer.extra_state(), "rng": rng_states, "skipped": skipped},
                           directory, "loop_state")
                save_config(config, directory / CONFIG_FILE)
            processes.wait_for_everyone()  # every process's files are written before the manifest seals them
            sealed = seal_checkpoint(run_dir, at_step, keep=config.save_total_limit) if is_main else None
        except OSError as error:  # a full disk, no permission: no half-written checkpoint stays behind
            shutil.rmtree(partial_checkpoint(run_dir, at_step), ignore_errors=True)
            raise CheckpointWriteError(write_failure(run_dir, at_step, error)) from error
        return from_main_process(sealed)

    def evaluate(at_step: int) -> dict[str, float]:
        if not eval_items:
            return {}
        metrics, samples = trainer.evaluate(local_eval_items)
        metrics_logger.log(metrics, at_step)
        metrics_logger.log_samples(samples, at_step)
        return metrics

    def stop_requested(signals: StopSignals) -> int | None:
        """The signal that asked the run to stop, once any process got one (every process agrees)."""
        if world == 1:
            return signals.requested
        anyone = all_sum(torch.tensor([float(signals.requested is not None)], device=processes.device)).item()
        return (signals.requested or int(signal.SIGTERM)) if anyone > 0 else None

    train_metrics: dict[str, Any] = {}
    budget, spent = config.max_train_minutes, 0.0  # seconds of training steps in this process, evaluations excluded
    saved_at = None
    with StopSignals() as signals:  # a signal from here on ends the run at a step's end, with a checkpoint
        eval_metrics = evaluate(step) if resume_from is None else {}
        progress = tqdm(total=config.total_steps, initial=step, desc="ppo-lm", dynamic_ncols=True,
                        disable=not is_main)
        try:
            while step < config.total_steps:
                if budget is not None and from_main_process(spent >= 60 * budget):  # every process stops at once
                    logger.warning("max_train_minutes=%g reached after %d steps: stopping here.", budget, step)
                    break
                start = time.perf_counter()
                try:
                    train_metrics = all_or_nothing_step(trainer, shard(stream.next_batch(), rank, world), rollback)
                except NonFiniteLossError as error:
                    if config.on_nonfinite != "skip":
                        raise
                    spent += time.perf_counter() - start
                    skip_step(skipped, step, error, config.max_skipped_steps)
                    continue
                skipped["in_row"] = 0
                scheduler.step()
                step += 1
                train_metrics["learning_rate"] = scheduler.get_last_lr()[0]
                if config.on_nonfinite == "skip":
                    train_metrics["skipped_steps"] = skipped["total"]
                metrics_logger.log(train_metrics, step)
                progress.update(1)
                spent += time.perf_counter() - start
                progress.set_postfix(_postfix(train_metrics, time.perf_counter() - start))
                if config.eval_steps and step % config.eval_steps == 0 and step < config.total_steps:
                    eval_metrics = evaluate(step)
                if config.save_steps and step % config.save_steps == 0 and step < config.total_steps:
                    save(step)
                    saved_at = step
                if step < config.total_steps and (stopped_by := stop_requested(signals)) is not None:
                    if saved_at != step:
                        save(step)
                    metrics_logger.close()
                    raise Preempted(stopped_by, step, run_dir)
        finally:
            progress.close()
        eval_metrics = evaluate(step) or eval_metrics  # the last step: a signal now waits for its checkpoint
        checkpoint = save(step)
    metrics_logger.close()
    report = write_report(run_dir) if is_main else {}
    processes.wait_for_everyone()
    return {"train": train_metrics, "eval": eval_metrics, "checkpoint": checkpoint, "report": report}


def skip_step(skipped: dict[str, int], step: int, error: NonFiniteLossError, max_skipped_steps: int) -> None:
    """Count a step skipped for a loss that was not finite (it was undone); raise once `max_skipped_steps` in a row
    have been skipped."""
    skipped["total"] += 1
    skipped["in_row"] += 1
    if skipped["in_row"] >= max_skipped_steps:
        raise NonFiniteLossError(
            f"{skipped['in_row']} steps in a row were skipped (max_skipped_steps={max_skipped_steps}), the last "
            f"because: {error} The weights are those after step {step}. Lower the learning rate, check the rewards "
            "and data, or resume from an earlier checkpoint.") from error
    logger.warning("Step %d skipped and undone (%d skipped so far): %s", step + 1, skipped["total"], error)


def _postfix(metrics: dict[str, Any], seconds: float) -> dict[str, str]:
    shown = {"reward": "reward_mean", "kl": "kl", "loss": "loss", "acc": "accuracy"}
    postfix = {label: f"{metrics[key]:.3g}" for label, key in shown.items() if key in metrics}
    postfix["s/step"] = f"{seconds:.2f}"
    return postfix
