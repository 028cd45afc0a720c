"""Data parallelism: the batch arithmetic, and 2 processes on the CPU (gloo, through `accelerate launch`) against 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import wait_for, write_pausing_reward, write_ppo_run
from safetensors.torch import load_file

from ppo_lm import PPOConfig, PPOTrainer
from ppo_lm.checkpoint import load_state, verify
from ppo_lm.cli import main
from ppo_lm.distributed import batch_layout, shard

WORKER = Path(__file__).parent / "distributed_worker.py"
PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer in words." + " Please." * (i % 3) for i in range(8)]


def length_reward(prompts, completions):
    return [len(c) / 10 for c in completions]


REPLICATED = ["--multi_gpu"]
"""`accelerate launch` options of a data-parallel launch with the whole model in every process."""
ACCELERATE_CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"
SHARDED = ["--config_file", str(ACCELERATE_CONFIGS / "fsdp.yaml")]
"""An FSDP launch with the shipped config: the weights sharded over the processes, freed after each forward."""
SHARDED_KEPT_FOR_BACKWARD = ["--config_file", str(ACCELERATE_CONFIGS / "fsdp_zero2.yaml")]
"""The same, each layer's gathered weights kept from its forward to its backward pass."""
DEEPSPEED_ZERO2 = ["--config_file", str(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml")]
"""A DeepSpeed ZeRO-2 launch with the shipped config: gradients and optimizer state partitioned."""
DEEPSPEED_ZERO3 = ["--config_file", str(ACCELERATE_CONFIGS / "deepspeed_zero3.yaml")]
"""A DeepSpeed ZeRO-3 launch with the shipped config: the weights partitioned too."""


def launch_command(arguments: list[str], sharding: list[str] = REPLICATED) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `accelerate launch --multi_gpu --num_processes 2 ...` (or FSDP's or
    DeepSpeed's options instead of --multi_gpu); without a visible GPU its processes use gloo."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *sharding,
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(port), *arguments]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return command, env


@dataclass
class Launch:
    """`launch_command` running in `folder`, its output going to launch.out and launch.err there (files, not pipes:
    nothing reads a long launch's output before it ends)."""

    process: subprocess.Popen
    folder: Path

    @classmethod
    def start(cls, arguments: list[str], folder: Path, sharding: list[str] = REPLICATED) -> Launch:
        command, env = launch_command(arguments, sharding)
        with open(folder / "launch.out", "w") as stdout, open(folder / "launch.err", "w") as stderr:
            return cls(subprocess.Popen(command, cwd=folder, env=env, stdout=stdout, stderr=stderr), folder)

    def output(self) -> tuple[str, str]:
        return (self.folder / "launch.out").read_text(), (self.folder / "launch.err").read_text()

    def end(self, timeout: float = 600) -> tuple[str, str]:
        """Wait for the launch to end: its output. A launch still running after `timeout` seconds is stopped, with
        its processes, and fails the test."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the launch still ran after {timeout} s:\n{self.output()[1][-5000:]}")
        return self.output()

    def stop(self) -> None:
        # SIGTERM, not SIGKILL: the workers run in sessions of their own, and the agent stops them on SIGTERM
        # (SIGKILL after 30 s), so that they do not outlive the test.
        self.process.terminate()
        self.process.wait(timeout=60)


def launch(arguments: list[str], cwd: Path, sharding: list[str] = REPLICATED) -> None:
    """Run `launch_command` in `cwd` to the end; it must succeed."""
    run = Launch.start(arguments, cwd, sharding)
    stdout, stderr = run.end()
    assert run.process.returncode == 0, stdout[-3000:] + stderr[-5000:]


# --- the batch arithmetic -----------------------------------------------------------------------------------------


def test_batch_layout_splits_the_global_batch_over_processes_minibatches_and_micro_batches():
    layout = batch_layout(batch_size=64, processes=4, num_mini_batches=2, micro_batch_size=3)
    assert (layout.per_process, layout.per_process_minibatch, layout.accumulation) == (16, 8, 3)
    assert layout.per_process * layout.processes == layout.global_batch
    assert "64 = 16 per process x 4 processes" in layout.describe()
    assert batch_layout(8, 1, 1, None).accumulation == 1
    # A token budget forms the passes: how many depends on the lengths, and the log says so instead of a count.
    budget = batch_layout(8, 1, 1, None, micro_batch_tokens="auto")
    assert budget.accumulation is None and "at most micro_batch_tokens=auto padded tokens" in budget.describe()
    assert "1 micro-batch(es)" not in budget.describe()
    assert batch_layout(8, 1, 1, 4, micro_batch_tokens="auto").accumulation == 2  # micro_batch_size wins


@pytest.mark.parametrize("batch_size, processes, mini_batches, message", [
    (10, 4, 1, "does not split over 4 processes"),
    (8, 2, 3, "num_mini_batches=3"),
])
def test_an_impossible_batch_layout_is_a_clear_error(batch_size, processes, mini_batches, message):
    with pytest.raises(ValueError, match=message):
        batch_layout(batch_size, processes, mini_batches, None)


def test_shards_cover_the_items_once_in_order():
    items = list(range(11))
    parts = [shard(items, index, 3) for index in range(3)]
    assert sum(parts, []) == items
    assert sorted(len(part) for part in parts) == [3, 4, 4]


def test_the_layout_is_checked_before_any_model_loads(tmp_path, capsys):
    # batch 6 over 1 process into 4 minibatches: refused by the config check, with no model at this path. The
    # values come as --FIELD VALUE, so tyro reports the config's ValueError and exits with 2.
    with pytest.raises(SystemExit) as error:
        main(["train", "--model_name", str(tmp_path / "no-model"), "--dataset", str(tmp_path / "p.jsonl"),
              "--reward_fn", "x:y", "--batch_size", "6", "--num_mini_batches", "4",
              "--output_dir", str(tmp_path / "run")])
    assert error.value.code == 2
    assert "minibatch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- two processes ------------------------------------------------------------------------------------------------
#
# A launch spends about 15 s before its first step: the launcher and both processes import torch, transformers and
# peft. So each accelerate config that several tests need is launched once per module (the `*_launch` fixtures):
# its launch runs all their update cases and `ppo-lm` commands one after the other (distributed_worker.py's plan),
# and each test checks its own part. A resume runs in the same launch as its run, on a copy of the run's folder
# (the test reads the run as it ended, then the copy as resumed). A run that ends its launch (stopped by SIGTERM, or
# failing in one process) is the last step of a launch: the replicated resumes of the stopped run follow in a second
# replicated launch, which a failing run ends. Only the one other accelerate config is launched by its test itself.


@dataclass
class UpdateCase:
    """One update split over two processes: the settings; the weights before; the update run here in one process
    (the weights after, its statistics and the rollout's); the file that the launch's main process writes."""

    settings: dict
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    update_stats: dict
    statistics: dict
    out: Path


@dataclass
class SharedLaunch:
    """A launch that several tests share: its folder, exit status, output and time it ended (time.time()), and its
    update cases by test id."""

    directory: Path
    returncode: int
    stdout: str
    stderr: str
    ended: float
    updates: dict[str, UpdateCase]


LAUNCHES = {"replicated_launch": REPLICATED, "second_replicated_launch": REPLICATED,
            "reward_failure_launch": REPLICATED, "sharded_launch": SHARDED, "deepspeed_zero2_launch": DEEPSPEED_ZERO2,
            "deepspeed_zero3_launch": DEEPSPEED_ZERO3}
"""The shared launches: fixture name -> its `accelerate launch` options."""

UPDATE_CASES = {
    "replicated": ("replicated_launch", {}),
    # FSDP, with the bottom layer frozen and cached: a forward pass of the update skips one of the sharded layers.
    "sharded": ("sharded_launch", {"lora_layers": [1], "lora_target_modules": ["q_proj", "v_proj", "down_proj"]}),
    # DeepSpeed clips the policy and value gradients together: no clipping here, in either run. ZeRO-2 with full
    # fine-tuning (the engine holds the policy, the value model and its head); its second epoch passes target_kl,
    # so it takes no step (under DeepSpeed, checked before its gradients).
    "deepspeed-zero2": ("deepspeed_zero2_launch", {"max_grad_norm": 1e6, "target_kl": 1e-6, "use_lora": False}),
    "deepspeed-zero3": ("deepspeed_zero3_launch", {"max_grad_norm": 1e6}),
    # GRPO with groups of 2 (each process holds whole groups), its std over the whole batch, the KL in the loss and
    # each response's token mean counting the same: every denominator is summed over both processes.
    "grpo-groups": ("replicated_launch", {"advantage_estimator": "grpo", "num_generations": 2, "scale_rewards": "batch",
                                          "kl_coef": 0.0, "kl_loss_coef": 0.1, "loss_aggregation": "sequence_mean"}),
    # The critic-free estimators under the sharding launches: no value model to shard or hand to the engine.
    "rloo-sharded": ("sharded_launch", {"advantage_estimator": "rloo", "num_generations": 2, "kl_coef": 0.0,
                                        "kl_loss_coef": 0.1}),
    "grpo-deepspeed-zero3": ("deepspeed_zero3_launch", {"advantage_estimator": "grpo", "num_generations": 2,
                                                        "max_grad_norm": 1e6, "loss_aggregation": "sequence_sum"}),
    # The value model trained on its top layer only, its bottom layer's output cached by the rollout: sharded, as
    # a LoRA adapter on the policy's base and as a value backbone with frozen embeddings and bottom layer.
    "value-layers-sharded": ("sharded_launch", {"value_layers": 1}),
    "value-layers-sharded-full": ("sharded_launch", {"value_layers": 1, "use_lora": False}),
    # The same under DeepSpeed (no clipping, as above): ZeRO-3 with LoRA, ZeRO-2 with full fine-tuning, whose engine
    # holds a value backbone with frozen parameters beside its trained ones.
    "value-layers-deepspeed-zero3": ("deepspeed_zero3_launch", {"value_layers": 1, "max_grad_norm": 1e6}),
    "value-layers-deepspeed-zero2-full": ("deepspeed_zero2_launch", {"value_layers": 1, "use_lora": False,
                                                                     "max_grad_norm": 1e6}),
}
"""The update cases by test id: the shared launch that runs each, and its PPOConfig fields over the common ones."""


def prepare_update_case(directory: Path, model_dir: str, extra: dict) -> tuple[UpdateCase, list[str]]:
    """Make the case's rollout in this process, write the case file for the launch, then run the update here.
    Returns the case and its step of the launch's plan."""
    # float32 products (mixed_precision: no): the two launches are compared at float32 tolerances.
    settings = dict(model_name=model_dir, batch_size=8, max_new_tokens=6, learning_rate=1e-3,
                    value_learning_rate=1e-3, device="cpu", seed=0, ppo_epochs=2, num_mini_batches=1,
                    micro_batch_size=3, mixed_precision="no", **extra)
    trainer = PPOTrainer(PPOConfig(**settings), reward_fn=length_reward)
    rollout = trainer.make_rollout(PROMPTS[: settings["batch_size"] // settings.get("num_generations", 1)])
    before = {name: tensor.detach().clone() for name, tensor in trainer.models.named_trainable().items()}
    case_file, out = directory / "case.pt", directory / "out.pt"
    torch.save({"config": settings, "weights": before, "rollout": rollout}, case_file)
    update_stats = trainer.update(rollout)
    statistics = rollout.statistics()  # after the update, as a step takes them (its first pass may give old logprobs)
    after = {name: tensor.detach().clone() for name, tensor in trainer.models.named_trainable().items()}
    return UpdateCase(settings, before, after, update_stats, statistics, out), ["update", str(case_file), str(out)]


def run_shared_launch(directory: Path, model_dir: str, name: str, steps: list[list[str]],
                      stop_when: Path | None = None, fails: bool = False, timeout: float = 600) -> SharedLaunch:
    """Launch `name` once: first its update cases, then `steps` (distributed_worker.py's plan), in the same two
    processes; it must succeed. With `stop_when`, the launch gets SIGTERM once that file appears; with `fails`, its
    last step is meant to fail: the exit status is then the test's to check (an earlier step that fails ends the
    launch before `stop_when` appears, and fails here)."""
    # The launch starts first: its processes import while this one prepares the update cases (the worker waits for
    # the plan file).
    plan_file = directory / "plan.json"
    run = Launch.start([str(WORKER), str(plan_file)], directory, LAUNCHES[name])
    try:
        updates, plan = {}, []
        for case_id, (launch_name, extra) in UPDATE_CASES.items():
            if launch_name == name:
                (directory / case_id).mkdir()
                updates[case_id], step = prepare_update_case(directory / case_id, model_dir, extra)
                plan.append(step)
        plan_file.with_suffix(".part").write_text(json.dumps(plan + steps))
        plan_file.with_suffix(".part").rename(plan_file)  # whole when the worker sees it
        if stop_when is not None:
            wait_for(stop_when, run.process)
            run.process.send_signal(signal.SIGTERM)
    except BaseException:
        run.stop()
        print(run.output()[1][-5000:], file=sys.stderr)  # pytest shows it with the error
        raise
    stdout, stderr = run.end(timeout)
    if stop_when is None and not fails:
        assert run.process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return SharedLaunch(directory, run.process.returncode, stdout, stderr, time.time(), updates)


def resume_a_copy(run_dir: Path, copy_dir: Path, *options: str, left_out: tuple[str, ...] = (),
                  checkpoint: str = "") -> list[list[str]]:
    """The plan's steps that copy `run_dir` (without the entries named in `left_out`) and resume the copy with
    `ppo-lm train --resume ... OPTIONS`: from its newest checkpoint, or from the copy's `checkpoint` if named."""
    return [["copy", str(run_dir), str(copy_dir), *left_out],
            ["ppo-lm", "train", "--resume", str(copy_dir / checkpoint), *options]]


def printed_summaries(launch_output: str, run_dir: Path) -> int:
    """How many closing summaries of the run in `run_dir` a launch printed (each names its checkpoint first)."""
    return launch_output.count(f"checkpoint: {run_dir}{os.sep}")


@pytest.fixture(scope="module")
def replicated_launch(tmp_path_factory, tiny_model_dir) -> SharedLaunch:
    """The replicated launch: its update cases; a 2-step train run (`train/run`), which
    test_a_two_process_train_run_checkpoints_resumes_and_logs_once resumes; the 3-step run (`sigterm/straight`)
    that the SIGTERM test's stopped and resumed run must end like; and last that run again (`sigterm/stopped`),
    whose launch gets SIGTERM in its step 2 (no evaluation: reward call 2 is step 2). The SIGTERM runs take a token
    budget of 1 (`micro_batch_tokens`): every pass, the prompts' prefill included, runs row by row, so each process
    prefills its rows in groups (`generation.prefilled_cache`) under the launch."""
    directory = tmp_path_factory.mktemp("replicated-launch")
    train, sigterm, marks = directory / "train", directory / "sigterm", directory / "marks"
    for folder in (train, sigterm, marks):
        folder.mkdir()
    config = write_ppo_run(train, tiny_model_dir, output_dir=str(train / "run"), total_steps=2, eval_steps=1,
                           save_steps=1)
    write_ppo_run(sigterm, tiny_model_dir, total_steps=3, save_steps=0, eval_fraction=0.0,
                  micro_batch_tokens=1)
    write_pausing_reward(sigterm)
    sigterm_run = ["ppo-lm", "train", "--config", str(sigterm / "config.yaml"), "--output_dir"]
    steps = [["ppo-lm", "train", "--config", str(config)], [*sigterm_run, str(sigterm / "straight")],
             ["setenv", "PAUSE_DIR", str(marks)], ["setenv", "PAUSE_AT", "2"], ["setenv", "PAUSE_SECONDS", "3"],
             [*sigterm_run, str(sigterm / "stopped")]]
    return run_shared_launch(directory, tiny_model_dir, "replicated_launch", steps, stop_when=marks / "1-2")


@pytest.fixture(scope="module")
def second_replicated_launch(replicated_launch, tiny_model_dir) -> SharedLaunch:
    """The replicated launch after the one stopped by SIGTERM: it resumes a copy of `train/run` for a third step
    (`train/resumed`) and a copy of the stopped run (`sigterm/resumed`); then a run whose process 1 fails in its
    update (`fails-in-update`, see failing_run) ends it."""
    train, sigterm = replicated_launch.directory / "train", replicated_launch.directory / "sigterm"
    directory = replicated_launch.directory / "second"
    directory.mkdir()
    steps = [*resume_a_copy(train / "run", train / "resumed", "--total_steps", "3"),
             *resume_a_copy(sigterm / "stopped", sigterm / "resumed"), failing_run(directory, tiny_model_dir, "update")]
    return run_shared_launch(directory, tiny_model_dir, "second_replicated_launch", steps, fails=True)


def sft_command(model_dir: str, data: str, run_dir: Path, lora: str) -> list[str]:
    """`ppo-lm sft` for 3 steps on `data`, with LoRA (merged into the final model) or full fine-tuning."""
    return ["sft", "--model_name", model_dir, "--dataset", data, "--batch_size", "4", "--learning_rate",
            "0.003" if lora == "true" else "0.001", "--use_lora", lora, "--total_steps", "3", "--eval_steps", "0",
            "--save_steps", "0", "--eval_fraction", "0.2", "--sample_max_new_tokens", "4", "--max_eval_samples", "2",
            "--report_to", "none", "--output_dir", str(run_dir)]


@pytest.fixture(scope="module")
def sharded_launch(tmp_path_factory, tiny_model_dir) -> SharedLaunch:
    """The FSDP launch (the shipped fsdp.yaml): its update cases; the SFT runs with LoRA (`sft-true`) and full
    fine-tuning (`sft-false`); the LoRA reward run (`reward-run`); the 3-step full fine-tuning PPO run (`full/run`);
    and a copy of that run without its checkpoint-3 (as if stopped after checkpoint-2), resumed (`full/resumed`)."""
    from rlhf_data import preference_rows, sft_rows, write_jsonl

    directory = tmp_path_factory.mktemp("sharded-launch")
    sft_data = write_jsonl(directory / "sft.jsonl", sft_rows(20))
    preferences = write_jsonl(directory / "pref.jsonl", preference_rows(24, seed=1))
    reference = write_jsonl(directory / "reference.jsonl", sft_rows(6))
    (directory / "full").mkdir()
    config = write_ppo_run(directory / "full", tiny_model_dir, output_dir=str(directory / "full" / "run"),
                           total_steps=3, eval_steps=0, save_steps=1, use_lora=False, learning_rate=1e-4,
                           lr_scheduler="linear")
    steps = [["ppo-lm", *sft_command(tiny_model_dir, sft_data, directory / f"sft-{lora}", lora)]
             for lora in ("true", "false")]
    steps.append(["ppo-lm", "reward", "--model_name", tiny_model_dir, "--dataset", preferences, "--batch_size", "4",
                  "--learning_rate", "0.003", "--use_lora", "true", "--total_steps", "2", "--eval_steps", "0",
                  "--save_steps", "0", "--eval_fraction", "0.2", "--max_eval_samples", "2", "--report_to", "none",
                  "--reference_dataset", reference, "--output_dir", str(directory / "reward-run")])
    steps.append(["ppo-lm", "train", "--config", str(config)])
    steps += resume_a_copy(directory / "full" / "run", directory / "full" / "resumed", left_out=("checkpoint-3",))
    return run_shared_launch(directory, tiny_model_dir, "sharded_launch", steps)


@pytest.fixture(scope="module")
def deepspeed_zero2_launch(tmp_path_factory, tiny_model_dir) -> SharedLaunch:
    """The DeepSpeed ZeRO-2 launch (the shipped config): its update case."""
    return run_shared_launch(tmp_path_factory.mktemp("deepspeed-zero2-launch"), tiny_model_dir,
                             "deepspeed_zero2_launch", [])


@pytest.fixture(scope="module")
def deepspeed_zero3_launch(tmp_path_factory, tiny_model_dir) -> SharedLaunch:
    """The DeepSpeed ZeRO-3 launch (the shipped config): its update cases; the 3-step train run (`run`); and a
    whole copy of that run resumed from its checkpoint-2 (`resumed`), which redoes step 3. The run's token budget of
    1 (`micro_batch_tokens`) gives every row a pass of its own and makes the prompts' prefill run in groups
    (`generation.prefilled_cache`) on the gathered weights, a group per row wherever a process has two or more."""
    directory = tmp_path_factory.mktemp("deepspeed-zero3-launch")
    config = write_ppo_run(directory, tiny_model_dir, output_dir=str(directory / "run"), total_steps=3, eval_steps=2,
                           save_steps=1, max_new_tokens=6, micro_batch_tokens=1, target_kl=10.0)
    steps = [["ppo-lm", "train", "--config", str(config)],
             *resume_a_copy(directory / "run", directory / "resumed", checkpoint="checkpoint-2")]
    return run_shared_launch(directory, tiny_model_dir, "deepspeed_zero3_launch", steps)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(UPDATE_CASES))
def test_an_update_split_over_two_processes_gives_the_weights_of_one_process(request, tiny_model_dir, case_id):
    launch_name, extra = UPDATE_CASES[case_id]
    case = request.getfixturevalue(launch_name).updates[case_id]
    sharding, before, after, update_stats, statistics = (LAUNCHES[launch_name], case.before, case.after,
                                                          case.update_stats, case.statistics)
    result = torch.load(case.out, weights_only=False)
    assert result["processes"] == 2 and result["device"] == "cpu" and result["sharded"] == (sharding == SHARDED)
    assert max(result["whitening_error"]) < 1e-5
    # a second update, undone, left every process's weights and optimizer state as the first update left them
    assert result["undone"] == ([None, None] if "deepspeed" in str(sharding) else [True, True])
    assert any(not torch.equal(before[name], after[name]) for name in after)  # the update moved the weights
    assert update_stats["ppo_epochs_run"] == (1 if "target_kl" in extra else 2)
    for name, tensor in after.items():
        # Float tolerance, scaled to how far the update moved the tensor: Adam divides each gradient by its running
        # size, so a gradient component near zero turns summation-order rounding into a visible (still tiny) step.
        # Hence the test: the two updates differ by under 1% of the update's size, tensor by tensor.
        step = (tensor - before[name]).norm().item()
        difference = (result["weights"][name] - tensor).norm().item()
        assert difference <= 1e-2 * step + 1e-7, (name, difference, step)
    # The checkpoint state holds the whole updated tensors, and the policy adapter that peft loads.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = load_file(str(case.out.with_suffix(".state") / "trainable.safetensors"))
    assert saved.keys() == result["weights"].keys()
    assert all(torch.equal(saved[name], result["weights"][name]) for name in saved)
    if extra.get("use_lora", True):
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           str(case.out.with_suffix(".state") / "policy"))
        for name, tensor in policy.named_parameters():
            if "lora_" in name:
                assert torch.equal(tensor, result["weights"][f"policy.{name}"]), name
    # grad_norm is the norm of every trained gradient before clipping, under every backend.
    critic_free = "advantage_estimator" in extra
    assert ("value_loss" in update_stats) != critic_free and ("kl_loss" in update_stats) == ("kl_loss_coef" in extra)
    names = ("policy_loss", "approx_kl", "ppo_epochs_run", "grad_norm", "value_loss", "kl_loss")
    for name in (name for name in names if name in update_stats):
        assert result["update_stats"][name] == pytest.approx(update_stats[name], rel=1e-4, abs=1e-6), name
    names = ("reward_mean", "reward_std", "kl", "entropy", "response_length", "eos_fraction",
             "zero_variance_groups" if critic_free else "value_mean")
    for name in names:
        assert result["statistics"][name] == pytest.approx(statistics[name], rel=1e-5, abs=1e-6), name
    assert result["statistics"]["generated_texts"] == statistics["generated_texts"]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_two_process_train_run_checkpoints_resumes_and_logs_once(replicated_launch, second_replicated_launch,
                                                                   capsys):
    run_dir = replicated_launch.directory / "train" / "run"
    assert printed_summaries(replicated_launch.stdout, run_dir) == 1  # the summary is printed once
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in metrics if "reward_mean" in line]
    eval_steps = [line["step"] for line in metrics if "eval/reward_mean" in line]
    assert train_steps == [1, 2] and eval_steps == [0, 1, 2]  # one line per step: only the main process logs
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (run_dir / "report.png").is_file()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["step"] == 0]) == 3  # 3 eval prompts, split 1 + 2 over the processes

    run_dir = run_dir.with_name("resumed")  # the run resumed with --total_steps 3 (a copy: second_replicated_launch)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics if "reward_mean" in line] == [1, 2, 3]
    assert (run_dir / "checkpoint-3" / "checkpoint.json").is_file()

    # The same run in one process cannot continue these two processes' generators: a clear error, nothing written.
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    code = main(["train", "--resume", str(run_dir), "--total_steps", "4"])
    assert code == 2
    assert "written by a run of 2 process(es); this one has 1" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == checkpoints


