"""`ppo-lm bench`: a timed PPO step on a tiny architecture, reported as one JSON line."""

import dataclasses

import pytest

pytestmark = pytest.mark.slow


def test_bench_prints_one_json_line_with_every_figure(capsys):
    from ppo_lm.cli import main

    assert main(["bench", "--arch", "tiny", "--steps", "1", "--warmup", "0", "--batch_size", "4",
                 "--max_new_tokens", "2", "--ppo_epochs", "1", "--prompt_lengths", "8", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = __import__("json").loads(lines[0])
    for key in ("median_step_s", "stage_s", "generated_tokens_per_s", "tokens_per_s", "peak_memory_gib",
                "step_tflop", "floor_s", "time_over_floor"):
        assert key in result, key
    assert set(result["stage_s"]) == {"generate", "logprobs", "reward", "values", "update"}
    assert result["median_step_s"] > 0 and result["step_tflop"] > 0 and result["time_over_floor"] > 0
    assert 0 < result["head_tflop"] <= result["step_tflop"]  # rounded to 4 decimals: equal for the tiny model
    assert result["step_rollback"] is True and result["rollback_copy_s"] > 0 and result["rollback_copy_gib"] > 0
    # AdamW: weights, gradients and two moments, four times the weights; the rollback copy holds three of them
    assert result["trained_state_gib"] == pytest.approx(4 / 3 * result["rollback_copy_gib"], abs=1.5e-4)  # rounded
    assert result["compile_layers"] is False
    assert result["packed"] is False and result["packing_declined"].startswith("the run is on cpu")  # and why not
    assert result["first_step_s"] == result["median_step_s"]  # no warm-up: the one timed step is the first


def test_trained_state_counts_weights_gradients_and_optimizer_state():
    import torch

    from ppo_lm.bench import trained_state_bytes

    matrix = torch.nn.Parameter(torch.zeros(10, 3))
    vector = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    optimizer = torch.optim.AdamW([{"params": [matrix]}, {"params": [vector], "weight_decay": 0.0}])
    assert trained_state_bytes(optimizer) == 2 * (30 * 4 + 5 * 8)  # no state before the first step
    matrix.grad, vector.grad = torch.ones_like(matrix), torch.ones_like(vector)
    optimizer.step()
    steps = sum(entry["step"].numel() * entry["step"].element_size() for entry in optimizer.state.values())
    assert trained_state_bytes(optimizer) == 4 * (30 * 4 + 5 * 8) + steps


def test_small_vocab_model_dir_loads_and_round_trips_a_prompt(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ppo_lm.bench import SMALL_VOCAB, build_model_dirs, small_vocab_tokenizer, synthetic_prompts

    policy_dir, reward_dir = build_model_dirs("small_vocab", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    assert len(tokenizer) == SMALL_VOCAB == policy.config.vocab_size == reward.config.vocab_size
    assert tokenizer.eos_token_id == policy.config.eos_token_id == 0
    assert tokenizer.pad_token_id == policy.config.pad_token_id == reward.config.pad_token_id == 1
    assert tokenizer.get_vocab() == small_vocab_tokenizer().get_vocab()  # the same vocabulary every time

    prompt = synthetic_prompts([7])[0]
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) == 7  # ' hello' is one token, as synthetic_prompts needs
    assert tokenizer.decode(ids) == prompt
    other = "TL;DR: Zürich, 42 ünïcode words\n and a tab\t!"
    assert tokenizer.decode(tokenizer(other)["input_ids"]) == other
    with torch.no_grad():
        assert policy(torch.tensor([ids])).logits.shape == (1, 7, SMALL_VOCAB)
        assert reward(torch.tensor([ids])).logits.shape == (1, 1)


@pytest.mark.parametrize("use_lora", [True, False])
def test_the_head_flops_are_the_output_heads_part_of_the_step(use_lora):
    """Doubling the vocabulary adds exactly the head's FLOPs once more: everything else is the body's."""
    from types import SimpleNamespace

    from ppo_lm import PPOConfig
    from ppo_lm.bench import step_flops

    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128)
    config = PPOConfig(use_lora=use_lora, mixed_precision="no")
    small, large = (step_flops(SimpleNamespace(vocab_size=vocab, **shape), [5, 9], [3, 2], config)
                    for vocab in (1000, 2000))
    assert large["step"] - small["step"] == pytest.approx(small["head"])
    assert large["head"] == pytest.approx(2 * small["head"])


@pytest.mark.parametrize("use_lora", [True, False])
def test_value_layers_take_the_frozen_layers_value_work_out_of_the_update_only(use_lora):
    """With the value model trained on 1 of 4 layers, the update's value passes cost a quarter of a forward and of a
    backward pass (the cached bottom layers run once, in the rollout's value pass); without the cache the forward
    passes run every layer."""
    from types import SimpleNamespace

    from ppo_lm import PPOConfig
    from ppo_lm.bench import step_flops

    model = SimpleNamespace(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=128)
    config = PPOConfig(use_lora=use_lora, mixed_precision="no")
    variants = ({}, {"value_layers": 1}, {"value_layers": 1, "cache_frozen_layers": False})
    every, top, uncached = (step_flops(model, [5, 9], [3, 2], dataclasses.replace(config, **settings))
                            for settings in variants)
    value_pass = every["values"]
    backward = 1 if use_lora else 2
    epochs = config.ppo_epochs
    assert top["values"] == every["values"] and top["logprobs"] == every["logprobs"]
    assert every["update"] - top["update"] == pytest.approx(epochs * (1 + backward) * value_pass * 3 / 4)
    assert uncached["update"] - top["update"] == pytest.approx(epochs * value_pass * 3 / 4)
