"""training.py's loop, through `ppo-lm train` on a tiny model: exact resume, the run directory, the learning-rate
schedules, the trackers and the report."""

import shutil

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file

from ppo_lm.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [
    [],
    # a schedule that moves at every step (warmup, then linear decay) and a KL coefficient that adapts at every step
    ["--lr_scheduler", "linear", "--warmup_steps", "1", "--adaptive_kl_target", "0.05", "--adaptive_kl_horizon", "40"],
    ["--advantage_estimator", "grpo", "--num_generations", "2", "--kl_coef", "0", "--kl_loss_coef", "0.05",
     "--loss_aggregation", "sequence_sum"],
], ids=["gae", "linear-warmup-adaptive-kl", "grpo"])
def test_resumed_run_matches_the_straight_run(run_files, estimator):
    straight, halves = run_files["dir"] / "straight", run_files["dir"] / "halves"
    train = ["train", "--config", run_files["config"], *estimator]
    assert main([*train, "--output_dir", str(straight)]) == 0
    # A run stopped after its step-2 checkpoint: the straight run's directory without what came later. (Stopping by
    # a smaller total_steps would change the schedule itself.)
    shutil.copytree(straight, halves)
    shutil.rmtree(halves / "checkpoint-4")
    assert main([*train, "--output_dir", str(halves), "--resume"]) == 0

    straight_metrics, resumed_metrics = read_metrics(straight), read_metrics(halves)
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in straight_metrics]
    for a, b in zip(straight_metrics, resumed_metrics, strict=True):
        assert a.keys() == b.keys()
        for key in a:  # the learning rate and the KL coefficient included
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    if "--adaptive_kl_target" in estimator:  # both moved at every step, so the comparison above could fail
        train = [m for m in straight_metrics if "kl_coef" in m]
        assert len({m["learning_rate"] for m in train}) == len(train) and len({m["kl_coef"] for m in train}) > 2
    final_straight = load_file(str(straight / "checkpoint-4" / "trainable.safetensors"))
    final_resumed = load_file(str(halves / "checkpoint-4" / "trainable.safetensors"))
    assert final_straight.keys() == final_resumed.keys()
    assert any(name.startswith("value") for name in final_straight) == ("grpo" not in estimator)  # no value model
    for name in final_straight:
        torch.testing.assert_close(final_straight[name], final_resumed[name], atol=1e-6, rtol=1e-5)
    assert (straight / "report.png").stat().st_size > 10_000
    samples = (straight / "samples.md").read_text()
    assert "Question" in samples


@pytest.mark.slow
def test_resume_from_an_explicit_checkpoint_directory(run_files):
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--save_total_limit",
                 "0"]) == 0
    before = load_file(str(run_dir / "checkpoint-4" / "trainable.safetensors"))
    # Resume from checkpoint-2 by path: steps 3 and 4 run again and give the same weights.
    assert main(["train", "--resume", str(run_dir / "checkpoint-2")]) == 0
    after = load_file(str(run_dir / "checkpoint-4" / "trainable.safetensors"))
    for name in before:
        torch.testing.assert_close(before[name], after[name], atol=1e-6, rtol=1e-5)
    assert [m["step"] for m in read_metrics(run_dir) if "reward_mean" in m] == [1, 2, 3, 4]


@pytest.mark.slow
def test_max_train_minutes_stops_early_then_evaluates_and_saves(run_files, caplog):
    run_dir = run_files["dir"] / "run"
    # A budget far under one step's time: the first step spends it, so the run stops after one of its 4 steps.
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--max_train_minutes",
                 "1e-6"]) == 0
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "reward_mean" in m] == [1]
    assert [m["step"] for m in metrics if "eval/reward_mean" in m] == [0, 1]
    assert (run_dir / "checkpoint-1" / "checkpoint.json").is_file()
    assert "max_train_minutes=1e-06 reached after 1 steps" in caplog.text


@pytest.mark.slow
def test_a_non_empty_output_dir_is_refused_unless_overwrite(run_files, capsys):
    run_dir = run_files["dir"] / "existing"
    run_dir.mkdir()
    keep = run_dir / "precious.txt"
    keep.write_text("do not lose me")
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir)]) == 2
    assert "not empty" in capsys.readouterr().err and keep.read_text() == "do not lose me"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--overwrite",
                 "--total_steps", "1", "--eval_fraction", "0"]) == 0
    assert not keep.exists() and (run_dir / "checkpoint-1").is_dir()


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules_warm_up_then_follow_their_shape(schedule):
    from ppo_lm.config import PPOConfig
    from ppo_lm.training import build_scheduler

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    config = PPOConfig(lr_scheduler=schedule, warmup_steps=2, total_steps=10)
    scheduler = build_scheduler(optimizer, config)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.0, 0.5, 1.0])
    if schedule == "constant":
        assert rates[2:] == pytest.approx([1.0] * 8)
    else:
        assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False)) and rates[-1] < 0.2


@pytest.mark.slow
def test_tensorboard_logs_by_default_and_report_on_demand(run_files, capsys):
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--report_to",
                 "tensorboard", "--total_steps", "2"]) == 0
    assert list(run_dir.rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    (run_dir / "report.png").unlink()
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").stat().st_size > 10_000 and "report.png" in capsys.readouterr().out
    assert main(["report", str(run_files["dir"] / "nothing-here")]) == 2