@pytest.mark.distributed
@pytest.mark.slow
def test_a_deepspeed_zero3_run_generates_on_gathered_weights_and_resumes_where_it_stopped(deepspeed_zero3_launch,
                                                                                         tmp_path, tiny_model_dir):
    # ZeRO-3 partitions the policy (base and both adapters) and the value head. Generation and evaluation run on
    # gathered weights although the processes' responses end at different lengths (3 eval prompts: 1 + 2), and
    # the approximate-KL check runs before each minibatch. Resuming from checkpoint-2 redoes step 3 as it was.
    from ppo_lm.checkpoint import CheckpointError
    from ppo_lm.export import export_policy

    run_dir, resumed_dir = deepspeed_zero3_launch.directory / "run", deepspeed_zero3_launch.directory / "resumed"
    assert printed_summaries(deepspeed_zero3_launch.stdout, run_dir) == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics if "reward_mean" in line] == [1, 2, 3]
    assert [line["step"] for line in metrics if "eval/reward_mean" in line] == [0, 2, 3]
    assert all(line["ppo_epochs_run"] == 2 and line["grad_norm"] > 0 for line in metrics if "reward_mean" in line)
    assert sorted(p.name for p in (run_dir / "checkpoint-2" / "deepspeed" / "state").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    uninterrupted = load_file(str(run_dir / "checkpoint-3" / "trainable.safetensors"))
    at_two = load_file(str(run_dir / "checkpoint-2" / "trainable.safetensors"))
    assert any(not torch.equal(uninterrupted[name], at_two[name]) for name in at_two)  # step 3 trained

    # The copy resumed from its checkpoint-2 (its checkpoint-3 was there too) redoes step 3 over it.
    assert f"Resuming from {resumed_dir / 'checkpoint-2'} at step 2." in deepspeed_zero3_launch.stderr
    resumed = load_file(str(resumed_dir / "checkpoint-3" / "trainable.safetensors"))
    for name, tensor in uninterrupted.items():
        step = (tensor - at_two[name]).norm().item()
        assert (resumed[name] - tensor).norm().item() <= 1e-3 * step + 1e-7, name
    metrics = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics if "reward_mean" in line] == [1, 2, 3]
    export_policy(resumed_dir / "checkpoint-3", tmp_path / "exported")  # the whole weights, as from any checkpoint
    assert (tmp_path / "exported" / "model.safetensors").is_file()

    # A DeepSpeed checkpoint does not resume without DeepSpeed: a clear error, before any weight changes.
    trainer = PPOTrainer(PPOConfig(model_name=tiny_model_dir, batch_size=4, max_new_tokens=4, device="cpu"),
                         reward_fn=length_reward)
    with pytest.raises(CheckpointError, match="written by a run with DeepSpeed.*launched without it"):
        trainer.load_state(resumed_dir / "checkpoint-3")


