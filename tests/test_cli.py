"""The `ppo-lm` command line: config files and overrides, --help, bad input refused before any model loads, and the
shipped configs run end to end (the quickstart; the TL;DR recipe chained sft -> reward -> ppo; the GSM8K recipe)."""

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from rlhf_data import preference_rows, sft_rows
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ppo_lm import PPOConfig
from ppo_lm.cli import main
from ppo_lm.config import RewardConfig, SFTConfig
from ppo_lm.runs import parse_config, read_config_file

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tldr"


def save_splits(path: Path, rows: list[dict]) -> str:
    """A saved DatasetDict with train and validation splits, the layout of the hub datasets the recipe names."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:-4]),
                          "validation": datasets.Dataset.from_list(rows[-4:])}).save_to_disk(str(path))
    return str(path)


# --- config files and overrides ---------------------------------------------------------------------------------------

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


def test_invalid_field_value_on_the_command_line(run_files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", run_files["config"], "--top_p", "1.5"])
    assert exit_info.value.code == 2
    assert "top_p=1.5 is invalid" in capsys.readouterr().err


def test_yes_no_fields_take_true_and_false_spelled_as_in_yaml(capsys):
    config = parse_config(PPOConfig, {}, ["--eval_greedy", "true", "--use_lora=false", "--seed", "3"], "ppo-lm")
    assert config.eval_greedy is True and config.use_lora is False and config.seed == 3
    assert parse_config(PPOConfig, {"eval_greedy": True}, ["--eval_greedy", "False"], "ppo-lm").eval_greedy is False
    with pytest.raises(SystemExit):  # anything else is still refused, by tyro
        parse_config(PPOConfig, {}, ["--eval_greedy", "maybe"], "ppo-lm")
    error = capsys.readouterr().err
    assert "--eval_greedy" in error and "maybe" in error


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


_BAD_VALUE_BEFORE_THE_MODEL_LIBRARIES = """
import sys
from ppo_lm.cli import main
loaded = [name for name in ("transformers", "peft") if name in sys.modules]
try:
    main(["train", "--model_name", "unused", "--top_p", "1.5"])
except SystemExit as stop:
    print(stop.code, loaded, [name for name in ("transformers", "peft") if name in sys.modules])
