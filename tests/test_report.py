"""The end-of-run report: reading JSON lines, choosing and drawing the metric panels, the samples Markdown."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from ppo_lm.report import (
    PANEL_TITLES,
    build_figure,
    fenced,
    metric_panels,
    metric_series,
    moving_average,
    plot_metrics,
    read_jsonl,
    write_report,
    write_samples,
)

PPO_METRICS = ["reward_mean", "kl", "policy_loss", "value_loss", "entropy", "response_length"]


def ppo_records(num_steps: int = 50, eval_every: int = 10, seed: int = 0) -> list[dict]:
    """A synthetic PPO log: noisy rising reward, extra metrics that are not plotted, eval lines every few steps."""
    rng = random.Random(seed)
    records = []
    for step in range(1, num_steps + 1):
        t = step / num_steps
        records.append({
            "step": step, "reward_mean": -0.5 + 1.5 * t + rng.gauss(0, 0.25), "kl": 0.3 * t + abs(rng.gauss(0, 0.03)),
            "policy_loss": rng.gauss(0, 0.02), "value_loss": 0.5 * math.exp(-3 * t), "entropy": 2.5 - 0.8 * t,
            "response_length": 40 + 10 * t, "kl_coef": 0.05, "approx_kl": 0.001, "time/step": 1.2,
            "lr": [1e-5, 1e-4], "phase": "train",
        })
        if step % eval_every == 0:
            records.append({"step": step, "eval/reward_mean": -0.5 + 1.5 * t, "eval/kl": 0.3 * t,
                            "eval/response_length": 40 + 10 * t})
    return records


def write_jsonl(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail, encoding="utf-8")
    return path


def panel_titles(records: list[dict]) -> list[str]:
    return [ax.get_title() for ax in build_figure(records).axes]


def check_png(path: Path, min_width: int = 400, min_height: int = 300) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert min_width <= width <= 4000 and min_height <= height <= 4000
    assert image.std() > 0.01  # not a blank image


# ----------------------------------------------------------------------------------------------------------------------
# read_jsonl


def test_read_jsonl_skips_blank_garbage_and_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kl": 0.1}\n\n   \nnot json\n[1, 2]\n{"step": 2, "kl": 0.2}\n{"step": 3, "k',
                    encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1, "kl": 0.1}, {"step": 2, "kl": 0.2}]


def test_read_jsonl_survives_a_write_cut_inside_a_multibyte_character(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"step": 1, "prompt": "a"}\n{"step": 2, "prompt": "caf\xc3')
    assert read_jsonl(path) == [{"step": 1, "prompt": "a"}]


def test_read_jsonl_missing_file_is_empty(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl") == []


# ----------------------------------------------------------------------------------------------------------------------
# Panels and series


def test_metric_panels_ppo_order_and_unlisted_metrics_left_out():
    records = ppo_records()
    assert metric_panels(records) == PPO_METRICS
    assert panel_titles(records) == [PANEL_TITLES[name] for name in PPO_METRICS]


def test_metric_panels_follow_the_preferred_order_whatever_the_log_order():
    records = [{"step": 1, "margin": 0.1, "entropy": 2.0, "accuracy": 0.5, "loss": 0.7, "kl": 0.0, "other": 3.0}]
    assert metric_panels(records) == ["kl", "entropy", "loss", "accuracy", "margin"]


def test_metric_panels_reward_model_and_sft_runs():
    rm = [{"step": 1, "loss": 0.7, "accuracy": 0.5, "margin": 0.0}, {"step": 1, "eval/loss": 0.7, "eval/accuracy": 0.5}]
    assert panel_titles(rm) == ["Loss", "Accuracy", "Margin"]
    # An eval-only metric still gets its panel.
    assert metric_panels([{"step": 5, "eval/loss": 1.0}]) == ["loss"]


def test_metric_panels_ignore_non_numeric_values_and_records_without_step():
    records = [
        {"step": 1, "kl": "n/a", "entropy": [1.0], "reward_mean": True, "loss": float("nan")},
        {"kl": 0.3},
        {"step": 2, "policy_loss": None},
    ]
    assert metric_panels(records) == []


def test_metric_series_sorts_by_step_and_keeps_the_last_value_of_a_repeated_step():
    records = [{"step": 3, "kl": 0.3}, {"step": 1, "kl": 0.1}, {"step": 2, "kl": "x"}, {"step": 3, "kl": 0.35}]
    assert metric_series(records, "kl") == ([1, 3], [0.1, 0.35])


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]
    assert moving_average([1.0, 2.0], 3) == []
    with pytest.raises(ValueError):
        moving_average([1.0], 0)


def test_panels_show_train_moving_average_and_eval_with_labels():
    axes = build_figure(ppo_records()).axes
    labels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in axes}
    assert labels["Reward"] == ["train", "train (moving avg, 5)", "eval"]
    assert labels["Entropy"] == ["train", "train (moving avg, 5)"]  # no eval/entropy logged
    for ax in axes:
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
        assert ax.get_legend() is not None


# ----------------------------------------------------------------------------------------------------------------------
# plot_metrics


def test_plot_metrics_writes_a_readable_png(tmp_path):
    out = plot_metrics(ppo_records(), tmp_path / "sub" / "report.png", title="run")
    assert out == tmp_path / "sub" / "report.png"
    check_png(out, min_width=1200, min_height=700)  # 12x7 inches at 120 dpi, give or take the tight layout


def test_plot_metrics_with_a_single_point(tmp_path):
    check_png(plot_metrics([{"step": 0, "loss": 1.0}], tmp_path / "one.png"), min_width=300, min_height=200)


def test_plot_metrics_without_plottable_metric_raises(tmp_path):
    with pytest.raises(ValueError, match="no plottable metric"):
        plot_metrics([{"step": 1, "time/step": 1.0}], tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Samples


PROMPTS = [
    "SUBREDDIT: r/code\nPOST: my `print` call\nprints ``` three backticks\n\nTL;DR:",
    "SUBREDDIT: r/cats\nPOST: the cat sat.\n\nTL;DR:",
]


def samples_at(step: int, reward_offset: float) -> list[dict]:
    return [
        {"step": step, "prompt": prompt, "completion": f" summary {i} at step {step}\nsecond line",
         "reward": i + reward_offset}
        for i, prompt in enumerate(PROMPTS)
    ]


def fenced_blocks(markdown: str) -> list[str]:
    """The contents of the fenced blocks of `markdown` (CommonMark: a block closes at a fence at least as long)."""
    blocks, lines, i = [], markdown.split("\n"), 0
    while i < len(lines):
        opening = re.match(r"^(`{3,})", lines[i])
        if not opening:
            i += 1
            continue
        fence, body, i = opening.group(1), [], i + 1
        while not re.fullmatch(f"`{{{len(fence)},}}", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append("\n".join(body))
        i += 1
    return blocks


def test_fenced_is_longer_than_any_backtick_run():
    assert fenced("plain") == "```text\nplain\n```"
    assert fenced("a ``` b `````") == "``````text\na ``` b `````\n``````"
    assert fenced("") == "```text\n```"


def test_write_samples_first_vs_last(tmp_path):
    samples = samples_at(10, 0.25) + samples_at(0, -0.5) + samples_at(20, 1.0)  # steps out of order on purpose
    text = write_samples(samples, tmp_path / "samples.md").read_text(encoding="utf-8")
    assert text.startswith("# Evaluation samples: step 0 vs step 20\n")
    assert "**0.000** at step 0" in text and "**1.500** at step 20" in text and "+1.500" in text
    for i in range(len(PROMPTS)):
        assert f"**Step 0** (reward {i - 0.5:.3f})" in text
        assert f"**Step 20** (reward {i + 1.0:.3f}, +1.500)" in text
        assert f"summary {i} at step 0" in text and f"summary {i} at step 20" in text
    assert "at step 10" not in text  # the middle evaluation is not shown
    # Every prompt and completion is one fenced block, intact, newlines and backticks included.
    blocks = fenced_blocks(text)
    assert blocks == [
        block
        for i, prompt in enumerate(PROMPTS)
        for block in (prompt, f" summary {i} at step 0\nsecond line", f" summary {i} at step 20\nsecond line")
    ]


def test_write_samples_single_step(tmp_path):
    text = write_samples(samples_at(7, 0.0), tmp_path / "samples.md").read_text(encoding="utf-8")
    assert "Only one evaluated step (7)" in text
    assert "**0.500** at step 7" in text
    assert text.count("**Step 7**") == len(PROMPTS)


def test_write_samples_prompt_missing_at_one_step_and_bad_rewards(tmp_path):
    samples = samples_at(0, 0.0) + [{"step": 5, "prompt": PROMPTS[0], "completion": "late", "reward": None}]
    text = write_samples(samples, tmp_path / "samples.md").read_text(encoding="utf-8")
    assert "**Step 5** (reward n/a)" in text
    assert "**Step 5**: not evaluated on this prompt" in text  # PROMPTS[1] was evaluated at step 0 only


def test_write_samples_without_valid_samples_raises(tmp_path):
    with pytest.raises(ValueError, match="no valid sample"):
        write_samples([{"prompt": "no step"}], tmp_path / "samples.md")


# ----------------------------------------------------------------------------------------------------------------------
# write_report


def test_write_report_full_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", ppo_records(), tail='{"step": 51, "reward_me')
    write_jsonl(run / "samples.jsonl", samples_at(0, 0.0) + samples_at(50, 1.0), tail='{"step": 60, "prom')
    written = write_report(run)
    assert written == {"plot": run / "report.png", "samples": run / "samples.md"}
    check_png(written["plot"], min_width=1200, min_height=700)
    assert "step 0 vs step 50" in written["samples"].read_text(encoding="utf-8")


def test_write_report_without_samples_writes_only_the_plot(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.8}])
    assert write_report(tmp_path) == {"plot": tmp_path / "report.png"}
    assert not (tmp_path / "samples.md").exists()


def test_write_report_missing_run_dir_or_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*ppo-lm train"):
        write_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found.*ppo-lm train"):
        write_report(tmp_path)


@pytest.mark.parametrize("content", ["", '{"step": 1, "time/step": 0.5}\n', '{"step": 1, "kl"'])
def test_write_report_empty_metrics(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="no plottable metric.*ppo-lm train"):
        write_report(tmp_path)
    assert not (tmp_path / "report.png").exists()
