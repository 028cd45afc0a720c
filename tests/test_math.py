"""The PPO math pinned on cases computed by hand."""

import math

import pytest
import torch

from ppo_lm import (
    KLController,
    PPOConfig,
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    exact_kl,
    kl_estimate,
    masked_mean,
    masked_whiten,
    shape_rewards,
)
from ppo_lm.generation import mask_after_stop


def test_gae_three_tokens_by_hand():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72). Row 0 uses all 3 tokens; row 1 ends after token 1.
    rewards = torch.tensor([[0.5, -1.0, 2.0], [0.5, -1.0, 2.0]])
    values = torch.tensor([[1.0, 0.5, -0.5], [1.0, 0.5, -0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: deltas = [0.5 + 0.9*0.5 - 1, -1 + 0.9*(-0.5) - 0.5, 2 - (-0.5)] = [-0.05, -1.95, 2.5]
    #   A2 = 2.5, A1 = -1.95 + 0.72*2.5 = -0.15, A0 = -0.05 + 0.72*(-0.15) = -0.158
    # Row 1: V after token 1 is 0: deltas = [-0.05, -1 - 0.5] -> A1 = -1.5, A0 = -0.05 + 0.72*(-1.5) = -1.13
    expected_adv = torch.tensor([[-0.158, -0.15, 2.5], [-1.13, -1.5, 0.0]])
    expected_ret = torch.tensor([[0.842, 0.35, 2.0], [-0.13, -1.0, 0.0]])
    torch.testing.assert_close(advantages, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, expected_ret, atol=1e-6, rtol=0)


def test_gae_matches_reverse_recursion_on_random_rows():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    lengths = torch.tensor([7, 1, 3, 6, 4])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    gamma, lam = 0.97, 0.9
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for row, length in enumerate(lengths.tolist()):
        running = 0.0
        for t in reversed(range(length)):
            next_value = values[row, t + 1] if t + 1 < length else 0.0
            running = rewards[row, t] + gamma * next_value - values[row, t] + gamma * lam * running
            assert advantages[row, t].item() == pytest.approx(running.item(), abs=1e-5)
            assert returns[row, t].item() == pytest.approx((running + values[row, t]).item(), abs=1e-5)
        assert advantages[row, length:].abs().sum() == 0 and returns[row, length:].abs().sum() == 0


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_clipped",
    [
        (0.5, 1.0, -0.5, 0.0),  # below the range, positive A: unclipped -0.5 beats clipped -0.8
        (1.0, 1.0, -1.0, 0.0),
        (1.5, 1.0, -1.2, 1.0),  # above the range, positive A: the gain stops at 1.2
        (0.5, -1.0, 0.8, 1.0),  # below the range, negative A: the loss is the clipped 0.8
        (1.0, -1.0, 1.0, 0.0),
        (1.5, -1.0, 1.5, 0.0),  # above the range, negative A: no clipping, the full 1.5
    ],
)
def test_clipped_policy_loss_by_hand(ratio, advantage, expected_loss, expected_clipped):
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(ratio))
    advantages = torch.full((1, 2), advantage)
    mask = torch.tensor([[1, 0]])  # the masked token must not count
    new[0, 1] = float("nan")
    loss, clip_fraction = clipped_policy_loss(new, old, advantages, mask, clip_epsilon=0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert clip_fraction.item() == expected_clipped


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[1.0, 1.0]])
    returns = torch.tensor([[2.0, 2.0]])
    values = torch.tensor([[1.5, 1.1]])
    # token 0: clipped value 1.2 -> errors 0.25 vs 0.64, max 0.64; token 1: inside the range, error 0.81
    loss, clip_fraction = clipped_value_loss(values, old, returns, torch.tensor([[1, 1]]), value_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert clip_fraction.item() == 0.5


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2), abs=1e-6)
    # r = p_ref / p = 0.5: (0.5 - 1) - log 0.5
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2), abs=1e-6)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(logp, ref, "k2")


def test_exact_kl_by_hand_and_at_every_position():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    logits, ref_logits = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert exact_kl(logits, ref_logits).item() == pytest.approx(expected, abs=1e-6)
    assert exact_kl(logits + 3.0, ref_logits - 1.0).item() == pytest.approx(expected, abs=1e-6)  # shifts cancel
    batch = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    by_torch = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=batch[0]),
                                                 torch.distributions.Categorical(logits=batch[1]))
    torch.testing.assert_close(exact_kl(*batch), by_torch)
    assert exact_kl(batch[0], batch[0]).abs().max().item() < 1e-6


def test_approx_kl_is_zero_at_ratio_one_and_positive_otherwise():
    mask = torch.ones(1, 3)
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert approx_kl(lp, lp, mask).item() == 0.0
    assert approx_kl(lp + 0.1, lp, mask).item() > 0


def test_masked_whiten_and_mean_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, float("inf")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(values, mask).item() == 2.0
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_entropy_of_uniform_and_peaked_logits():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_shape_rewards_puts_kl_on_every_token_and_score_on_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = shape_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-2.25, 0.0, 0.0]]))


def test_mask_after_stop_keeps_the_stop_token_and_nothing_after():
    responses = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(mask_after_stop(responses, stop_token_id=9), expected)


def test_adaptive_kl_controller_moves_toward_target_and_fixed_does_not():
    fixed = KLController(0.1)
    fixed.update(kl=100.0, episodes=64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=1000)
    adaptive.update(kl=12.0, episodes=100)  # error clipped to +0.2 -> x(1 + 0.2 * 0.1)
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(kl=3.0, episodes=100)  # error clipped to -0.2
    assert adaptive.value == pytest.approx(0.102 * 0.98)
    restored = KLController(1.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.state_dict() == adaptive.state_dict()


def test_config_defaults_keep_the_original_design():
    config = PPOConfig()
    assert (config.model_name, config.lora_r, config.lora_alpha, config.lora_dropout) == (
        "Qwen/Qwen3-0.6B-Base", 16, 32, 0.0)
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