"""


def test_the_command_line_refuses_a_bad_value_before_importing_transformers_and_peft():
    """`ppo-lm --help` and a config's errors need neither model library: the command line's imports leave them out
    (about 4 s of the command's 6.3 s start on 2 CPU cores, benchmarks/RESULTS.md session 43), and the package's
    names load them on first use."""
    import subprocess
    import sys

    import ppo_lm

    result = subprocess.run([sys.executable, "-c", _BAD_VALUE_BEFORE_THE_MODEL_LIBRARIES], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split("\n")[0] == "2 [] []", result.stdout + result.stderr
    assert "top_p=1.5 is invalid" in result.stderr
    assert set(ppo_lm.__all__) <= set(dir(ppo_lm))
    assert all(getattr(ppo_lm, name).__module__.startswith("ppo_lm.") for name in ppo_lm.__all__)
    with pytest.raises(AttributeError, match="no attribute 'PPOTrainr'"):
        ppo_lm.PPOTrainr  # noqa: B018


# --- bad input, before any model loads --------------------------------------------------------------------------------

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


# --- the shipped configs, end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
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


@pytest.mark.parametrize("name, config_class", [("sft", SFTConfig), ("reward", RewardConfig), ("ppo", PPOConfig)])
def test_each_recipe_config_parses(name, config_class):
    config = config_class(**read_config_file(RECIPE / f"{name}.yaml", config_class))
    assert config.model_name and config.dataset and config.output_dir == f"runs/tldr/{name}"
    if name == "ppo":  # the published recipe's hyperparameters
        published = dict(learning_rate=3e-6, ppo_epochs=4, num_mini_batches=1, vf_coef=0.1, clip_epsilon=0.2,
                         value_clip=0.2, gamma=1.0, lam=0.95, kl_coef=0.05, max_new_tokens=53, temperature=0.7)
        assert {key: getattr(config, key) for key in published} == published
        assert (config.model_name, config.reward_model_name, config.value_model_name) == (
            "runs/tldr/sft/final", "runs/tldr/reward/final", "runs/tldr/reward/final")


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_each_stage_reading_the_previous_output(tmp_path, tiny_model_dir, monkeypatch):
    """sft.yaml, reward.yaml and ppo.yaml, one step each on local data of the hub datasets' schemas. Only sizes,
    data paths and the SFT base are overridden: each stage finds the previous one's `final/` where the recipe says."""
    sft_data = save_splits(tmp_path / "tldr", sft_rows(12))
    preference_data = save_splits(tmp_path / "tldr-preference", preference_rows(12))
    monkeypatch.chdir(tmp_path)  # the recipe's run directories are relative: runs/tldr/<stage>
    small = ["--total_steps", "1", "--batch_size", "2", "--max_eval_prompts", "2", "--report_to", "none",
             "--device", "cpu"]

    assert main(["sft", "--config", str(RECIPE / "sft.yaml"), "--model_name", tiny_model_dir, "--dataset", sft_data,
                 "--sample_max_new_tokens", "2", "--max_eval_samples", "1", *small]) == 0
    assert main(["reward", "--config", str(RECIPE / "reward.yaml"), "--dataset", preference_data,
                 "--reference_dataset", sft_data, *small]) == 0
    assert main(["train", "--config", str(RECIPE / "ppo.yaml"), "--dataset", sft_data, "--max_new_tokens", "4",
                 *small]) == 0

    sft_final, reward_final = tmp_path / "runs/tldr/sft/final", tmp_path / "runs/tldr/reward/final"
    AutoModelForCausalLM.from_pretrained(str(sft_final))
    reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_final))
    assert reward_model.config.num_labels == 1 and hasattr(reward_model.config, "score_offset")
    saved = __import__("yaml").safe_load((tmp_path / "runs/tldr/ppo/config.yaml").read_text())
    assert (saved["model_name"], saved["reward_model_name"]) == ("runs/tldr/sft/final", "runs/tldr/reward/final")
    metrics = [json.loads(line) for line in (tmp_path / "runs/tldr/ppo/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward_mean" in m] == [1]
    assert all(torch.isfinite(torch.tensor(m["eval/reward_mean"])) for m in metrics if "eval/reward_mean" in m)


# --- the GSM8K recipe (configs/gsm8k) --------------------------------------------------------------------------------

GSM8K = Path(__file__).resolve().parents[1] / "configs" / "gsm8k"
GSM8K_ROWS = Path(__file__).resolve().parent / "gsm8k_rows.jsonl"
"""Grade-school problems written for the tests, in the hub dataset's schema: question, and an answer that is the
worked solution with <<a*b=c>> calculator notes and a closing `#### <number>` line."""
GSM8K_REWARDS = ["ppo_lm.verifiable_rewards:math_answer", "ppo_lm.verifiable_rewards:gsm8k_answer_format"]


def gsm8k_rows() -> list[dict]:
    return [json.loads(line) for line in GSM8K_ROWS.read_text().splitlines()]


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_each_gsm8k_config_parses_with_the_recipe_settings(name):
    config = PPOConfig(**read_config_file(GSM8K / f"{name}.yaml", PPOConfig))
    assert (config.model_name, config.dataset, config.dataset_config, config.dataset_split, config.eval_split) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "openai/gsm8k", "main", "train", "test")
    assert (config.prompt_field, config.chat_template, config.output_dir) == ("question", True, f"runs/gsm8k/{name}")
    assert "step by step" in config.system_prompt and "#### " in config.system_prompt
    assert (config.reward_functions(), config.reward_weights) == (GSM8K_REWARDS, [1.0, 0.1])
    # Full fine-tuning in float32 (a bfloat16 weight would round a 1e-6 step away), veRL's learning rate, sampling
    # and token-mean loss, 512-token answers, greedy evaluation on the whole test split.
    shared = dict(use_lora=False, dtype="float32", learning_rate=1e-6, lr_scheduler="constant", ppo_epochs=1,
                  clip_epsilon=0.2, max_grad_norm=1.0, max_new_tokens=512, temperature=1.0, top_k=0, top_p=1.0,
                  missing_eos_penalty=None, loss_aggregation="token_mean", eval_greedy=True, max_eval_prompts=1319)
    if name == "ppo":  # veRL's one-GPU GSM8K quickstart (Qwen2.5-0.5B-Instruct), with a value model
        recipe = dict(advantage_estimator="gae", batch_size=256, num_mini_batches=4, micro_batch_size=8,
                      num_generations=1, value_learning_rate=1e-5, value_clip=0.5, kl_coef=0.001, kl_estimator="k1",
                      kl_loss_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=True, entropy_coef=0.001,
                      total_steps=435)
    else:  # veRL's GRPO GSM8K example scaled to one GPU, TRL's group of 8; the KL in the loss, not the reward
        recipe = dict(advantage_estimator="grpo", batch_size=512, num_mini_batches=2, micro_batch_size=16,
                      num_generations=8, scale_rewards="group", kl_coef=0.0, kl_loss_coef=0.001, entropy_coef=0.0,
                      total_steps=232)
    expected = {**shared, **recipe}
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.needs_value_model == (name == "ppo") and config.uses_reference
    assert config.items_per_step == {"ppo": 256, "grpo": 64}[name]  # questions per step