@pytest.mark.distributed
@pytest.mark.slow
def test_a_sharded_full_fine_tuning_run_checkpoints_resumes_and_exports_whole_weights(sharded_launch, tmp_path,
                                                                                       tiny_model_dir):
    # FSDP over 2 processes shards the policy, the reference, the value model and its head; checkpoints hold the
    # whole tensors, and the resumed run (sharded again) goes on from them.
    from ppo_lm.export import export_policy

    run_dir, resumed_dir = sharded_launch.directory / "full" / "run", sharded_launch.directory / "full" / "resumed"
    assert printed_summaries(sharded_launch.stdout, run_dir) == 1
    saved = load_file(str(run_dir / "checkpoint-2" / "trainable.safetensors"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    for name, tensor in base.items():
        assert saved[f"policy.{name}"].shape == tensor.shape, name  # whole, not one process's shard
    assert any(not torch.equal(saved[f"policy.{name}"], tensor) for name, tensor in base.items())  # it trained
    assert saved["value_head.weight"].shape == (1, 64)

    # The same run stopped after its step-2 checkpoint (`resumed`: a copy without checkpoint-3), resumed (sharded
    # again): the same metrics and weights.
    def train_lines(directory: Path) -> list[dict]:
        lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines if "reward_mean" in line]

    # the copy was resumed where its checkpoint-3 was left out, so step 3 ran again
    assert f"Resuming from {resumed_dir / 'checkpoint-2'} at step 2." in sharded_launch.stderr
    straight, resumed_lines = train_lines(run_dir), train_lines(resumed_dir)
    assert [line["step"] for line in resumed_lines] == [1, 2, 3]
    for a, b in zip(straight, resumed_lines, strict=True):
        assert a.keys() == b.keys()
        for key in a:  # the learning rate of the linear schedule included
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    final, resumed = (load_file(str(d / "checkpoint-3" / "trainable.safetensors")) for d in (run_dir, resumed_dir))
    assert final.keys() == resumed.keys()
    for name in final:
        torch.testing.assert_close(final[name], resumed[name], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(resumed[name], saved[name]) for name in saved)  # step 3 trained
    export_policy(resumed_dir / "checkpoint-3", tmp_path / "exported")  # loads into the plain model, shapes checked
    assert (tmp_path / "exported" / "model.safetensors").is_file()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_sharded_lora_run_in_bfloat16_generates_evaluates_and_saves_the_policy_adapter(tmp_path, tiny_model_dir):
    # The LoRA path under FSDP: peft's generate and the value model enter the sharded model below its root (the first
    # forward pass is generation's), and so does the prompts' prefill in groups, which a token budget of 1 makes
    # row by row (`generation.prefilled_cache` calls the body); bfloat16 base weights share FSDP units with float32
    # adapters; gradient checkpointing.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    config = write_ppo_run(tmp_path, tiny_model_dir, output_dir=str(run_dir), total_steps=2, eval_steps=1,
                           save_steps=0, dtype="bfloat16", gradient_checkpointing=True, micro_batch_tokens=1)
    launch(["-m", "ppo_lm", "train", "--config", str(config)], cwd=tmp_path,
           sharding=SHARDED_KEPT_FOR_BACKWARD)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics if "eval/kl" in line] == [0, 1, 2]
    assert [line["step"] for line in metrics if "reward_mean" in line] == [1, 2]
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(run_dir / "checkpoint-2" / "policy"))
    assert any(torch.count_nonzero(p) for n, p in policy.named_parameters() if "lora_B" in n)  # trained


