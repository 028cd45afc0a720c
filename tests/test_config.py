"""config.py: PPOConfig's defaults, and invalid values refused with the field, the value and what is allowed."""

import pytest

from ppo_lm import PPOConfig


def test_config_defaults_keep_the_original_design():
    config = PPOConfig()
    assert (config.model_name, config.lora_r, config.lora_alpha, config.lora_dropout) == (
        "Qwen/Qwen3-0.6B-Base", 16, 32, 0.1)
    assert (config.learning_rate, config.value_learning_rate, config.batch_size, config.max_new_tokens) == (
        1e-5, 1e-4, 32, 10)
    assert (config.gamma, config.lam, config.kl_coef, config.clip_epsilon) == (0.99, 0.95, 0.1, 0.2)
    assert (config.temperature, config.top_k, config.top_p) == (1.0, 50, 0.95)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("learning_rate", -1e-5, "> 0"),
        ("clip_epsilon", 0.0, "> 0"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_p", 0.0, "(0, 1]"),
        ("kl_estimator", "k2", "k1"),
        ("batch_size", 0, ">= 1"),
        ("gamma", 1.5, "[0, 1]"),
        ("target_kl", -0.1, "None"),
        ("dtype", "float8", "bfloat16"),
        ("temperature", float("nan"), "> 0"),
    ],
)
def test_config_rejects_invalid_values_naming_field_and_value(field, value, allowed):
    with pytest.raises(ValueError) as error:
        PPOConfig(**{field: value})
    message = str(error.value)
    assert field in message and repr(value) in message and allowed in message