def test_the_bundled_gsm8k_rows_score_full_marks_with_their_own_solutions():
    """The rows' worked solutions, as completions, are right (math_answer reads the number after `####` on both
    sides) and in the asked-for form; a solution given to another row's question scores 0. Every calculator note
    <<expression=value>> is correct arithmetic."""
    from ppo_lm.verifiable_rewards import gsm8k_answer_format, math_answer

    rows = gsm8k_rows()
    assert len(rows) >= 8 and all(set(row) == {"question", "answer"} for row in rows)
    questions, answers = [row["question"] for row in rows], [row["answer"] for row in rows]
    assert math_answer(questions, answers, answer=answers) == [1.0] * len(rows)
    assert gsm8k_answer_format(questions, answers) == [1.0] * len(rows)
    shifted = answers[1:] + answers[:1]  # every final answer differs from the next row's
    assert math_answer(questions, shifted, answer=answers) == [0.0] * len(rows)
    for answer in answers:
        notes = re.findall(r"<<([^=>]+)=([^>]+)>>", answer)
        assert notes and answer.rsplit("\n", 1)[-1].startswith("#### ")
        for expression, value in notes:
            assert re.fullmatch(r"[\d.+\-*/() ]+", expression), expression
            assert abs(eval(expression) - float(value)) < 1e-9, (expression, value)  # digits and operators only


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_each_gsm8k_config_runs_one_step_on_the_bundled_rows(tmp_path, chat_model_dir, name):
    """The shipped config, one step on the bundled rows with the tiny chat model: only sizes, the model, the data
    (train and eval: the bundled file) and the device are overridden. Each question reaches the model in the chat
    template after the recipe's system prompt, and both reward functions read the answer column."""
    config = PPOConfig(**read_config_file(GSM8K / f"{name}.yaml", PPOConfig))
    run_dir = tmp_path / name
    sizes = {"ppo": ["--batch_size", "2", "--num_mini_batches", "1", "--micro_batch_size", "2"],
             "grpo": ["--batch_size", "4", "--num_generations", "2", "--num_mini_batches", "1",
                      "--micro_batch_size", "4"]}[name]
    assert main(["train", "--config", str(GSM8K / f"{name}.yaml"), "--model_name", chat_model_dir, "--dataset",
                 str(GSM8K_ROWS), "--eval_split", str(GSM8K_ROWS), "--output_dir", str(run_dir), *sizes,
                 "--max_new_tokens", "4", "--total_steps", "1", "--max_eval_prompts", "2", "--report_to", "none",
                 "--device", "cpu"]) == 0

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    questions = {row["question"] for row in gsm8k_rows()}
    opening = f"<|im_start|>system\n{config.system_prompt}<|im_end|>\n<|im_start|>user\n"
    closing = "<|im_end|>\n<|im_start|>assistant\n"
    assert len(samples) == 4  # two test questions, evaluated before and after the step
    for sample in samples:
        assert sample["prompt"].startswith(opening) and sample["prompt"].endswith(closing)
        assert sample["prompt"][len(opening):-len(closing)] in questions
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "reward_mean" in m)
    assert step["step"] == 1
    assert {"reward/math_answer", "reward/gsm8k_answer_format"} <= step.keys()
    assert all(0.0 <= step[key] <= 1.0 for key in ("reward/math_answer", "reward/gsm8k_answer_format"))
    assert ("value_loss" in step) == (name == "ppo")
    evaluation = [m for m in metrics if "eval/reward_mean" in m]
    for m in evaluation:  # each function's mean on the test questions; their weighted sum is the reward
        assert m["eval/reward_mean"] == pytest.approx(m["eval/reward/math_answer"]
                                                      + 0.1 * m["eval/reward/gsm8k_answer_format"])
    assert all({"reward/math_answer", "reward/gsm8k_answer_format"} <= sample.keys() for sample in samples)