# (The replicated SFT launch was dropped to keep the suite near 10 minutes: the 2-process PPO tests cover the
# replicated all-reduce, and these the fine-tuning loop over processes.)
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("lora", ["true", "false"], ids=["sharded-lora-merged", "sharded-full"])
def test_a_two_process_sft_run_trains_logs_once_and_writes_one_final_model(sharded_launch, lora):
    run_dir = sharded_launch.directory / f"sft-{lora}"
    assert printed_summaries(sharded_launch.stdout, run_dir) == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics if "loss" in line] == [1, 2, 3]
    evals = [line for line in metrics if "eval/loss" in line]
    assert [line["step"] for line in evals] == [0, 3] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    from transformers import AutoModelForCausalLM

    assert (run_dir / "final" / "model.safetensors").is_file()
    # The final model is whole: every weight of the architecture is in the file, at its shape.
    _, info = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info


@pytest.mark.distributed
@pytest.mark.slow
def test_a_sharded_lora_reward_run_normalises_and_writes_a_merged_model(sharded_launch):
    # The final model of a sharded LoRA reward run: the adapter merged into a base loaded again (a sharded model
    # cannot be copied), with the score_offset that normalisation set on the main process.
    from rlhf_data import sft_rows
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ppo_lm.finetune import encode_completions
    from ppo_lm.models import autocast_bodies, autocast_dtype, sequence_scores

    run_dir = sharded_launch.directory / "reward-run"
    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "final")).eval()
    assert model.config.score_offset != 0.0
    rows = sft_rows(6)
    batch = encode_completions(AutoTokenizer.from_pretrained(str(run_dir / "final")), [r["prompt"] for r in rows],
                               [r["completion"] for r in rows], 512)
    # The run normalised in its own precision ('auto': bfloat16 bodies on a CPU with bfloat16 instructions), with the
    # adapter beside its base; the merged model rounds differently there (1.5 % of the scores' spread on a 2-core AMX
    # Xeon, 0.03 % on an AVX-512 EPYC). Scored either way, the reference rows average 0 within 2 % of their spread,
    # where the offset the run found is several spreads away from 0.
    with torch.no_grad():
        plain = sequence_scores(model, batch.input_ids, batch.attention_mask)
        autocast_bodies([model], torch.device("cpu"), autocast_dtype("auto", torch.device("cpu"), torch.float32))
        as_in_the_run = sequence_scores(model, batch.input_ids, batch.attention_mask)
    spread = plain.std().item()
    assert abs(model.config.score_offset) > 2 * spread
    assert as_in_the_run.mean().item() == pytest.approx(0.0, abs=0.02 * spread)
    assert plain.mean().item() == pytest.approx(0.0, abs=0.02 * spread)


