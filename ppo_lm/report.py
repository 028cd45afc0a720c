"""The end-of-run report: curves of the training metrics and a first-vs-last comparison of evaluation samples.

A run directory written by `ppo-lm train` holds `metrics.jsonl` (one JSON object per logged step; evaluation keys are
prefixed `eval/`) and `samples.jsonl` (one `{"step", "prompt", "completion", "reward"}` object per evaluated prompt).
`write_report(run_dir)` turns them into `report.png` and `samples.md` next to them.

matplotlib is imported inside the plotting functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"
"""Prefix of the metrics logged at evaluation steps."""

PANEL_TITLES: dict[str, str] = {
    "reward_mean": "Reward",
    "kl": "KL",
    "policy_loss": "Policy loss",
    "value_loss": "Value loss",
    "entropy": "Entropy",
    "response_length": "Response length",
    "loss": "Loss",
    "accuracy": "Accuracy",
    "margin": "Margin",
}
"""The metrics the report plots, in panel order, with their subplot titles. Other metrics are not plotted."""

MOVING_AVERAGE_MIN_POINTS = 20
"""A training curve with at least this many points also gets a moving average."""

FIGURE_DPI = 120
PANEL_SIZE = (4.0, 3.5)
"""Width and height of one panel, in inches: six panels in a 2x3 grid make a 12x7 figure."""

RUN_DIR_HINT = "`ppo-lm report` expects a run directory written by `ppo-lm train`"


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file into a list of dicts.

    Blank lines, lines that are not valid JSON (for example a last line truncated when a run was killed mid-write)
    and lines that are not JSON objects are skipped. A missing file gives an empty list.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, skipped = [], 0
    # errors="replace": a write cut inside a multi-byte character must not make the whole file unreadable.
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    if skipped:
        logger.warning("%s: skipped %d unparsable line(s)", path, skipped)
    return records


def _is_number(value: Any) -> bool:
    """A finite int or float (booleans excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_step(value: Any) -> bool:
    """An integer step (booleans excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def metric_series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, sorted by step.

    Records without an integer `"step"` or without a finite number under `key` are ignored. When a step appears more
    than once (a resumed run logs again the steps after its last checkpoint) the last value logged wins.
    """
    by_step: dict[int, float] = {}
    for record in records:
        step, value = record.get("step"), record.get(key)
        if _is_step(step) and _is_number(value):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def metric_panels(records: list[dict[str, Any]]) -> list[str]:
    """The metrics that get a panel, in panel order: those of `PANEL_TITLES` with a training or an eval value."""
    present = set()
    for record in records:
        if not _is_step(record.get("step")):
            continue
        present.update(key for key, value in record.items() if _is_number(value))
    return [name for name in PANEL_TITLES if name in present or EVAL_PREFIX + name in present]


# ----------------------------------------------------------------------------------------------------------------------
# Plotting


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing moving average: element i is the mean of `values[i - window + 1 : i + 1]` (`len(values) - window + 1`
    elements; empty when there are fewer values than `window`)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    averages, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            averages.append(total / window)
    return averages


def smoothing_window(num_points: int) -> int:
    """The moving-average window for a curve of `num_points` points: about a tenth of it; 0 means no average."""
    if num_points < MOVING_AVERAGE_MIN_POINTS:
        return 0
    return max(3, min(num_points // 10, 100))


def _plot_panel(ax: Axes, records: list[dict[str, Any]], name: str) -> None:
    """Draw one metric: the training curve (with a moving average when long) and the eval points."""
    from matplotlib.ticker import MaxNLocator

    steps, values = metric_series(records, name)
    if steps:
        sparse = len(steps) <= 30
        ax.plot(steps, values, color="C0", linewidth=0.9, alpha=0.45 if not sparse else 0.9,
                marker="." if sparse else None, label="train")
        window = smoothing_window(len(steps))
        if window:
            ax.plot(steps[window - 1:], moving_average(values, window), color="C0", linewidth=2.0,
                    label=f"train (moving avg, {window})")
    eval_steps, eval_values = metric_series(records, EVAL_PREFIX + name)
    if eval_steps:
        ax.plot(eval_steps, eval_values, color="C3", linestyle="--", linewidth=1.0, marker="o", markersize=5,
                label="eval")
    ax.set_title(PANEL_TITLES[name])
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_ylabel(name)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def build_figure(records: list[dict[str, Any]], title: str | None = None) -> Figure:
    """A figure with one panel per metric of `metric_panels(records)`, three panels a row.

    Raises ValueError when no metric can be plotted.
    """
    from matplotlib.figure import Figure  # imported here: importing the report module stays cheap

    panels = metric_panels(records)
    if not panels:
        raise ValueError(
            f"no plottable metric in {len(records)} record(s): expected a 'step' and at least one of "
            f"{', '.join(PANEL_TITLES)} (or their '{EVAL_PREFIX}' versions)"
        )
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figsize = (max(6.0, PANEL_SIZE[0] * ncols), PANEL_SIZE[1] * nrows + (0.4 if title else 0.0))
    # A bare Figure (no pyplot): no global state, no GUI backend, nothing to close.
    fig = Figure(figsize=figsize, dpi=FIGURE_DPI, layout="tight")
    for index, name in enumerate(panels):
        _plot_panel(fig.add_subplot(nrows, ncols, index + 1), records, name)
    if title:
        fig.suptitle(title)
    return fig


def plot_metrics(records: list[dict[str, Any]], out_path: str | Path, title: str | None = None) -> Path:
    """Save the metric curves of `records` (see `build_figure`) as a PNG at `out_path` and return its path."""
    out_path = Path(out_path)
    fig = build_figure(records, title)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=FIGURE_DPI, format="png")
    return out_path


# ----------------------------------------------------------------------------------------------------------------------
# Samples


def fenced(text: str) -> str:
    """`text` in a fenced code block whose fence is longer than any run of backticks inside it (valid Markdown)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}" if text else f"{fence}text\n{fence}"


def _format_reward(reward: Any) -> str:
    return f"{reward:.3f}" if _is_number(reward) else "n/a"


def _mean_reward(samples: list[dict[str, Any]]) -> float | None:
    rewards = [float(s["reward"]) for s in samples if _is_number(s.get("reward"))]
    return sum(rewards) / len(rewards) if rewards else None


def _samples_by_step(samples: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Valid samples (an integer step, a string prompt and completion) grouped by step, steps ascending."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        step = sample.get("step")
        if _is_step(step) and isinstance(sample.get("prompt"), str) and isinstance(sample.get("completion"), str):
            by_step.setdefault(step, []).append(sample)
    return dict(sorted(by_step.items()))


def _keyed(samples: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Samples keyed by (prompt, occurrence): the same prompt evaluated twice at a step gives two distinct keys."""
    seen: dict[str, int] = {}
    keyed = {}
    for sample in samples:
        occurrence = seen.get(sample["prompt"], 0)
        seen[sample["prompt"]] = occurrence + 1
        keyed[(sample["prompt"], occurrence)] = sample
    return keyed


def _completion_section(step: int, sample: dict[str, Any] | None, first: dict[str, Any] | None = None) -> list[str]:
    """The lines for one completion: a bold step header with the reward (and its change from `first`), the text."""
    if sample is None:
        return [f"**Step {step}**: not evaluated on this prompt", ""]
    header = f"**Step {step}** (reward {_format_reward(sample.get('reward'))}"
    if first is not None and _is_number(first.get("reward")) and _is_number(sample.get("reward")):
        header += f", {sample['reward'] - first['reward']:+.3f}"
    return [header + ")", "", fenced(sample["completion"]), ""]


def _mean_rewards_line(first: list[dict[str, Any]], first_step: int, last: list[dict[str, Any]], last_step: int) -> str:
    """The header line with the mean reward at the first and the last evaluated step, and its change."""
    first_mean, last_mean = _mean_reward(first), _mean_reward(last)
    line = (f"Mean reward: **{_format_reward(first_mean)}** at step {first_step} ({len(first)} sample(s)) → "
            f"**{_format_reward(last_mean)}** at step {last_step} ({len(last)} sample(s))")
    if first_mean is not None and last_mean is not None:
        line += f", change {last_mean - first_mean:+.3f}"
    return line + "."


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """The Markdown of `write_samples`: per eval prompt, the completion at the first and at the last evaluated step."""
    by_step = _samples_by_step(samples)
    if not by_step:
        raise ValueError("no valid sample: expected objects with an integer 'step', a 'prompt' and a 'completion'")
    first_step, last_step = next(iter(by_step)), next(reversed(by_step))
    first, last = _keyed(by_step[first_step]), _keyed(by_step[last_step])
    title = f"step {first_step}" if first_step == last_step else f"step {first_step} vs step {last_step}"
    lines = [f"# Evaluation samples: {title}", ""]
    if first_step == last_step:
        samples_at_step = by_step[first_step]
        lines += [f"Only one evaluated step ({first_step}): its completions are shown alone.", "",
                  f"Mean reward: **{_format_reward(_mean_reward(samples_at_step))}** at step {first_step} "
                  f"({len(samples_at_step)} sample(s)).", ""]
    else:
        lines += [_mean_rewards_line(by_step[first_step], first_step, by_step[last_step], last_step), ""]
    keys = list(first) + [key for key in last if key not in first]
    for number, key in enumerate(keys, start=1):
        lines += [f"## Prompt {number}", "", fenced(key[0]), ""]
        lines += _completion_section(first_step, first.get(key))
        if last_step != first_step:
            lines += _completion_section(last_step, last.get(key), first.get(key))
    return "\n".join(lines).rstrip("\n") + "\n"


def write_samples(samples: list[dict[str, Any]], out_path: str | Path) -> Path:
    """Write a Markdown comparison of the first and last evaluated completions for each eval prompt.

    The header gives the mean reward at both steps; each prompt and completion is a fenced block (fences longer than
    any backtick run in the text), so multi-line posts and backticks keep the Markdown valid. With one evaluated step,
    that step is shown alone. Raises ValueError when no sample is valid.
    """
    out_path = Path(out_path)
    text = samples_markdown(samples)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text, encoding="utf-8")
    return out_path


# ----------------------------------------------------------------------------------------------------------------------
# The report


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write `report.png` (and `samples.md` when `samples.jsonl` holds samples) into `run_dir`.

    Returns the paths written: `{"plot": ...}` plus `"samples"` when samples were written. Raises FileNotFoundError
    when `run_dir` or its `metrics.jsonl` is missing, ValueError when `metrics.jsonl` holds no plottable metric.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; {RUN_DIR_HINT}")
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found; {RUN_DIR_HINT} (with a metrics.jsonl)")
    records = read_jsonl(metrics_path)
    if not metric_panels(records):
        raise ValueError(
            f"{metrics_path} holds no plottable metric ({len(records)} record(s)); {RUN_DIR_HINT}, which logs "
            f"'step' and metrics such as {', '.join(list(PANEL_TITLES)[:3])}"
        )
    written = {"plot": plot_metrics(records, run_dir / "report.png", title=f"Run: {run_dir.resolve().name}")}
    samples = read_jsonl(run_dir / "samples.jsonl")
    if _samples_by_step(samples):
        written["samples"] = write_samples(samples, run_dir / "samples.md")
    return written