# --- conversational prompts -------------------------------------------------------------------------------------------

ANSWER_REWARD = ("def reward(prompts, completions, answer):\n"
                 "    return [float(a in c) for c, a in zip(completions, answer)]\n")


def chat_rows(count: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}
            for i in range(count)]


@pytest.mark.parametrize("rows, reward, message", [
    ([{"prompt": [{"role": "wizard", "content": "Hi"}], "answer": "1"}], ANSWER_REWARD,
     "row 0: prompt, message 0 has the role 'wizard'"),
    ([{"prompt": [{"role": "user", "content": ["a", "list"]}], "answer": "1"}], ANSWER_REWARD,
     "message 0 (user) has content ['a', 'list'], not a string"),
    ([{"prompt": [{"role": "user", "content": "Hi"}], "solution": "1"}], ANSWER_REWARD,
     "'reward' needs the column(s) ['answer']"),
    (chat_rows(4), ANSWER_REWARD, "has no chat template"),  # tiny_model_dir's tokenizer has none
])
def test_bad_conversational_input_is_an_error_before_any_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch,
                                                                      rows, reward, message):
    import ppo_lm.ppo_trainer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(ppo_lm.ppo_trainer, "load_role_models", no_model)
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "reward.py").write_text(reward)
    code = main(["train", "--model_name", tiny_model_dir, "--dataset", str(dataset), "--reward_fn",
                 f"{tmp_path / 'reward.py'}:reward", "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_system_prompt_with_plain_text_prompts_is_an_error(run_files, capsys):
    code = main(["train", "--config", run_files["config"], "--system_prompt", "Be brief.", "--output_dir",
                 str(run_files["dir"] / "run")])
    assert code == 2
    assert "system_prompt is set, but the prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_conversational_prompts_run_through_the_chat_template(tmp_path, chat_model_dir):
    """A column of chat messages reaches the policy in the chat template, after system_prompt's message, and the
    reward function reads the row's answer column."""
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(8)))
    (tmp_path / "reward.py").write_text(ANSWER_REWARD)
    run_dir = tmp_path / "run"
    assert main(["train", "--model_name", chat_model_dir, "--dataset", str(dataset), "--reward_fn",
                 f"{tmp_path / 'reward.py'}:reward", "--system_prompt", "Answer with a number.",
                 "--advantage_estimator", "grpo", "--num_generations", "2", "--batch_size", "4",
                 "--max_new_tokens", "3", "--total_steps", "1", "--eval_fraction", "0.25", "--output_dir",
                 str(run_dir), "--report_to", "none", "--device", "cpu"]) == 0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("<|im_start|>system\nAnswer with a number.<|im_end|>\n"
                                                  "<|im_start|>user\nWhat is ") for s in samples)
    assert all(s["prompt"].endswith("?<|im_end|>\n<|im_start|>assistant\n") for s in samples)


