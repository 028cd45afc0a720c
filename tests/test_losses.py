"""losses.py: the clipped policy and value losses, the KL estimators, the exact KL and the entropy, by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from ppo_lm import approx_kl, clipped_policy_loss, clipped_value_loss, entropy_from_logits, exact_kl, kl_estimate


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
    loss, stats = clipped_policy_loss(new, old, advantages, mask, SimpleNamespace(clip_epsilon=0.2))
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert stats["policy_clip_fraction"].item() == expected_clipped


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
    with pytest.raises(ValueError, match="Unknown KL estimator 'k2': use one of k1, k3"):
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


def test_entropy_of_uniform_and_peaked_logits():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
