"""rewards.py: the per-token rewards (KL penalty and score) and the KL coefficient's controller, by hand."""

import pytest
import torch

from ppo_lm import KLController, shape_rewards


def test_shape_rewards_puts_kl_on_every_token_and_score_on_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = shape_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-2.25, 0.0, 0.0]]))


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