def test_the_quickstart_without_hub_access_ends_in_one_clear_line(tmp_path, monkeypatch, capsys):
    """A new user on a machine that cannot reach the hub: one line naming model_name, not a library traceback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["train", "--config", "configs/quickstart.yaml", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # besides progress bars
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: model_name='Qwen/Qwen3-0.6B-Base' cannot be loaded: it is no local "
                                "directory, and the Hugging Face Hub did not provide it")
    assert "ppo-lm demo" in errors[0]


# --- bad data in each stage's file: one clear line before any model loads (docs/bad-input.md) -------------------------

class ModelLoadReached(Exception):
    """Raised where a trainer would load its first tokenizer or model."""


@pytest.fixture
def no_model(monkeypatch, qwen_tokenizer):
    """Every trainer stops with ModelLoadReached where it would load its tokenizer (before its models); the data checks
    get the tiny model's tokenizer without reading it from disk again."""
    import ppo_lm.finetune
    import ppo_lm.models
    import ppo_lm.ppo_trainer

    def reached(*args, **kwargs):
        raise ModelLoadReached

    for module in (ppo_lm.ppo_trainer, ppo_lm.finetune):
        monkeypatch.setattr(module, "load_tokenizer", reached)
    monkeypatch.setattr(ppo_lm.ppo_trainer, "load_role_models", reached)
    monkeypatch.setattr(ppo_lm.finetune, "load_pretrained", reached)
    monkeypatch.setattr(ppo_lm.models, "load_tokenizer", lambda name, field="model_name": qwen_tokenizer)


GOOD_ROWS = {"train": {"prompt": "Hello there"}, "sft": {"prompt": "Hello", "completion": " there"},
             "reward": {"prompt": "Hello", "chosen": " there", "rejected": " you"}}
"""A valid row of each stage's data."""
TEXT_COLUMN = {"train": "prompt", "sft": "completion", "reward": "chosen"}


def stage_command(stage: str, dataset: Path, model_dir: str, *overrides: str) -> list[str]:
    """`ppo-lm STAGE` on the tiny model and `dataset`, batch 2, no evaluation; PPO scores with a reward model."""
    command = [stage, "--model_name", model_dir, "--dataset", str(dataset), "--output_dir",
               str(dataset.parent / f"run-{stage}"), "--report_to", "none", "--eval_fraction", "0", "--batch_size", "2"]
    return command + (["--reward_model_name", model_dir] if stage == "train" else []) + list(overrides)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.mark.parametrize("stage", ["train", "sft", "reward"])
@pytest.mark.parametrize("content, message", [
    (lambda good, column: jsonl([good, good]) + b'{"' + column.encode() + b'": "caf\xe9"}\n',
     "line 3: not valid UTF-8 (byte 0xe9 at column"),
    (lambda good, column: jsonl([good]) + b'{"prompt": "no closing brace"\n' + jsonl([good]),
     "line 2: invalid JSON: Expecting ',' delimiter (column 30). Fix or remove it."),
    (lambda good, column: jsonl([good]) + b'"a string, not a row"\n',
     'line 2: a string ("a string, not a row"), not an object of column: value pairs'),
    (lambda good, column: b"", "is empty: it holds no rows."),
], ids=["invalid-utf8", "broken-json", "not-an-object", "empty-file"])
def test_a_broken_file_is_one_line_naming_file_and_line_in_every_stage(tmp_path, tiny_model_dir, no_model, capsys,
                                                                        caplog, stage, content, message):
    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(content(GOOD_ROWS[stage], TEXT_COLUMN[stage]))
    assert main(stage_command(stage, dataset, tiny_model_dir)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {dataset}") and message in errors[0]
    assert "Failed to load JSON" not in caplog.text  # the json builder's own line, which counts rows from 0


@pytest.mark.parametrize("stage, value, message", [
    ("train", "  ", "row 1: prompt is '  '; every prompt must be a string with some text"),
    ("train", None, "row 1: prompt is missing or null; every prompt must be"),
    ("train", 7, "row 1: prompt is 7; every prompt must be"),
    ("sft", ["a", "list"], "row 1: completion is ['a', 'list'], not a string. Fix or drop that row."),
    ("reward", {"a": "dict"}, "row 1: chosen is {'a': 'dict'}, not a string. Fix or drop that row."),
])
def test_a_bad_value_names_file_row_and_column_before_any_model_loads(tmp_path, tiny_model_dir, no_model, capsys,
                                                                       stage, value, message):
    good = GOOD_ROWS[stage]
    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(jsonl([good, {**good, TEXT_COLUMN[stage]: value}, good]))
    assert main(stage_command(stage, dataset, tiny_model_dir)) == 2
    assert f"error: {dataset} (split 'train'), {message}" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["train", "sft", "reward"])
