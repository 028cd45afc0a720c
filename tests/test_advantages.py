"""advantages.py: GAE, the critic-free estimators (a group of 4 with known rewards) and the masked mean and whitening,
on cases computed by hand."""

import math

import pytest
import torch

from ppo_lm import compute_gae, masked_mean, masked_whiten, shape_rewards
from ppo_lm.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, zero_variance_groups


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


def test_masked_whiten_and_mean_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, float("inf")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(values, mask).item() == 2.0
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def group_inputs(scores, lengths=(2, 3, 1, 2), width=3, kl=None, kl_coef=0.0, group_size=4, **settings):
    """A batch of responses with `scores` (groups of `group_size` consecutive rows) and these lengths."""
    scores = torch.tensor(scores)
    mask = (torch.arange(width) < torch.tensor(lengths * (len(scores) // len(lengths))).unsqueeze(-1)).long()
    kl = torch.zeros(len(scores), width) if kl is None else torch.tensor(kl)
    rewards = shape_rewards(scores, kl, mask, kl_coef)
    return AdvantageInputs(rewards, None, mask, scores, gamma=settings.pop("gamma", 1.0), lam=1.0,
                           group_size=group_size, **settings)


def per_response(advantages, inputs):
    """The advantage of each response, checked to be the same on every valid token and 0 on padding."""
    mask = inputs.mask.bool()
    first = advantages[:, 0]
    assert torch.equal(advantages, torch.where(mask, first.unsqueeze(-1).expand_as(advantages), 0.0))
    return first.tolist()


# One group of 4 with rewards 1, 0, 0, 3: mean 1, unbiased std sqrt((0 + 1 + 1 + 4) / 3) = sqrt(2).
GROUP = [1.0, 0.0, 0.0, 3.0]


def test_grpo_by_hand():
    inputs = group_inputs(GROUP)
    advantages, returns = ADVANTAGE_ESTIMATORS["grpo"](inputs)
    std = math.sqrt(2.0) + 1e-4
    assert per_response(advantages, inputs) == pytest.approx([0.0, -1 / std, -1 / std, 2 / std], abs=1e-6)
    assert per_response(returns, inputs) == pytest.approx(GROUP)


def test_dr_grpo_only_centres():
    inputs = group_inputs(GROUP, scale_rewards="none")
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"](inputs)
    assert per_response(advantages, inputs) == pytest.approx([0.0, -1.0, -1.0, 2.0], abs=1e-6)


def test_grpo_batch_scaling_divides_by_the_batch_std():
    # Two groups of 2: (1, 3) and (0, 0); batch mean 1, unbiased batch std sqrt((0 + 4 + 1 + 1) / 3) = sqrt(2).
    inputs = group_inputs([1.0, 3.0, 0.0, 0.0], group_size=2, scale_rewards="batch")
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"](inputs)
    std = math.sqrt(2.0) + 1e-4
    assert per_response(advantages, inputs) == pytest.approx([-1 / std, 1 / std, 0.0, 0.0], abs=1e-6)


def test_rloo_by_hand():
    inputs = group_inputs(GROUP)
    advantages, _ = ADVANTAGE_ESTIMATORS["rloo"](inputs)
    # each reward minus the mean of the other three: 1 - 1, 0 - 4/3, 0 - 4/3, 3 - 1/3
    assert per_response(advantages, inputs) == pytest.approx([0.0, -4 / 3, -4 / 3, 8 / 3], abs=1e-6)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_gets_zero_advantages(name, scale_rewards):
    # Group 0's rewards are all 0.1 (their float32 mean is not exactly 0.1); group 1 carries a signal.
    inputs = group_inputs([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 3.0], scale_rewards=scale_rewards)
    advantages, _ = ADVANTAGE_ESTIMATORS[name](inputs)
    if name == "reinforce_pp_baseline":  # its whitening runs later: before it, group 0's returns are 0
        assert torch.equal(advantages[:4], torch.zeros(4, 3))
    else:
        assert per_response(advantages, inputs)[:4] == [0.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(advantages).all() and advantages[4:].abs().sum() > 0
    assert zero_variance_groups(inputs.scores, 4).tolist() == [True, False]


def test_group_estimators_read_the_kl_in_the_reward():
    # Response 0's summed KL is 2 (1 on each of its 2 tokens): with kl_coef 0.5 its return is 1 - 1 = 0.
    kl = [[1.0, 1.0, 7.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    inputs = group_inputs(GROUP, kl=kl, kl_coef=0.5, scale_rewards="none")
    advantages, returns = ADVANTAGE_ESTIMATORS["grpo"](inputs)
    assert per_response(returns, inputs) == pytest.approx([0.0, 0.0, 0.0, 3.0])
    assert per_response(advantages, inputs) == pytest.approx([-0.75, -0.75, -0.75, 2.25])


def test_reinforce_pp_is_the_discounted_return_to_go():
    # One response of 3 tokens, KL 1, 2, 3 on them, kl_coef 0.1, score 1, gamma 0.5:
    # rewards -0.1, -0.2, -0.3 + 1 = 0.7; returns G2 = 0.7, G1 = -0.2 + 0.35 = 0.15, G0 = -0.1 + 0.075 = -0.025.
    inputs = group_inputs([1.0], lengths=(3,), kl=[[1.0, 2.0, 3.0]], kl_coef=0.1, group_size=1, gamma=0.5)
    advantages, returns = ADVANTAGE_ESTIMATORS["reinforce_pp"](inputs)
    assert advantages[0].tolist() == pytest.approx([-0.025, 0.15, 0.7], abs=1e-6)
    assert torch.equal(advantages, returns)
    assert ADVANTAGE_ESTIMATORS["reinforce_pp"].whitens and not ADVANTAGE_ESTIMATORS["grpo"].whitens


def test_reinforce_pp_baseline_subtracts_the_group_mean_score():
    # gamma 1, no KL: every token's return is the score minus the group mean 1.
    inputs = group_inputs(GROUP)
    advantages, _ = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](inputs)
    assert per_response(advantages, inputs) == pytest.approx([0.0, -1.0, -1.0, 2.0], abs=1e-6)
    plain, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"](inputs)
    assert per_response(plain, inputs) == pytest.approx(GROUP, abs=1e-6)