def test_buckets_keep_order_and_respect_the_size_limit(monkeypatch):
    import ppo_lm.distributed as distributed

    monkeypatch.setattr(distributed, "BUCKET_ELEMENTS", 10)
    tensors = [torch.zeros(n) for n in (4, 4, 4, 30, 1)]
    groups = distributed._buckets(tensors)
    assert [[t.numel() for t in group] for group in groups] == [[4, 4], [4], [30], [1]]


# --- one process fails --------------------------------------------------------------------------------------------


FAILING_REWARD = '''\
"""A length reward that fails on process 1 in step 2: in the reward itself, or in the backward pass that follows."""
import os
import threading
import time

import torch

calls = 0


def fail(error):
    with open({stamp!r}, "w") as handle:
        handle.write(repr(time.time()))
    raise error


def backward_that_runs_out_of_memory(*args, **kwargs):
    fail(torch.OutOfMemoryError("simulated: out of memory in the update on process 1"))


def reward(prompts, completions):
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == 2:  # no evaluation in this run: the second call is step 2's
        if {where!r} == "reward":
            # A client library's worker thread (not a daemon) is still running: the interpreter would wait for it
            # at exit, and process 0 for process 1 in its next collective.
            threading.Thread(target=time.sleep, args=(3600,)).start()
            fail(RuntimeError("simulated: the reward service is unreachable from process 1"))
        torch.Tensor.backward = backward_that_runs_out_of_memory
    return [len(c) / 10 for c in completions]
'''


