"""training.py's loop, through `ppo-lm train` on a tiny model: exact resume, the run directory, the learning-rate
schedules, the trackers and the report; all-or-nothing steps and skipped ones; stopping on a signal."""

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import length_reward, read_metrics, tiny_config, wait_for, write_pausing_reward
from safetensors.torch import load_file

from ppo_lm import training
from ppo_lm.backend import NonFiniteLossError
from ppo_lm.checkpoint import load_state
from ppo_lm.cli import main
from ppo_lm.ppo_trainer import PPOTrainer
from ppo_lm.sft_trainer import SFTTrainer
from ppo_lm.training import StopSignals, all_or_nothing_step


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


# --- all-or-nothing steps ----------------------------------------------------------------------------------------

PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(4)]


def trained_state(trainer):
    """Copies of everything a step changes: the trained tensors, the optimizer state, the trainer's own state."""
    weights = [p.detach().clone() for group in trainer.optimizer.param_groups for p in group["params"]]
    return weights, copy.deepcopy(trainer.optimizer.state_dict()), copy.deepcopy(trainer.extra_state())


def assert_same_state(trainer, before):
    weights, optimizer, extra = trained_state(trainer)
    assert len(weights) == len(before[0]) and all(torch.equal(a, b) for a, b in zip(weights, before[0], strict=True))
    assert optimizer["param_groups"] == before[1]["param_groups"]
    assert optimizer["state"].keys() == before[1]["state"].keys()
    for key, entry in optimizer["state"].items():
        assert entry.keys() == before[1]["state"][key].keys()
        assert all(torch.equal(entry[name], before[1]["state"][key][name]) for name in entry)
    assert extra == before[2]
    assert all(p.grad is None for group in trainer.optimizer.param_groups for p in group["params"])


def fail_in_update(trainer, monkeypatch, failure):
    """Make the next update fail: a NaN policy loss in its third minibatch, or an out-of-memory error right after its
    second optimizer step (weights and optimizer state already changed twice)."""
    if failure == "nan-loss-in-minibatch-3":
        policy_loss, calls = trainer.policy_loss, []

        def nan_on_third_call(*args):
            loss, stats = policy_loss(*args)
            calls.append(1)
            return (loss + float("nan") if len(calls) == 3 else loss), stats

        monkeypatch.setattr(trainer, "policy_loss", nan_on_third_call)
        return NonFiniteLossError, r"The policy loss is nan at PPO step 2 \(epoch 1, minibatch 3 of 4\)"
    step, calls = trainer.backend.step, []

    def out_of_memory_after_second_step(groups):
        result = step(groups)
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return result

    monkeypatch.setattr(trainer.backend, "step", out_of_memory_after_second_step)
    return torch.OutOfMemoryError, "simulated"


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["nan-loss-in-minibatch-3", "out-of-memory"])
@pytest.mark.parametrize("settings", [{}, {"use_lora": False, "advantage_estimator": "grpo", "num_generations": 2}],
                         ids=["lora-gae", "full-grpo"])
