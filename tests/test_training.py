"""`ppo-lm train` end to end on a tiny model: resume, checkpoints, export, report and bad input."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import write_ppo_run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo_lm import PPOConfig
from ppo_lm.checkpoint import CheckpointError, find_checkpoint
from ppo_lm.cli import main
from ppo_lm.runs import parse_config


@pytest.fixture()
def run_files(tmp_path, tiny_model_dir):
    """A prompts file, a reward function file and a config file for a 4-step run."""
    config = write_ppo_run(tmp_path, tiny_model_dir, total_steps=4, eval_steps=2, save_steps=2, device="cpu")
    return {"config": str(config), "prompts": tmp_path / "prompts.jsonl", "dir": tmp_path}


def read_metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def test_resumed_run_matches_the_straight_run(run_files):
    straight, halves = run_files["dir"] / "straight", run_files["dir"] / "halves"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(straight)]) == 0
    assert main(["train", "--config", run_files["config"], "--output_dir", str(halves), "--total_steps", "2"]) == 0
    assert main(["train", "--config", run_files["config"], "--output_dir", str(halves), "--resume"]) == 0

    straight_metrics, resumed_metrics = read_metrics(straight), read_metrics(halves)
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in straight_metrics]
    for a, b in zip(straight_metrics, resumed_metrics, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key != "learning_rate":
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    final_straight = load_file(str(straight / "checkpoint-4" / "trainable.safetensors"))
    final_resumed = load_file(str(halves / "checkpoint-4" / "trainable.safetensors"))
    assert final_straight.keys() == final_resumed.keys()
    for name in final_straight:
        torch.testing.assert_close(final_straight[name], final_resumed[name], atol=1e-6, rtol=1e-5)
    assert (straight / "report.png").stat().st_size > 10_000
    samples = (straight / "samples.md").read_text()
    assert "Question" in samples


def test_an_interrupted_checkpoint_is_skipped_on_resume(run_files, caplog):
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir)]) == 0
    # Simulate a crash while checkpoint-4 was being written: a weights file cut short.
    weights = run_dir / "checkpoint-4" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run_dir).name == "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "resuming from checkpoint-2" in caplog.text
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--resume"]) == 0
    assert [m["step"] for m in read_metrics(run_dir) if "reward_mean" in m] == [1, 2, 3, 4]


def test_resume_from_a_foreign_or_broken_directory_is_a_clear_error(run_files, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    with pytest.raises(CheckpointError, match="No checkpoint in"):
        find_checkpoint(foreign)
    broken = tmp_path / "checkpoint-7"
    broken.mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no such directory"):
        find_checkpoint(tmp_path / "missing")
    assert main(["train", "--config", run_files["config"], "--resume", str(foreign)]) == 2


def test_export_loads_without_peft_and_generates_the_same_greedy_text(run_files, tmp_path):
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir)]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(run_dir / "checkpoint-4"), str(out)]) == 0
    assert not (out / "adapter_config.json").exists()

    # The trained policy: base + the checkpoint's peft adapter.
    from peft import PeftModel

    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    base = AutoModelForCausalLM.from_pretrained(config["model_name"])
    policy = PeftModel.from_pretrained(base, str(run_dir / "checkpoint-4" / "policy")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    inputs = tokenizer(["Question 3: what is 3 plus 3?"], return_tensors="pt")
    expected = policy.generate(**inputs, do_sample=False, max_new_tokens=8)[0].tolist()

    # The exported model, in a process where peft cannot be imported.
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["peft"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        inputs = tokenizer(["Question 3: what is 3 plus 3?"], return_tensors="pt")
        print(json.dumps(model.generate(**inputs, do_sample=False, max_new_tokens=8)[0].tolist()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
    assert main(["export", str(run_dir / "checkpoint-4"), str(out)]) == 2  # not overwritten unasked


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


def test_unknown_field_errors(run_files, capsys):
    bad = run_files["dir"] / "bad.yaml"
    bad.write_text(run_files["dir"].joinpath("config.yaml").read_text() + "learning_rat: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    error = capsys.readouterr().err
    assert "Unknown field 'learning_rat'" in error and "Did you mean 'learning_rate'" in error
    with pytest.raises(SystemExit):
        main(["train", "--config", run_files["config"], "--learning_rat", "0.1"])
    error = capsys.readouterr().err
    assert "--learning_rat" in error and "--learning_rate" in error


@pytest.mark.parametrize(
    "dataset_text, override, message",
    [
        (None, "missing.jsonl", "does not exist"),
        ("", None, "empty"),
        ('{"text": "no prompt column"}\n', None, "prompt"),
    ],
)
def test_bad_data_is_an_error_before_any_model_loads(run_files, capsys, dataset_text, override, message):
    dataset = run_files["dir"] / (override or "data.jsonl")
    if dataset_text is not None:
        dataset.write_text(dataset_text)
    # A model name that cannot load: the data error must come first.
    code = main(["train", "--config", run_files["config"], "--dataset", str(dataset),
                 "--model_name", str(run_files["dir"] / "no-such-model"), "--output_dir",
                 str(run_files["dir"] / "run")])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "no-such-model" not in error


def test_invalid_field_value_on_the_command_line(run_files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", run_files["config"], "--top_p", "1.5"])
    assert exit_info.value.code == 2
    assert "top_p=1.5 is invalid" in capsys.readouterr().err


def test_yes_no_fields_take_true_and_false_spelled_as_in_yaml():
    config = parse_config(PPOConfig, {}, ["--eval_greedy", "true", "--use_lora=false", "--seed", "3"], "ppo-lm")
    assert config.eval_greedy is True and config.use_lora is False and config.seed == 3
    assert parse_config(PPOConfig, {"eval_greedy": True}, ["--eval_greedy", "False"], "ppo-lm").eval_greedy is False
    with pytest.raises(SystemExit):  # anything else is still refused, by tyro
        parse_config(PPOConfig, {}, ["--eval_greedy", "maybe"], "ppo-lm")


def test_help_lists_every_field_with_its_docstring_and_default(capsys):
    from ppo_lm.config import PPOConfig

    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train = capsys.readouterr().out
    for text in (top, train):
        flat = " ".join(text.replace("│", " ").split())  # undo the help's line wrapping
        for name in PPOConfig.field_names():
            assert f"--{name}" in flat, name
        assert "Sampling temperature." in flat and "(default: 0.95)" in flat
    assert "--resume" in train and "--overwrite" in train


def test_the_quickstart_config_runs_one_step(tiny_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config names files relative to the repo
    run_dir = tmp_path / "quickstart"
    assert main(["train", "--config", "configs/quickstart.yaml", "--model_name", tiny_model_dir,
                 "--output_dir", str(run_dir), "--total_steps", "1", "--batch_size", "2", "--max_new_tokens", "4",
                 "--report_to", "none", "--device", "cpu"]) == 0
    assert (run_dir / "checkpoint-1" / "checkpoint.json").is_file()
    prompts = [json.loads(line)["prompt"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert prompts and all(p.startswith("SUBREDDIT: r/") and p.endswith("TL;DR:") for p in prompts)


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


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    from ppo_lm.checkpoint import list_checkpoints, open_checkpoint, seal_checkpoint

    for step in (1, 2, 3):
        (open_checkpoint(tmp_path, step) / "weights.bin").write_bytes(b"x" * 10)
        seal_checkpoint(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temporary directory is left behind


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


def test_full_fine_tuning_run_exports_its_weights(run_files, tmp_path):
    run_dir = run_files["dir"] / "full"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--use_lora", "False",
                 "--total_steps", "1", "--eval_fraction", "0"]) == 0
    trained = load_file(str(run_dir / "checkpoint-1" / "trainable.safetensors"))
    out = tmp_path / "exported-full"
    assert main(["export", str(run_dir), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for name, tensor in trained.items():
        if name.startswith("policy."):
            torch.testing.assert_close(exported[name[len("policy."):]], tensor)
