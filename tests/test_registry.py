"""The registries of the algorithm's variable parts: names, errors, the config's choices, and variants registered
from here (not from the package) that a PPO step runs."""

from __future__ import annotations

import typing
from types import SimpleNamespace

import pytest
import torch

from ppo_lm import PPOConfig, PPOTrainer
from ppo_lm.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, compute_gae
from ppo_lm.losses import KL_ESTIMATORS, POLICY_LOSSES, clipped_policy_loss, kl_estimate
from ppo_lm.registry import Registry


def length_reward(prompts, completions):
    return [float(len(c)) / 10 for c in completions]


def tiny_config(model_dir, **overrides):
    settings = dict(model_name=model_dir, batch_size=4, max_new_tokens=5, learning_rate=1e-3,
                    value_learning_rate=1e-3, device="cpu", seed=0, ppo_epochs=1)
    return PPOConfig(**{**settings, **overrides})


@pytest.fixture()
def registered():
    """Register variants for one test; unregister them after."""
    added = []

    def register(registry: Registry, name: str, function, **declared):
        registry.register(name, **declared)(function)
        added.append((registry, name))
        return function

    yield register
    for registry, name in added:
        registry.unregister(name)


def test_a_registry_names_its_entries_and_refuses_duplicates_and_unknown_names():
    registry: Registry = Registry("toy function")
    registry.register("double")(lambda x: 2 * x)
    registry.register("values_too", needs_values=True)(lambda x: x)
    assert registry.names() == ("double", "values_too") and "double" in registry
    assert registry["double"](3) == 6 and not registry["double"].needs_values and registry["values_too"].needs_values
    with pytest.raises(ValueError, match="already registered"):
        registry.register("double")(lambda x: x)
    with pytest.raises(ValueError, match="Unknown toy function 'triple': use one of double, values_too"):
        registry["triple"]


def test_the_config_choices_are_the_registry_names():
    hints = typing.get_type_hints(PPOConfig)
    for field, registry in (("kl_estimator", KL_ESTIMATORS), ("advantage_estimator", ADVANTAGE_ESTIMATORS),
                            ("policy_loss", POLICY_LOSSES)):
        assert typing.get_args(hints[field]) == registry.names()
        with pytest.raises(ValueError, match=f"{field}='nope' is invalid: must be one of"):
            PPOConfig(**{field: "nope"})
    assert ADVANTAGE_ESTIMATORS["gae"].needs_values


def test_the_built_in_entries_are_the_math_functions():
    logprobs, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.equal(kl_estimate(logprobs, ref, "k1"), logprobs - ref)
    assert torch.allclose(kl_estimate(logprobs, ref, "k3"), torch.expm1(ref - logprobs) - (ref - logprobs))
    assert POLICY_LOSSES["clipped"].function is clipped_policy_loss
    rewards, values = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.5, 0.2, 0.1]])
    mask = torch.tensor([[1, 1, 0]])
    inputs = AdvantageInputs(rewards, values, mask, torch.tensor([1.0]), gamma=0.9, lam=0.8)
    for got, expected in zip(ADVANTAGE_ESTIMATORS["gae"](inputs), compute_gae(rewards, values, mask, 0.9, 0.8),
                             strict=True):
        assert torch.equal(got, expected)


def score_on_every_token(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy estimator: each token's advantage is its response's score minus the value (a one-step baseline)."""
    advantages = torch.where(inputs.mask.bool(), inputs.scores[:, None] - inputs.values, 0.0)
    return advantages, torch.where(inputs.mask.bool(), inputs.scores[:, None].expand_as(advantages), 0.0)


@pytest.mark.slow
def test_an_advantage_estimator_registered_here_runs_a_ppo_step(tiny_model_dir, registered):
    registered(ADVANTAGE_ESTIMATORS, "toy_score", score_on_every_token, needs_values=True)
    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="toy_score", whiten_advantages=False),
                         reward_fn=length_reward)
    rollout = trainer.make_rollout(["Hello there", "A longer prompt than that one"] * 2)
    mask = rollout.batch.response_mask.bool()
    expected = rollout.scores[:, None] - rollout.values
    assert torch.allclose(rollout.advantages[mask], expected.expand_as(mask)[mask])
    assert torch.equal(rollout.returns[mask], rollout.scores[:, None].expand_as(mask)[mask])
    stats = trainer.update(rollout)
    assert stats["optimizer_steps"] == 1 and stats["value_loss"] > 0 and stats["grad_norm"] > 0


@pytest.mark.slow
def test_an_estimator_without_values_runs_no_value_pass_and_has_no_value_model(tiny_model_dir, registered):
    def score_only(inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
        assert inputs.values is None
        advantages = torch.where(inputs.mask.bool(), inputs.scores[:, None] - inputs.scores.mean(), 0.0)
        return advantages, advantages

    registered(ADVANTAGE_ESTIMATORS, "toy_no_values", score_only, needs_values=False)
    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="toy_no_values"), reward_fn=length_reward)
    assert trainer.models.value_parameters() == [] and trainer.models.value_head is None
    policy_before = [p.detach().clone() for p in trainer.models.policy_parameters()]
    stats = trainer.ppo_step(["Hello there", "A longer prompt than that one"] * 2)
    assert "time/values" not in stats and "value_loss" not in stats and "value_mean" not in stats
    assert any(not torch.equal(p, q) for p, q in zip(trainer.models.policy_parameters(), policy_before, strict=True))


@pytest.mark.slow
def test_a_policy_loss_and_a_kl_estimator_registered_here_run_a_ppo_step(tiny_model_dir, registered):
    def vanilla_policy_gradient(logprobs, old_logprobs, advantages, mask, settings):
        ratio = torch.exp(logprobs - old_logprobs)
        return -advantages * ratio, {"toy_ratio_max": (ratio * mask).max().detach()}

    registered(POLICY_LOSSES, "toy_vanilla", vanilla_policy_gradient)
    registered(KL_ESTIMATORS, "toy_k2", lambda logprobs, ref: 0.5 * (logprobs - ref) ** 2)
    trainer = PPOTrainer(tiny_config(tiny_model_dir, policy_loss="toy_vanilla", kl_estimator="toy_k2"),
                         reward_fn=length_reward)
    rollout = trainer.make_rollout(["Hello there", "A longer prompt than that one"] * 2)
    assert torch.allclose(rollout.kl, 0.5 * (rollout.old_logprobs - rollout.ref_logprobs) ** 2)
    stats = trainer.update(rollout)
    assert stats["toy_ratio_max"] == pytest.approx(1.0, abs=1e-5)  # the first epoch's ratio is exactly 1
    assert "policy_clip_fraction" not in stats and stats["grad_norm"] > 0


def test_clipped_policy_loss_reads_its_settings():
    logprobs, old = torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2)
    settings = SimpleNamespace(clip_epsilon=0.2, clip_epsilon_high=None, dual_clip=None)
    loss, stats = clipped_policy_loss(logprobs, old, torch.ones(1, 2), torch.ones(1, 2), settings)
    assert loss.flatten().tolist() == pytest.approx([-1.2, -0.5]) and stats["policy_clip_fraction"].item() == 0.5
    settings.clip_epsilon_high = 0.6  # the upper clip range is its own setting
    loss, _ = clipped_policy_loss(logprobs, old, torch.ones(1, 2), torch.ones(1, 2), settings)
    assert loss.flatten().tolist() == pytest.approx([-1.5, -0.5])