def test_a_failed_ppo_step_leaves_weights_optimizer_and_controller_as_before(tiny_model_dir, monkeypatch, settings,
                                                                             failure):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, num_mini_batches=4, ppo_epochs=1, adaptive_kl_target=0.01,
                                     **settings), reward_fn=length_reward)
    all_or_nothing_step(trainer, PROMPTS)  # a step that works: the optimizer has state, the KL coefficient moved
    before = trained_state(trainer)
    error, message = fail_in_update(trainer, monkeypatch, failure)
    with pytest.raises(error, match=message):
        all_or_nothing_step(trainer, PROMPTS)
    assert_same_state(trainer, before)
    # The same failure without the rollback leaves the first minibatches' steps behind: the check above could fail.
    monkeypatch.undo()
    fail_in_update(trainer, monkeypatch, failure)
    with pytest.raises(error):
        all_or_nothing_step(trainer, PROMPTS, rollback=False)
    assert not all(torch.equal(a, b) for a, b in zip(trained_state(trainer)[0], before[0], strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_a_failed_sft_step_leaves_weights_and_optimizer_as_before(tiny_model_dir, monkeypatch, use_lora):
    from ppo_lm.config import SFTConfig

    trainer = SFTTrainer(SFTConfig(model_name=tiny_model_dir, batch_size=4, micro_batch_size=2, learning_rate=1e-3,
                                   use_lora=use_lora, device="cpu"))
    rows = [{"prompt": f"Question {i}:", "completion": f" the answer is {i}"} for i in range(4)]
    all_or_nothing_step(trainer, rows)
    before = trained_state(trainer)
    micro_losses = trainer.micro_losses

    def nan_in_second_micro_batch(items, size):
        for number, (loss, stats) in enumerate(micro_losses(items, size)):
            yield (loss * float("nan") if number == 1 else loss), stats

    monkeypatch.setattr(trainer, "micro_losses", nan_in_second_micro_batch)
    with pytest.raises(NonFiniteLossError, match="The loss is nan at step 2; no optimizer step was taken"):
        all_or_nothing_step(trainer, rows)
    assert_same_state(trainer, before)
    monkeypatch.undo()
    step = trainer.backend.step

    def out_of_memory_after_the_step(groups):
        step(groups)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer.backend, "step", out_of_memory_after_the_step)
    with pytest.raises(torch.OutOfMemoryError):
        all_or_nothing_step(trainer, rows)
    assert_same_state(trainer, before)


def nan_advantages_on_attempts(monkeypatch, attempts):
    """From now on, PPO updates number `attempts` (counting from 1) get a NaN advantage: a non-finite policy loss."""
    update, count = PPOTrainer.update, []

    def update_with_nan(self, rollout):
        count.append(1)
        if len(count) in attempts:
            rollout.advantages[0, 0] = float("nan")
        return update(self, rollout)

    monkeypatch.setattr(PPOTrainer, "update", update_with_nan)


@pytest.mark.slow
def test_skip_undoes_a_non_finite_step_and_trains_on(run_files, monkeypatch, caplog):
    run_dir = run_files["dir"] / "run"
    nan_advantages_on_attempts(monkeypatch, {2})
    undone = []

    def checked_step(trainer, items, rollback=True):  # the loop's own step, watched: what a failure leaves
        before = trained_state(trainer)
        try:
            return all_or_nothing_step(trainer, items, rollback)
        except NonFiniteLossError:
            assert_same_state(trainer, before)
            undone.append(trainer.step_count)
            raise

    monkeypatch.setattr(training, "all_or_nothing_step", checked_step)
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--on_nonfinite",
                 "skip"]) == 0
    assert undone == [1]  # the second step failed, and left everything as the first step had
    train = [m for m in read_metrics(run_dir) if "reward_mean" in m]
    assert [(m["step"], m["skipped_steps"]) for m in train] == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert "Step 2 skipped and undone (1 skipped so far): The policy loss is nan at PPO step 2" in caplog.text
    assert load_state(run_dir / "checkpoint-4", "loop_state")["skipped"] == {"total": 1, "in_row": 0}


@pytest.mark.slow
@pytest.mark.parametrize("mode, message", [
    ("raise", r"The policy loss is nan at PPO step 2 \(epoch 1, minibatch 1 of 1\)"),
    ("skip", r"2 steps in a row were skipped \(max_skipped_steps=2\), the last because: The policy loss is nan"),
])
def test_a_non_finite_step_stops_the_run_with_one_line(run_files, monkeypatch, capsys, mode, message):
    nan_advantages_on_attempts(monkeypatch, {2, 3, 4})
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_files["dir"] / "run"),
                 "--on_nonfinite", mode, "--max_skipped_steps", "2"]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and re.search(message, last_line), last_line


# --- stopping on a signal ----------------------------------------------------------------------------------------

