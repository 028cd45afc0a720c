"""Independent oracles for the rollout's wiring (PPOTrainer.make_rollout, ppo_step's KL controller).

Each test recomputes what a stage should have produced from the rollout's own raw ingredients (logprobs, scores,
masks) with formulas written out here, not with the modules' functions. The policy is `eos_model_dir`'s tiny model,
which ends about half of its responses with EOS, so every batch holds rows that ended and rows cut off.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForSequenceClassification

import ppo_lm.ppo_trainer as ppo_trainer_module
from ppo_lm import PPOTrainer

pytestmark = pytest.mark.slow  # each test builds a PPOTrainer and samples a batch: seconds on a CPU

EOS = 151643
PROMPTS = [
    "SUBREDDIT: r/cooking\nTITLE: Bread\nPOST: My bread never rises.\nTL;DR:",
    "Hello",
    "The weather today is sunny and warm, so we went to the beach",
    "TL;DR:",
] * 2
KL_COEF = 0.3
PENALTY = -1.0


def length_score(prompts: list[str], completions: list[str]) -> list[float]:
    """A score that differs between rows: a tenth of the completion's length in characters, plus one."""
    return [1.0 + len(c) / 10 for c in completions]


def perturb_policy_adapter(trainer: PPOTrainer, seed: int = 0, scale: float = 0.05) -> None:
    """Give the policy's LoRA B matrices small random values, so the policy differs from the reference (the base
    with the adapter off) and the KL is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in trainer.models.policy.named_parameters():
            if "lora_B.default" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def oracle_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token KL estimate, written out: k1 is `logp - logp_ref`, k3 is `expm1(d) - d` with `d = ref - logp`."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


@pytest.fixture(scope="module", params=["k1", "k3"])
def oracle_rollout(request, eos_model_dir):
    """A rollout with gamma = lam = 1, no whitening, kl_coef 0.3, a missing-EOS penalty and a perturbed policy."""
    config = tiny_config(eos_model_dir, batch_size=len(PROMPTS), gamma=1.0, lam=1.0, whiten_advantages=False,
                         kl_coef=KL_COEF, missing_eos_penalty=PENALTY, kl_estimator=request.param)
    trainer = PPOTrainer(config, reward_fn=length_score)
    perturb_policy_adapter(trainer)
    rollout = trainer.make_rollout(PROMPTS)
    assert rollout.ended.any() and not rollout.ended.all(), "the batch must hold ended and cut-off rows"
    return request.param, trainer, rollout


def test_returns_are_monte_carlo_returns_of_the_penalised_score_and_the_kl(oracle_rollout):
    estimator, _, rollout = oracle_rollout
    mask = rollout.batch.response_mask.bool()
    kl = oracle_kl(rollout.old_logprobs, rollout.ref_logprobs, estimator)
    assert kl[mask].abs().max() > 1e-3, "the perturbed policy should differ from the reference"
    expected_scores = torch.where(rollout.ended, rollout.raw_scores, torch.full_like(rollout.raw_scores, PENALTY))
    torch.testing.assert_close(rollout.scores, expected_scores)
    for i in range(len(PROMPTS)):
        valid = mask[i].nonzero().squeeze(-1).tolist()
        for t in valid:
            later_kl = sum(kl[i, s].item() for s in valid if s >= t)
            expected = expected_scores[i].item() - KL_COEF * later_kl
            assert rollout.returns[i, t].item() == pytest.approx(expected, abs=1e-5), (i, t)


def test_ended_rows_end_with_eos_and_the_score_sits_on_the_last_valid_token(oracle_rollout):
    estimator, trainer, rollout = oracle_rollout
    mask = rollout.batch.response_mask.bool()
    kl = oracle_kl(rollout.old_logprobs, rollout.ref_logprobs, estimator)
    for i in range(len(PROMPTS)):
        valid = mask[i].nonzero().squeeze(-1).tolist()
        last = valid[-1]
        assert valid == list(range(len(valid))), "valid tokens are a prefix of the response"
        if rollout.ended[i]:
            assert rollout.batch.responses[i, last].item() == EOS
            assert (rollout.batch.responses[i, :last] != EOS).all()
        else:
            assert len(valid) == trainer.config.max_new_tokens and (rollout.batch.responses[i, valid] != EOS).all()
        # Rewards from the returns (gamma 1): r_t = R_t - R_{t+1}, the last one R_last.
        returns = rollout.returns[i]
        for t in valid[:-1]:
            reward = (returns[t] - returns[t + 1]).item()
            assert reward == pytest.approx(-KL_COEF * kl[i, t].item(), abs=1e-5), (i, t)
        assert returns[last].item() == pytest.approx(
            rollout.scores[i].item() - KL_COEF * kl[i, last].item(), abs=1e-5), i


def test_unwhitened_advantages_are_returns_minus_values(oracle_rollout):
    _, _, rollout = oracle_rollout
    mask = rollout.batch.response_mask.bool()
    torch.testing.assert_close(rollout.advantages[mask], (rollout.returns - rollout.values)[mask], atol=1e-5, rtol=0)


def test_missing_eos_penalty_reaches_the_shaping_for_cut_off_rows_only(eos_model_dir, monkeypatch):
    shaped = []

    def spy(scores, kl, response_mask, kl_coef):
        shaped.append(scores.clone())
        return real_shape_rewards(scores, kl, response_mask, kl_coef)

    real_shape_rewards = ppo_trainer_module.shape_rewards
    monkeypatch.setattr(ppo_trainer_module, "shape_rewards", spy)
    config = tiny_config(eos_model_dir, batch_size=len(PROMPTS), missing_eos_penalty=PENALTY)
    trainer = PPOTrainer(config, reward_fn=length_score)
    rollout = trainer.make_rollout(PROMPTS)
    assert rollout.ended.any() and not rollout.ended.all(), "the batch must hold ended and cut-off rows"
    (scores,) = shaped
    raw = torch.tensor(length_score(PROMPTS, rollout.completions))
    torch.testing.assert_close(rollout.raw_scores, raw)
    torch.testing.assert_close(scores[rollout.ended], raw[rollout.ended])
    torch.testing.assert_close(scores[~rollout.ended], torch.full_like(raw[~rollout.ended], PENALTY))


def test_adaptive_kl_coefficient_follows_the_controller_rule(eos_model_dir):
    # The perturbed policy's summed KL is about 1.4 a response: near enough to the target that the rule's error
    # is inside the clip range (the unclipped branch), far enough that the coefficient moves.
    target, horizon = 1.3, 40
    config = tiny_config(eos_model_dir, kl_coef=KL_COEF, adaptive_kl_target=target, adaptive_kl_horizon=horizon,
                         ppo_epochs=1)
    trainer = PPOTrainer(config, reward_fn=length_score)
    perturb_policy_adapter(trainer)
    prompts = PROMPTS[:4]
    coefficient = trainer.kl_controller.value
    assert coefficient == KL_COEF
    unclipped = []
    for _ in range(2):
        stats = trainer.ppo_step(prompts)
        assert stats["kl_coef"] == coefficient  # the coefficient that shaped this step's rewards
        assert math.isfinite(stats["kl"]) and stats["kl"] != 0.0
        error = min(max(stats["kl"] / target - 1.0, -0.2), 0.2)
        unclipped.append(abs(stats["kl"] / target - 1.0) < 0.2)
        coefficient = coefficient * (1.0 + error * len(prompts) / horizon)
        assert trainer.kl_controller.value == pytest.approx(coefficient, rel=1e-12)
    assert coefficient != KL_COEF and any(unclipped), "the test should exercise the rule inside its clip range"


def test_reward_model_scores_equal_a_plain_forward_read_at_the_eos(eos_model_dir, tiny_reward_model_dir):
    config = tiny_config(eos_model_dir, batch_size=len(PROMPTS), reward_model_name=tiny_reward_model_dir)
    trainer = PPOTrainer(config)
    assert trainer.reward_tokenizer is None  # the same tokenizer: the policy's tokens are scored as they are
    rollout = trainer.make_rollout(PROMPTS)
    assert rollout.ended.any() and not rollout.ended.all(), "the batch must hold ended and cut-off rows"
    # A right-padded row: an ended response shorter than the longest one.
    lengths = rollout.batch.response_mask.sum(-1)
    assert (rollout.ended & (lengths < lengths.max())).any()
    # No pad token: a batch of one is read at its last token, which for an ended row is its EOS (the Qwen pad
    # token is EOS, and with it transformers would read the token before).
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir, pad_token_id=None)
    for i in range(len(PROMPTS)):
        ids = rollout.batch.input_ids[i][rollout.batch.attention_mask[i].bool()].unsqueeze(0)
        assert (ids[0, -1].item() == EOS) == bool(rollout.ended[i])
        with torch.no_grad():
            expected = reward_model(input_ids=ids).logits[0, 0].item()
        assert rollout.raw_scores[i].item() == pytest.approx(expected, abs=1e-4), i