def failing_run(directory: Path, model_dir: str, where: str) -> list[str]:
    """The plan step of a 4-step run (a checkpoint each step, no evaluation) in `directory`/fails-in-`where`, whose
    process 1 fails in step 2: in the reward function (`where` "reward") or in the update ("update"). The failing
    process writes the time to `failed_at` there."""
    directory = directory / f"fails-in-{where}"
    directory.mkdir()
    reward = directory / "failing_reward.py"
    reward.write_text(FAILING_REWARD.format(stamp=str(directory / "failed_at"), where=where))
    config = write_ppo_run(directory, model_dir, output_dir=str(directory / "run"), total_steps=4, save_steps=1,
                           eval_fraction=0.0, reward_fn=f"{reward}:reward")
    return ["ppo-lm", "train", "--config", str(config)]


@pytest.fixture(scope="module")
def reward_failure_launch(tmp_path_factory, tiny_model_dir) -> SharedLaunch:
    """A replicated launch of one run, whose process 1 fails in its reward (see failing_run). A launch still running
    after 2 minutes fails (the agent should end it within seconds)."""
    directory = tmp_path_factory.mktemp("reward-failure-launch")
    return run_shared_launch(directory, tiny_model_dir, "reward_failure_launch",
                             [failing_run(directory, tiny_model_dir, "reward")], fails=True, timeout=120)