def start_run(config: str, run_dir, pause_dir, pause_at: int, pause_seconds: float, *extra: str) -> subprocess.Popen:
    """`ppo-lm train` in its own process, whose reward function pauses at its call `pause_at` (see conftest)."""
    pause_dir.mkdir()
    env = {**os.environ, "PAUSE_DIR": str(pause_dir), "PAUSE_AT": str(pause_at), "PAUSE_SECONDS": str(pause_seconds),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ppo_lm", "train", "--config", config, "--output_dir",
                             str(run_dir), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_in_the_middle_of_a_step_saves_it_and_resume_ends_like_a_straight_run(run_files, monkeypatch):
    write_pausing_reward(run_files["dir"])
    settings = ["--total_steps", "5", "--save_steps", "0", "--eval_fraction", "0"]  # reward call k is step k
    straight, stopped, marks = (run_files["dir"] / name for name in ("straight", "stopped", "marks"))
    # The stopped run's process starts first and imports while this one runs the straight run. Its step 3 waits
    # in the reward function (a minute at most) until the signal is sent.
    run = start_run(run_files["config"], stopped, marks, 3, 60.0, *settings)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in the subprocess, so that the numbers can agree to 1e-6
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", run_files["config"], "--output_dir", str(straight), *settings]) == 0
    except BaseException:
        run.kill()
        raise
    finally:
        torch.set_num_threads(os.cpu_count() or 1)

    wait_for(marks / "0-3", run)  # step 3 is scoring its responses
    run.send_signal(signal.SIGTERM)
    (marks / "go").touch()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"Stopped by SIGTERM after step 3: checkpoint-3 is saved in {stopped}" in stderr
    assert f"run the same command with --resume {stopped}" in stderr
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-3"]
    assert main(["verify", str(stopped)]) == 0
    assert [m["step"] for m in read_metrics(stopped)] == [1, 2, 3]  # written and flushed before the exit

    torch.set_num_threads(1)  # the resumed steps too: CPU kernels may sum in another order with more threads
    try:
        assert main(["train", "--resume", str(stopped)]) == 0  # the run's own config
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    for a, b in zip(read_metrics(straight), read_metrics(stopped), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["step"], key)
    final_straight = load_file(str(straight / "checkpoint-5" / "trainable.safetensors"))
    final_resumed = load_file(str(stopped / "checkpoint-5" / "trainable.safetensors"))
    for name in final_straight:
        torch.testing.assert_close(final_straight[name], final_resumed[name], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_saving(run_files):
    write_pausing_reward(run_files["dir"])
    run_dir = run_files["dir"] / "run"
    run = start_run(run_files["config"], run_dir, run_files["dir"] / "marks", 2, 60.0, "--save_steps", "0",
                    "--eval_fraction", "0")
    wait_for(run_files["dir"] / "marks" / "0-2", run)  # step 2 waits a minute in its reward function
    run.send_signal(signal.SIGINT)
    time.sleep(StopSignals.REPEAT_SECONDS + 1)  # a second press, not the same signal passed on by a launcher
    interrupted = time.monotonic()
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert time.monotonic() - interrupted < 20  # not after the step's minute
    assert run.returncode == 130, stderr[-3000:]
    assert "SIGINT received: the current step finishes" in stderr and "Stopped at once (interrupted twice)" in stderr
    assert not list(run_dir.glob("checkpoint-*"))


def test_skip_is_refused_where_a_step_cannot_be_undone(caplog):
    from ppo_lm.backend import Backend, DeepSpeedBackend, DeepSpeedSettings
    from ppo_lm.config import PPOConfig
    from ppo_lm.training import steps_can_be_undone

    engine = DeepSpeedBackend(DeepSpeedSettings({"stage": 2}))
    assert steps_can_be_undone(PPOConfig(), Backend()) is True
    assert steps_can_be_undone(PPOConfig(step_rollback=False), Backend()) is False
    assert steps_can_be_undone(PPOConfig(), engine) is False
    assert "DeepSpeed ZeRO cannot undo a failed step" in caplog.text
    with pytest.raises(ValueError, match="on_nonfinite: skip needs a step that can be undone, which DeepSpeed ZeRO"):
        steps_can_be_undone(PPOConfig(on_nonfinite="skip"), engine)
    with pytest.raises(ValueError, match="on_nonfinite='skip' is invalid: needs step_rollback: true"):
        PPOConfig(on_nonfinite="skip", step_rollback=False)