def test_long_prompts_and_too_few_rows_are_warned_about_before_any_model_loads(tmp_path, tiny_model_dir, no_model,
                                                                               caplog, stage):
    """The tiny model's context is 512 tokens: row 1's prompt of 600 words keeps only its last tokens, and the
    stream cycles through 2 rows for a batch of 4. Both are said, with the file and row, before a model loads."""
    good = GOOD_ROWS[stage]
    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(jsonl([good, {**good, "prompt": " ".join(["word"] * 600)}]))
    with pytest.raises(ModelLoadReached):
        main(stage_command(stage, dataset, tiny_model_dir, "--batch_size", "4"))
    room = ("502 tokens (the model's context of 512 less max_new_tokens=10)" if stage == "train" else
            "the model's context of 512 tokens beside their completion and EOS")
    assert (f"{dataset} (split 'train'): 1 of 2 prompt(s) do not fit in {room} and will keep only their last tokens "
            f"(first: row 1, 600 tokens for a room of {502 if stage == 'train' else 510}).") in caplog.text
    assert (f"{dataset} (split 'train') gives 2 training row(s), fewer than the 4 each step draws (batch_size=4): "
            "every step's batch repeats rows.") in caplog.text


def test_a_skipped_row_is_warned_about_once_though_max_prompt_length_loads_the_data_twice(tmp_path, tiny_model_dir,
                                                                                           no_model, caplog):
    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(jsonl([GOOD_ROWS["sft"], {**GOOD_ROWS["sft"], "completion": None}, GOOD_ROWS["sft"]]))
    with pytest.raises(ModelLoadReached):
        main(stage_command("sft", dataset, tiny_model_dir, "--max_prompt_length", "64"))
    assert caplog.text.count("skipping 1 of 3 row(s) with an empty completion (first: row 1)") == 1


def test_max_new_tokens_that_fill_the_context_stop_before_any_model_loads(tmp_path, tiny_model_dir, no_model, capsys):
    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(jsonl([GOOD_ROWS["train"]] * 2))
    assert main(stage_command("train", dataset, tiny_model_dir, "--max_new_tokens", "512")) == 2
    assert ("error: PPOConfig.max_new_tokens=512 leaves no room for a prompt in the model's context of 512 tokens"
            in capsys.readouterr().err)


def test_every_test_the_bad_input_page_cites_exists():
    """docs/bad-input.md backs each case with a test by name: each name is a test function of the file it cites."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text()
    cited = set(re.findall(r"(test_\w+\.py)::(test_\w+)", page))
    assert len(cited) > 20
    for file, name in cited:
        assert f"def {name}(" in (Path(__file__).parent / file).read_text(), f"{file}::{name}"


# --- the process's allocator ------------------------------------------------------------------------------------------

_FREE_A_LARGE_TENSOR = """
import sys, torch
from ppo_lm.runs import map_large_allocations

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

mapped = map_large_allocations() if sys.argv[1] == "map" else False
block = torch.ones(5 * 2**20)
del block  # 20 MiB freed: glibc's own threshold rises to this size
before = resident_mib()
block = torch.ones(5 * 2**20)  # the same size again, then freed
del block
print(mapped, resident_mib() - before)
"""


@pytest.mark.parametrize("mode", ["map", "default"])
def test_map_large_allocations_returns_freed_tensors_to_the_system(mode, monkeypatch):
    """After `map_large_allocations`, a freed 20 MiB tensor leaves the process's resident memory; under glibc's own
    rule the second tensor of that size comes from the heap and stays resident (what the function is for)."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    result = subprocess.run([sys.executable, "-c", _FREE_A_LARGE_TENSOR, mode], capture_output=True, text=True,
                            check=True)
    mapped, growth_mib = result.stdout.split()
    if mode == "map":
        assert mapped == "True" and float(growth_mib) < 4
    else:
        assert float(growth_mib) > 16


@pytest.mark.parametrize("variable, value", [("MALLOC_MMAP_THRESHOLD_", "131072"), ("PPO_LM_KEEP_MALLOC", "1")])
def test_map_large_allocations_leaves_a_users_malloc_settings(variable, value, monkeypatch):
    """A threshold the environment sets, or `PPO_LM_KEEP_MALLOC=1`, is the user's choice: nothing changes and the
    call says so."""
    monkeypatch.setenv(variable, value)
    from ppo_lm.runs import map_large_allocations

    assert map_large_allocations() is False