FAILING_LAUNCHES = {"reward": "reward_failure_launch", "update": "second_replicated_launch"}
"""Where process 1 fails -> the shared launch whose last run fails there."""


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("where, message", [
    ("reward", "RuntimeError: simulated: the reward service is unreachable from process 1"),
    ("update", "OutOfMemoryError: simulated: out of memory in the update on process 1"),
], ids=["reward", "update"])
def test_a_process_that_fails_ends_the_whole_launch_within_seconds_with_its_error(request, where, message):
    # Process 1 fails in step 2 while process 0 goes on to its next collective. The failing process ends at once
    # and torchrun's agent stops the other, instead of leaving it in the collective until its timeout (30 minutes).
    from ppo_lm.checkpoint import checkpoint_problem, find_checkpoint

    failed = request.getfixturevalue(FAILING_LAUNCHES[where])
    directory, output = failed.directory / f"fails-in-{where}", failed.stdout + failed.stderr
    run_dir = directory / "run"
    assert failed.returncode != 0, output[-5000:]
    assert failed.ended - float((directory / "failed_at").read_text()) < 30, output[-5000:]
    assert f"error (process 1 of 2): {'RewardFunctionError: ' if where == 'reward' else ''}" in output
    assert message in output
    # Step 1's checkpoint is whole, and it is what --resume takes; step 2's was never begun.
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert find_checkpoint(run_dir) == run_dir / "checkpoint-1" and checkpoint_problem(run_dir / "checkpoint-1") is None


