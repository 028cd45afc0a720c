"""losses.py: the clipped policy and value losses, the KL estimators, the exact KL and the entropy, by hand."""

import math
from types import SimpleNamespace

import pytest
import torch

from ppo_lm import approx_kl, clipped_policy_loss, clipped_value_loss, entropy_from_logits, exact_kl, kl_estimate
from ppo_lm.losses import LOSS_AGGREGATIONS, POLICY_LOSSES, MinibatchSize


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
    loss, stats = clipped_policy_loss(new, old, advantages, mask, loss_settings())
    assert loss[0, 0].item() == pytest.approx(expected_loss, abs=1e-6)
    assert stats["policy_clip_fraction"].item() == expected_clipped


def loss_settings(clip_epsilon=0.2, clip_epsilon_high=None, dual_clip=None, max_new_tokens=4):
    return SimpleNamespace(clip_epsilon=clip_epsilon, clip_epsilon_high=clip_epsilon_high, dual_clip=dual_clip,
                           max_new_tokens=max_new_tokens)


def per_token_loss(ratio, advantage, **settings):
    """The clipped loss of one token with this ratio and advantage."""
    new = torch.tensor([[math.log(ratio)]])
    loss, stats = clipped_policy_loss(new, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1),
                                      loss_settings(**settings))
    return loss.item(), {name: value.item() for name, value in stats.items()}


def test_clip_higher_is_asymmetric():
    # clip range [0.8, 1.28]: a positive advantage may push the ratio to 1.28 (not 1.2); below 1 it still stops at 0.8.
    assert per_token_loss(1.5, 1.0, clip_epsilon_high=0.28)[0] == pytest.approx(-1.28, abs=1e-6)
    assert per_token_loss(1.25, 1.0, clip_epsilon_high=0.28)[0] == pytest.approx(-1.25, abs=1e-6)
    assert per_token_loss(0.5, -1.0, clip_epsilon_high=0.28)[0] == pytest.approx(0.8, abs=1e-6)
    # the same token with the symmetric default is clipped at 1.2
    assert per_token_loss(1.25, 1.0)[0] == pytest.approx(-1.2, abs=1e-6)


def test_dual_clip_bounds_the_loss_of_negative_advantages_only():
    # A = -1 and ratio 5: PPO's loss is 5 (no clip above 1 for A < 0); dual clip 3 bounds it at 3 |A| = 3.
    loss, stats = per_token_loss(5.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0, abs=1e-6) and stats["dual_clip_fraction"] == 1.0
    assert per_token_loss(2.0, -1.0, dual_clip=3.0)[0] == pytest.approx(2.0, abs=1e-6)  # under the bound
    loss, stats = per_token_loss(5.0, 1.0, dual_clip=3.0)  # positive A: the usual clip at 1.2
    assert loss == pytest.approx(-1.2, abs=1e-6) and stats["dual_clip_fraction"] == 0.0
    assert "dual_clip_fraction" not in per_token_loss(5.0, -1.0)[1]


def test_gspo_uses_each_responses_geometric_mean_ratio():
    # Row 0: token ratios 2 and 0.5 (geometric mean 1); row 1: ratios 1.21 and 1.21 over 2 valid tokens of 3.
    log_ratios = torch.tensor([[math.log(2.0), math.log(0.5), 0.0], [math.log(1.21), math.log(1.21), 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    new = log_ratios.clone().requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    loss, stats = POLICY_LOSSES["gspo"](new, torch.zeros(2, 3), advantages, mask, loss_settings(clip_epsilon=0.2))
    # row 0: s = 1 -> loss -1 on both tokens; row 1: s = 1.21, clipped to 1.2 -> -1.2 on both tokens.
    assert loss[:, :2].flatten().tolist() == pytest.approx([-1.0, -1.0, -1.2, -1.2], abs=1e-6)
    assert stats["policy_clip_fraction"].item() == pytest.approx(0.5)
    # the gradient of row 0's sequence-mean loss is -s / |y| per token (s = 1): the sequence ratio's gradient
    sequence_mean = LOSS_AGGREGATIONS["sequence_mean"]
    total = sequence_mean(loss, mask, MinibatchSize(tokens=torch.tensor(4.0), responses=torch.tensor(2.0)),
                          loss_settings())
    total.backward()
    assert new.grad[0, :2].tolist() == pytest.approx([-0.25, -0.25], abs=1e-6)  # -(1/2 responses)(1/2 tokens)
    assert new.grad[1].abs().sum().item() == 0.0  # clipped: no gradient


def test_loss_aggregations_by_hand():
    # Row 0 has 1 valid token (loss 4), row 1 has 3 (losses 1, 2, 3); max_new_tokens 4.
    per_token = torch.tensor([[4.0, 99.0, 99.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    size = MinibatchSize(tokens=torch.tensor(4.0), responses=torch.tensor(2.0))
    settings = loss_settings(max_new_tokens=4)
    expected = {"token_mean": (4 + 1 + 2 + 3) / 4,  # every token counts the same
                "sequence_mean": (4 / 1 + 6 / 3) / 2,  # every response counts the same
                "sequence_sum": (4 + 6) / (4 * 2)}  # token sums over max_new_tokens, mean over responses
    for name, value in expected.items():
        assert LOSS_AGGREGATIONS[name](per_token, mask, size, settings).item() == pytest.approx(value), name


def test_loss_aggregation_parts_add_up_to_the_whole():
    # Two micro-batches' parts of a minibatch add up to the minibatch's loss, for every aggregation.
    torch.manual_seed(0)
    per_token = torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    size = MinibatchSize(tokens=mask.sum().float(), responses=torch.tensor(4.0))
    for name in LOSS_AGGREGATIONS:
        aggregate = LOSS_AGGREGATIONS[name]
        whole = aggregate(per_token, mask, size, loss_settings(max_new_tokens=5))
        parts = sum(aggregate(per_token[rows], mask[rows], size, loss_settings(max_new_tokens=5))
                    for rows in ([0, 2], [1, 3]))
        assert parts.item() == pytest.approx(whole.item(), abs=1e-6), name


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


def test_approx_kl_by_hand_is_kl_of_old_from_new():
    # k3 of KL(old || new) with r = p_new / p_old: (r - 1) - log r. Token 0: log r = 1 -> e - 2 = 0.71828;
    # token 1: log r = -0.5 -> e^-0.5 - 0.5 = 0.10653; token 2 is padding. The swap (KL(new || old)) would give
    # e^-1 = 0.36788 and e^0.5 - 1.5 = 0.14872 instead.
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[1.0, -0.5, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert approx_kl(new, old, mask).item() == pytest.approx((math.e - 2 + math.exp(-0.5) - 0.5) / 2, abs=1e-6)
    assert approx_kl(old, new, mask).item() == pytest.approx((math.exp(-1) + math.exp(0.5) - 1.5) / 2, abs=1e-6)


def test_approx_kl_is_zero_at_ratio_one_and_positive_otherwise():
    mask = torch.ones(1, 3)
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert approx_kl(lp, lp, mask).item() == 0.0
    assert approx_kl(lp + 0.1, lp, mask).item() > 0


def test_entropy_of_uniform_and_peaked_logits():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
