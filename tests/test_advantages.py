"""advantages.py: generalised advantage estimation and the masked mean and whitening, on cases computed by hand."""

import pytest
import torch

from ppo_lm import compute_gae, masked_mean, masked_whiten


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
