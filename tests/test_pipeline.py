"""The RLHF pipeline from the command line: the TL;DR recipe configs chained sft -> reward -> ppo on a tiny model,
and a reward model whose tokenizer differs from the policy's."""

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from conftest import tiny_qwen3_config
from rlhf_data import preference_rows, sft_rows
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from ppo_lm import PPOConfig, PPOTrainer
from ppo_lm.cli import main
from ppo_lm.config import RewardConfig, SFTConfig
from ppo_lm.models import sequence_scores
from ppo_lm.runs import read_config_file

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tldr"


def save_splits(path: Path, rows: list[dict]) -> str:
    """A saved DatasetDict with train and validation splits, the layout of the hub datasets the recipe names."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:-4]),
                          "validation": datasets.Dataset.from_list(rows[-4:])}).save_to_disk(str(path))
    return str(path)


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


@pytest.fixture(scope="module")
def other_vocabulary_reward_model(tmp_path_factory):
    """A tiny reward model with its own word-level vocabulary, unrelated to the policy's Qwen tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "</s>", "hello", "the", "weather", "is", "sunny", "a", "TL;DR:", "Hello"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    path = tmp_path_factory.mktemp("other-vocab-reward")
    torch.manual_seed(2)
    config = tiny_qwen3_config(len(words), num_labels=1, pad_token_id=1, eos_token_id=2)
    from transformers import Qwen3ForSequenceClassification

    Qwen3ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def test_a_reward_model_with_another_tokenizer_scores_the_text(tiny_model_dir, other_vocabulary_reward_model):
    reward_dir, reward_tokenizer = other_vocabulary_reward_model
    config = PPOConfig(model_name=tiny_model_dir, reward_model_name=reward_dir, batch_size=2, max_new_tokens=4,
                       ppo_epochs=1, device="cpu")
    trainer = PPOTrainer(config)
    assert trainer.reward_tokenizer is not None  # the vocabularies differ: the text is tokenised again
    prompts = ["Hello the weather is", "TL;DR:"]
    rollout = trainer.make_rollout(prompts)
    encoded = reward_tokenizer([p + c for p, c in zip(prompts, rollout.completions, strict=True)], padding=True,
                               return_tensors="pt")
    with torch.no_grad():
        expected = sequence_scores(trainer.models.reward_model, encoded["input_ids"], encoded["attention_mask"])
    torch.testing.assert_close(rollout.raw_scores, expected)
    stats = trainer.ppo_step(prompts)  # a whole step on the re-tokenised scores
    assert math.isfinite(stats["reward_mean"]) and math.isfinite(stats["policy_loss"])


def test_a_reward_model_with_the_same_tokenizer_shares_the_tokens(tiny_model_dir, tiny_reward_model_dir):
    config = PPOConfig(model_name=tiny_model_dir, reward_model_name=tiny_reward_model_dir, batch_size=2,
                       max_new_tokens=2, device="cpu")
    assert PPOTrainer(config).reward_tokenizer is None