def test_the_first_process_to_fail_is_recorded_once_in_the_launch_store(monkeypatch):
    # What torchrun's agent store holds for the processes: the first to claim a failure is named; a later claim
    # (a process whose collective lost that peer) gets the first one's index; a restarted attempt starts afresh.
    # Without the agent's store nothing is known, and without a process group end_failed_process does nothing.
    from ppo_lm import distributed

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert distributed.failed_process() is None
    assert distributed._claim_first_failure(1) == 1
    assert distributed._claim_first_failure(0) == 1
    assert distributed.failed_process() == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.failed_process() is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # the store may have died with a failed process
    assert distributed._claim_first_failure(0) is None and distributed.failed_process() is None
    assert not torch.distributed.is_initialized()
    distributed.end_failed_process(RuntimeError("one process"), exit_code=1)  # returns: nothing to end


def test_a_checkpoint_that_a_failed_launch_left_unsealed_is_never_resumed_from(tmp_path):
    # A process that fails during a save ends its launch before the main process renames the checkpoint into place:
    # what is left is `.checkpoint-<step>.partial`, with or without its manifest (it is written just before the
    # rename). Resuming and `ppo-lm verify` see only the sealed checkpoints.
    from ppo_lm.checkpoint import MANIFEST, find_checkpoint, open_checkpoint, seal_checkpoint, verify

    run_dir = tmp_path / "run"
    (open_checkpoint(run_dir, 1) / "trainable.safetensors").write_bytes(b"step 1")
    sealed = seal_checkpoint(run_dir, 1)
    for step, manifest in ((2, False), (3, True)):
        partial = open_checkpoint(run_dir, step)
        (partial / "trainable.safetensors").write_bytes(f"step {step}".encode())
        if manifest:
            (partial / MANIFEST).write_text((sealed / MANIFEST).read_text().replace('"step": 1', '"step": 3'))
    assert find_checkpoint(run_dir) == sealed
    assert verify(run_dir) == [(sealed, None)]


# --- stopping on a signal ----------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_saves_every_part_and_resume_ends_like_a_straight_run(
        replicated_launch, second_replicated_launch):
    # The launcher passes the signal on to its processes; each finishes step 2, takes its part in checkpoint-2 and
    # stops. The resumed launch then ends where an uninterrupted one does (the replicated launch ran that one, with
    # the same config and reward, before the stopped one).
    files = replicated_launch.directory / "sigterm"
    straight, stopped, resumed = files / "straight", files / "stopped", files / "resumed"
    stderr = replicated_launch.stderr
    assert replicated_launch.returncode != 0  # torchrun's agent reports the signal as its own failure (status 1)
    assert stderr.count(f"Stopped by SIGTERM after step 2: checkpoint-2 is saved in {stopped}") == 1, stderr[-5000:]
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-2"]
    assert verify(stopped) == [(stopped / "checkpoint-2", None)]
    assert len(load_state(stopped / "checkpoint-2", "loop_state")["rng"]) == 2  # each process's generators

    # `resumed`: a copy of the stopped run, resumed by second_replicated_launch
    lines = [[json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
             for run_dir in (straight, resumed)]
    assert [m["step"] for m in lines[0]] == [m["step"] for m in lines[1]] == [1, 2, 3]
    for a, b in zip(*lines, strict=True):
        for key in a.keys() - {key for key in a if key.startswith("time/")}:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["step"], key)
    final = [load_file(str(run_dir / "checkpoint-3" / "trainable.safetensors")) for run_dir in (straight, resumed)]
    for name in final[0]:
        torch.testing.assert_close(final[0][name], final[1][name], atol=1e-6, rtol=0)
