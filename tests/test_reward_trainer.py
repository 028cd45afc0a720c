"""RewardTrainer and `ppo-lm reward` on a tiny Qwen3: the pairwise loss, learning a rule, normalisation, the saved
model (merged or adapter), exact resume and bad input."""

import json
import math

import datasets
import pytest
import torch
from rlhf_data import preference_rows, sft_rows, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ppo_lm.cli import main
from ppo_lm.config import RewardConfig
from ppo_lm.finetune import encode_completions
from ppo_lm.models import sequence_scores
from ppo_lm.reward_trainer import pairwise_loss, preference_statistics


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- pure functions ---------------------------------------------------------------------------------------------------

def test_pairwise_loss_by_hand():
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    assert pairwise_loss(torch.tensor([20.0]), torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-8)
    # mean of -log(sigmoid(1)) and -log(sigmoid(-2))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert pairwise_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])).item() == pytest.approx(expected)


def test_preference_statistics():
    stats = preference_statistics(torch.tensor([1.0, 0.0, 3.0, 2.0]), torch.tensor([0.0, 2.0, 1.0, 2.0]))
    assert stats == pytest.approx({"accuracy": 0.5, "margin": 0.25, "chosen_score": 1.5, "rejected_score": 1.25})


# --- runs from the command line ---------------------------------------------------------------------------------------

@pytest.fixture()
def reward_files(tmp_path, tiny_model_dir):
    rows = preference_rows(64, seed=1)
    train = write_jsonl(tmp_path / "pref.jsonl", rows[:48])
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:48]),
                                  "validation": datasets.Dataset.from_list(rows[48:])})
    saved.save_to_disk(str(tmp_path / "pref_splits"))
    reference = write_jsonl(tmp_path / "reference.jsonl", sft_rows(6))
    config = tmp_path / "reward.yaml"
    config.write_text(f"model_name: {tiny_model_dir}\ndataset: {tmp_path / 'pref_splits'}\neval_split: validation\n"
                      "batch_size: 8\nlearning_rate: 0.001\nuse_lora: false\ntotal_steps: 6\neval_steps: 0\n"
                      "save_steps: 3\nmax_eval_samples: 2\nreport_to: none\ndevice: cpu\n"
                      # float32 products: the saved offset is checked against a plain float32 reader to 1e-3
                      "mixed_precision: 'no'\n")
    return {"config": str(config), "dir": tmp_path, "train": train, "reference": reference}


@pytest.mark.slow
def test_reward_model_learns_the_rule_and_its_final_model_loads(reward_files):
    run_dir = reward_files["dir"] / "run"
    assert main(["reward", "--config", reward_files["config"], "--output_dir", str(run_dir),
                 "--reference_dataset", reward_files["reference"]]) == 0
    evals = [m for m in read_metrics(run_dir) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 6]
    assert evals[0]["eval/accuracy"] < 0.9 and evals[-1]["eval/accuracy"] > 0.9, evals  # 16 held-out pairs
    assert evals[-1]["eval/margin"] > evals[0]["eval/margin"] and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    train_metrics = [m for m in read_metrics(run_dir) if "accuracy" in m]
    assert {"loss", "accuracy", "margin", "grad_norm", "learning_rate"} <= train_metrics[-1].keys()

    # The final model: a plain sequence classifier, normalised so that the reference completions score 0.
    final = run_dir / "final"
    model = AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
    assert model.config.num_labels == 1 and model.config.score_offset != 0.0
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    reference = sft_rows(6)
    batch = encode_completions(tokenizer, [r["prompt"] for r in reference], [r["completion"] for r in reference], 512)
    with torch.no_grad():
        scores = sequence_scores(model, batch.input_ids, batch.attention_mask)
        # Plain transformers reads the same head; only the offset is ppo-lm's to subtract.
        ids = batch.input_ids[0][batch.attention_mask[0].bool()][:-1].unsqueeze(0)  # without the EOS (= pad)
        plain = model(input_ids=ids).logits[0, 0].item()
        ours = sequence_scores(model, ids, torch.ones_like(ids)).item()
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert plain - model.config.score_offset == pytest.approx(ours, abs=1e-4)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "reward", "rejected", "rejected_reward"} <= samples[0].keys()
    assert (run_dir / "report.png").is_file()


@pytest.mark.slow
def test_lora_reward_model_kept_as_an_adapter_loads_with_from_pretrained(reward_files):
    run_dir = reward_files["dir"] / "adapter"
    assert main(["reward", "--config", reward_files["config"], "--output_dir", str(run_dir), "--use_lora", "True",
                 "--merge_lora", "False", "--learning_rate", "0.01", "--total_steps", "2", "--eval_split",
                 "None", "--eval_fraction", "0", "--dataset", reward_files["train"]]) == 0
    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(final), num_labels=1).eval()
    trained = load_file(str(run_dir / "checkpoint-2" / "trainable.safetensors"))
    head = next(tensor for name, tensor in trained.items() if "score" in name)
    torch.testing.assert_close(model.score.weight if hasattr(model.score, "weight")
                               else model.score.modules_to_save["default"].weight, head)
    with pytest.raises(ValueError, match="merge_lora=False is invalid: must be True when reference_dataset"):
        RewardConfig(use_lora=True, merge_lora=False, reference_dataset="rows.jsonl")


@pytest.mark.slow
def test_reward_resumed_run_matches_the_straight_run(reward_files):
    straight, halves = reward_files["dir"] / "straight", reward_files["dir"] / "halves"
    options = ["--save_steps", "2", "--eval_steps", "2", "--micro_batch_size", "3", "--max_eval_prompts", "4"]
    assert main(["reward", "--config", reward_files["config"], "--output_dir", str(straight), "--total_steps", "4",
                 *options]) == 0
    assert main(["reward", "--config", reward_files["config"], "--output_dir", str(halves), "--total_steps", "2",
                 *options]) == 0
    assert main(["reward", "--resume", str(halves), "--total_steps", "4"]) == 0
    straight_metrics, resumed_metrics = read_metrics(straight), read_metrics(halves)
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in straight_metrics]
    for a, b in zip(straight_metrics, resumed_metrics, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    a = load_file(str(straight / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(halves / "checkpoint-4" / "trainable.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_reward_bad_input_fails_before_any_model_loads(reward_files, capsys):
    bad = write_jsonl(reward_files["dir"] / "bad.jsonl", [{"prompt": "p", "chosen": " same", "rejected": " same"}])
    code = main(["reward", "--config", reward_files["config"], "--dataset", bad, "--eval_split", "None",
                 "--model_name", str(reward_files["dir"] / "no-such-model"), "--output_dir",
                 str(reward_files["dir"] / "run")])
    error = capsys.readouterr().err
    assert code == 2 and "no usable preference pair" in error and "no-such-model" not in error
