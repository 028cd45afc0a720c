"""PPOTrainer on a tiny random Qwen3 with the real Qwen tokenizer, loaded from disk through from_pretrained."""

import copy
import dataclasses
import logging
import math

import pytest
import torch
from conftest import CRITIC_FREE_RUNS, length_reward, space_reward_run, tiny_config, tiny_qwen3_config
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, set_seed

from ppo_lm import PPOConfig, PPOTrainer, RewardFunctionError, exact_kl, masked_mean
from ppo_lm.backend import Backend
from ppo_lm.generation import CPU_PASS_TOKENS, TokenBudget, backbone_of
from ppo_lm.models import (
    GRADIENT_IN_PLACE,
    FusedLoraLinear,
    body_autocast_dtype,
    response_logits,
    sequence_logprobs,
    sequence_scores,
    sequence_values,
)
from ppo_lm.rewards import WeightedRewards

PROMPTS = [
    "SUBREDDIT: r/cooking\nTITLE: Bread\nPOST: My bread never rises.\nTL;DR:",
    "Hello",
    "The weather today is sunny and warm, so we went to the beach",
    "TL;DR:",
]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    return PPOTrainer(tiny_config(tiny_model_dir), reward_fn=length_reward)


@pytest.mark.slow
def test_step_returns_texts_scores_and_float_statistics(trainer):
    stats = trainer.ppo_step(PROMPTS)
    assert len(stats["generated_texts"]) == len(PROMPTS)
    assert all(isinstance(text, str) for text in stats["generated_texts"])
    assert stats["rewards"] == pytest.approx([len(c) / 10 for c in stats["generated_texts"]])
    for key in ("value_loss", "policy_loss", "kl", "reward_mean", "entropy", "approx_kl", "policy_clip_fraction",
                "value_clip_fraction", "response_length", "kl_coef", "ppo_epochs_run", "time/generate",
                "time/logprobs", "time/reward", "time/values", "time/update", "time/step"):
        assert isinstance(stats[key], float) and math.isfinite(stats[key]), key
    assert stats["ppo_epochs_run"] == trainer.config.ppo_epochs
    assert 1 <= stats["response_length"] <= trainer.config.max_new_tokens


@pytest.mark.slow
def test_ratio_is_one_before_the_first_update(trainer):
    rollout = trainer.make_rollout(PROMPTS)
    # The update recomputes logprobs with gradients, on a minibatch with its padding trimmed.
    for index in (torch.arange(len(PROMPTS)), torch.tensor([2, 0])):
        minibatch = rollout.batch.select(index)
        width = minibatch.response_mask.shape[1]
        logprobs, _ = sequence_logprobs(trainer.models.policy, minibatch, trainer.config.temperature)
        ratio = torch.exp(logprobs - rollout.old_logprobs[index, :width])[minibatch.response_mask.bool()]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_reference_stays_fixed_while_the_policy_moves(trainer):
    batch = trainer.make_rollout(PROMPTS).batch
    mask = batch.response_mask.bool()

    def logprobs_now():
        with torch.no_grad():
            policy, _ = sequence_logprobs(trainer.models.policy, batch, 1.0)
            with trainer.models.reference_model() as reference:
                ref, _ = sequence_logprobs(reference, batch, 1.0)
        return policy[mask], ref[mask]

    policy_before, ref_before = logprobs_now()
    trainer.ppo_step(PROMPTS)
    trainer.ppo_step(PROMPTS)
    policy_after, ref_after = logprobs_now()
    assert torch.equal(ref_before, ref_after)
    assert (policy_before - policy_after).abs().max() > 1e-4


@pytest.mark.slow
def test_switching_roles_keeps_every_adapter_trainable_and_the_reference_is_peft_without_adapters(trainer):
    """`reference_model` and `value_mode` switch adapters through peft's tuner; after each, the policy adapter answers
    again and exactly the trained weights require gradients (a sharding backend reads requires_grad as it gathers)."""
    models = trainer.models
    assert models.value_adapter_on_policy and models.reference is None
    trainer.ppo_step(PROMPTS)  # both adapters away from their zero start, so the three roles answer differently
    batch = trainer.make_rollout(PROMPTS).batch
    trained = {id(p) for p in models.policy_parameters() + models.value_parameters()}

    def policy_logprobs():
        with torch.no_grad():
            return sequence_logprobs(models.policy, batch, 1.0)[0]

    before = policy_logprobs()
    with torch.no_grad():
        with models.reference_model() as reference:
            ours = sequence_logprobs(reference, batch, 1.0)[0]
        with models.policy.disable_adapter():  # peft's own way, the oracle
            peft_reference = sequence_logprobs(models.policy, batch, 1.0)[0]
    assert torch.equal(ours, peft_reference) and not torch.equal(ours, before)
    for switch in (models.reference_model, models.value_mode):
        with switch():
            pass
        assert torch.equal(policy_logprobs(), before)
        assert {id(p) for model in models.held() for p in model.parameters() if p.requires_grad} == trained


@pytest.mark.slow
def test_padding_is_inert(trainer):
    short = "Hello"
    batch = trainer.make_rollout([short, PROMPTS[0], PROMPTS[2]]).batch
    alone = batch.select(torch.tensor([0]))  # the short prompt's row, without the padding the long ones forced
    assert alone.input_ids.shape[1] < batch.input_ids.shape[1]
    models = trainer.models
    with torch.no_grad():
        batched_lp, _ = sequence_logprobs(models.policy, batch, 1.0)
        alone_lp, _ = sequence_logprobs(models.policy, alone, 1.0)
        with models.value_mode():
            batched_v = sequence_values(models.value_backbone, models.value_head, batch)
            alone_v = sequence_values(models.value_backbone, models.value_head, alone)
    n = int(alone.response_mask.sum())
    torch.testing.assert_close(batched_lp[0, :n], alone_lp[0, :n], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched_v[0, :n], alone_v[0, :n], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_mean_reward_rises_on_a_simple_reward(peaked_model_dir):
    """20 PPO steps on four seeds: the reward rises on each, and over the four it ends above 0.8.

    Over four seeds, not one: a change that keeps the math but adds in another order (a faster product) sends one
    seed down another sampled path, and on 2 to 3 seeds of 32 this run ends between 0.64 and 0.8 with the code before
    or after such a change (`benchmarks/learning_seeds.py`, benchmarks/RESULTS.md session 36). One seed's ending
    is a draw; four seeds' mean is the algorithm's.
    """

    firsts, lasts = [], []
    for seed in range(4):
        rewards = space_reward_run(peaked_model_dir, seed)
        firsts.append(sum(rewards[:5]) / 5)
        lasts.append(sum(rewards[-5:]) / 5)
    first, last = sum(firsts) / 4, sum(lasts) / 4
    assert 0.2 < first < 0.8, f"the property should start near half the time, got {firsts}"
    assert all(end > start for start, end in zip(firsts, lasts, strict=True)), (firsts, lasts)
    assert last > first + 0.2 and last > 0.8, (firsts, lasts)


def snapshot(trainer):
    parameters = {name: p.detach().clone() for name, p in trainer.models.policy.named_parameters()}
    parameters.update({f"head.{n}": p.detach().clone() for n, p in trainer.models.value_head.named_parameters()})
    return parameters, copy.deepcopy(trainer.optimizer.state_dict()), trainer.kl_controller.value, trainer.step_count


def assert_unchanged(trainer, before):
    parameters, optimizer_state, kl_coef, step_count = snapshot(trainer)
    assert parameters.keys() == before[0].keys()
    assert all(torch.equal(parameters[n], before[0][n]) for n in parameters)
    assert (kl_coef, step_count) == (before[2], before[3])
    assert optimizer_state["param_groups"] == before[1]["param_groups"]
    assert optimizer_state["state"].keys() == before[1]["state"].keys()
    for key, state in optimizer_state["state"].items():
        assert all(torch.equal(state[k], before[1]["state"][key][k]) for k in state)


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ([], ValueError, "empty"),
        (["fine", 3], TypeError, "prompts\\[1\\] is a int"),
        ("a single string", TypeError, "list of strings"),
        (["fine", ""], ValueError, "prompts\\[1\\] has no tokens"),
    ],
)
def test_bad_prompts_raise_and_change_nothing(trainer, prompts, error, message):
    trainer.ppo_step(PROMPTS)  # so the optimizer has state to protect
    before = snapshot(trainer)
    with pytest.raises(error, match=message):
        trainer.ppo_step(prompts)
    assert_unchanged(trainer, before)


@pytest.mark.slow
@pytest.mark.parametrize(
    "reward_fn, message",
    [
        (lambda p, c: 1 / 0, "reward_fn raised ZeroDivisionError"),
        (lambda p, c: [1.0] * (len(c) - 1), "returned 3 scores for 4 completions"),
        (lambda p, c: [float("nan")] * len(c), "finite"),
        (lambda p, c: [1.0] * (len(c) - 1) + [float("inf")], "finite"),
        (lambda p, c: None, "list of floats"),
        (lambda p, c: ["good"] * len(c), "finite number"),
    ],
)
def test_bad_reward_functions_raise_and_change_nothing(trainer, reward_fn, message):
    trainer.ppo_step(PROMPTS)
    before = snapshot(trainer)
    rewards, trainer.rewards = trainer.rewards, WeightedRewards([reward_fn])
    try:
        with pytest.raises(RewardFunctionError, match=message):
            trainer.ppo_step(PROMPTS)
    finally:
        trainer.rewards = rewards
    assert_unchanged(trainer, before)


@pytest.mark.slow
def test_a_prompt_longer_than_the_context_is_cut_from_the_left(trainer, caplog):
    long_prompt = "word " * 600 + "TL;DR:"  # more than the 512-position context minus max_new_tokens
    with caplog.at_level(logging.WARNING, logger="ppo_lm.generation"):
        rollout = trainer.make_rollout([long_prompt, "Hello"])
    assert "keep only their last" in caplog.text
    assert rollout.batch.prompt_width == 512 - trainer.config.max_new_tokens
    assert trainer.tokenizer.decode(rollout.batch.input_ids[0, : rollout.batch.prompt_width]).endswith("TL;DR:")


@pytest.mark.slow
def test_a_reward_model_that_returns_nan_raises_and_changes_nothing(tiny_model_dir, tiny_reward_model_dir):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, reward_model_name=tiny_reward_model_dir, ppo_epochs=1))
    trainer.ppo_step(PROMPTS[:4])  # so the optimizer has state to protect
    before = snapshot(trainer)
    with torch.no_grad():
        trainer.models.reward_model.score.weight.fill_(float("nan"))
    with pytest.raises(RewardFunctionError, match="The reward model scored completion 0 as nan"):
        trainer.ppo_step(PROMPTS[:4])
    assert_unchanged(trainer, before)


@pytest.mark.slow
def test_a_non_finite_loss_raises_and_changes_nothing(trainer):
    trainer.ppo_step(PROMPTS[:4])
    before = snapshot(trainer)
    rollout = trainer.make_rollout(PROMPTS[:4])
    rollout.advantages[0, 0] = float("nan")  # a valid token: the policy loss of the minibatch is NaN
    with pytest.raises(FloatingPointError, match=r"The policy loss is nan at PPO step \d+ \(epoch 1, minibatch 1 "
                                                 r"of 1\); this minibatch took no optimizer step"):
        trainer.update(rollout)
    assert_unchanged(trainer, before)
    assert all(p.grad is None for p in trainer.models.policy_parameters())  # no gradient left for the next step


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_tokens", [None, 8])  # 8: each row scored in a pass of its own
def test_reward_model_scores_at_the_last_real_token(tiny_model_dir, tiny_reward_model_dir, micro_batch_tokens):
    config = tiny_config(tiny_model_dir, reward_model_name=tiny_reward_model_dir, ppo_epochs=1,
                         micro_batch_tokens=micro_batch_tokens)
    trainer = PPOTrainer(config)
    rollout = trainer.make_rollout(PROMPTS[:2])
    passes = trainer._micro_batches(rollout.batch, torch.arange(2), collective=False)
    assert len(passes) == (2 if micro_batch_tokens else 1)
    reward_model = trainer.models.reward_model
    for row in range(2):
        keep = rollout.batch.attention_mask[row].bool()
        ids = rollout.batch.input_ids[row][keep].unsqueeze(0)  # the sequence alone, no padding at all
        with torch.no_grad():
            expected = reward_model(input_ids=ids).logits[0, 0].item()
        assert rollout.raw_scores[row].item() == pytest.approx(expected, abs=1e-4)
    stats = trainer.ppo_step(PROMPTS[:2])
    assert math.isfinite(stats["policy_loss"])


@pytest.mark.slow
def test_missing_eos_penalty_replaces_the_score(tiny_model_dir):
    config = tiny_config(tiny_model_dir, missing_eos_penalty=-1.0, max_new_tokens=3)
    trainer = PPOTrainer(config, reward_fn=lambda p, c: [5.0] * len(c))
    rollout = trainer.make_rollout(PROMPTS)
    expected = torch.where(rollout.ended, torch.tensor(5.0), torch.tensor(-1.0))
    assert torch.equal(rollout.scores, expected)
    assert torch.equal(rollout.raw_scores, torch.full((4,), 5.0))


@pytest.mark.slow
def test_target_kl_stops_the_epochs_early(tiny_model_dir):
    config = tiny_config(tiny_model_dir, target_kl=1e-9, ppo_epochs=4, num_mini_batches=2, learning_rate=1e-2)
    trainer = PPOTrainer(config, reward_fn=length_reward)
    stats = trainer.ppo_step(PROMPTS)
    # The first minibatch has ratio 1 (KL 0) and steps; the next one sees KL > 1e-9 and stops the update.
    assert stats["optimizer_steps"] == 1.0 and stats["ppo_epochs_run"] == 0.5


@pytest.mark.slow
def test_full_fine_tuning_keeps_a_frozen_reference(tiny_model_dir):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, use_lora=False, ppo_epochs=1), reward_fn=length_reward)
    assert trainer.models.reference is not None
    reference_before = {n: p.clone() for n, p in trainer.models.reference.named_parameters()}
    policy_before = {n: p.clone() for n, p in trainer.models.policy.named_parameters()}
    trainer.ppo_step(PROMPTS)
    assert all(torch.equal(p, reference_before[n]) for n, p in trainer.models.reference.named_parameters())
    assert any(not torch.equal(p, policy_before[n]) for n, p in trainer.models.policy.named_parameters())


@pytest.mark.slow
def test_value_model_from_the_reward_model(tiny_model_dir, tiny_reward_model_dir):
    config = tiny_config(tiny_model_dir, value_model_name=tiny_reward_model_dir, ppo_epochs=1)
    trainer = PPOTrainer(config, reward_fn=length_reward)
    value_before = [p.detach().clone() for p in trainer.models.value_parameters()]
    stats = trainer.ppo_step(PROMPTS)
    assert math.isfinite(stats["value_loss"]) and stats["grad_norm"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(trainer.models.value_parameters(), value_before, strict=True))


def test_no_reward_is_an_error(tiny_model_dir):
    with pytest.raises(ValueError, match="No reward"):
        PPOTrainer(tiny_config(tiny_model_dir))


@pytest.mark.slow
def test_micro_batches_give_the_same_rollout_and_update_as_one_pass(tiny_model_dir):
    """Rows (micro_batch_size) or a token budget (micro_batch_tokens) against the whole minibatch in one pass, in
    float32: the same samples; the same rollout tensors, losses and gradient norms to 1e-5 (absolute) or 1e-4
    (relative); after 8 AdamW steps, weights within 1 % of each tensor's update of the plain path's.

    Adam divides each gradient by its running size, so a component whose gradient is near 0 turns a rounding
    difference (the passes add their parts in another order) into a step of up to the learning rate: the weights
    are compared by how far they moved, not element by element."""
    prompts = PROMPTS * 2
    results = []
    before = None
    # A budget of 24 tokens: each row of PROMPTS[0] (24 prompt tokens and a response) is over it and gets a pass of
    # its own; the short prompts (1 and 4 tokens) share theirs.
    for sizing in ({"micro_batch_tokens": None}, {"micro_batch_size": 3}, {"micro_batch_tokens": 24}):
        config = tiny_config(tiny_model_dir, batch_size=8, num_mini_batches=2, **sizing)
        trainer = PPOTrainer(config, reward_fn=length_reward)
        before = before or {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        rollout = trainer.make_rollout(prompts)
        if sizing.get("micro_batch_tokens"):
            groups = [rollout.batch.select(index) for index in trainer._micro_batches(rollout.batch, torch.arange(8),
                                                                                      collective=True)]
            assert len(groups) > 2
            assert all(group.input_ids.numel() <= 24 or len(group.input_ids) == 1 for group in groups)
            assert any(group.input_ids.numel() > 24 for group in groups)  # a long prompt's row, alone
            assert any(len(group.input_ids) > 1 for group in groups)
        stats = trainer.update(rollout)
        weights = {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        results.append((rollout, stats, weights))
    plain, plain_stats, plain_weights = results[0]
    for micro, micro_stats, micro_weights in results[1:]:
        assert torch.equal(plain.batch.input_ids, micro.batch.input_ids)  # same seed, same samples
        mask = plain.batch.response_mask.bool()
        for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "entropy"):
            torch.testing.assert_close(getattr(plain, name)[mask], getattr(micro, name)[mask], atol=1e-5, rtol=1e-4)
        for name in ("policy_loss", "value_loss", "approx_kl", "policy_clip_fraction", "ratio_mean", "grad_norm"):
            assert plain_stats[name] == pytest.approx(micro_stats[name], rel=1e-4, abs=1e-5), name
        for name in plain_weights:
            moved = (plain_weights[name] - before[name]).norm().item()
            assert (plain_weights[name] - micro_weights[name]).norm().item() <= 1e-2 * moved + 1e-6, name


def two_ppo_steps(trainer: PPOTrainer) -> tuple:
    """The first step's rollout, both steps' update statistics, and the trained weights after them."""
    rollout = trainer.make_rollout(PROMPTS)
    stats = trainer.update(rollout)
    stats.update(trainer.ppo_step(PROMPTS))
    return rollout, stats, {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}


def assert_same_float32_steps(fast: tuple, plain: tuple, before: dict) -> None:
    """Two runs of `two_ppo_steps` that differ only in float32 rounding: the same samples; rollout tensors, losses
    and gradient norms to 1e-5 (absolute) or 1e-4 (relative); weights within 1 % of each tensor's update (see the
    micro-batch test for why updates, not elements)."""
    (fast_rollout, fast_stats, fast_weights), (plain_rollout, plain_stats, plain_weights) = fast, plain
    assert torch.equal(fast_rollout.batch.input_ids, plain_rollout.batch.input_ids)
    mask = plain_rollout.batch.response_mask.bool()
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "entropy"):
        if getattr(plain_rollout, name) is not None:
            torch.testing.assert_close(getattr(fast_rollout, name)[mask], getattr(plain_rollout, name)[mask],
                                       atol=1e-5, rtol=1e-4)
    for name in ("policy_loss", "value_loss", "kl_loss", "entropy", "approx_kl", "ratio_mean", "grad_norm"):
        if name in plain_stats:
            assert fast_stats[name] == pytest.approx(plain_stats[name], rel=1e-4, abs=1e-5), name
    for name in plain_weights:
        moved = (plain_weights[name] - before[name]).norm().item()
        assert moved > 0, name
        assert (plain_weights[name] - fast_weights[name]).norm().item() <= 1e-2 * moved + 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"temperature": 0.7},
    {"use_lora": False, "kl_loss_coef": 0.1},
    {"shared_value_trunk": True, "ppo_epochs": 1, "num_mini_batches": 1, "kl_coef": 0.0},
], ids=["lora", "full", "shared-trunk-one-pass"])
def test_the_fused_head_gives_the_plain_paths_rollout_losses_and_weights(tiny_model_dir, overrides):
    """Logprobs through `head_token_logprobs` (the default for a model whose logits are its head on its last hidden
    state) against the model's own forward and `cross_entropy`, in float32, to `assert_same_float32_steps`'
    tolerances."""
    results = []
    before = None
    for fused in (True, False):
        trainer = PPOTrainer(tiny_config(tiny_model_dir, **overrides), reward_fn=length_reward)
        assert trainer.models.fused_head  # Qwen3's logits are its head on its last hidden state
        trainer.models.fused_head = fused
        assert trainer.update_reads_old_logprobs == ("shared_value_trunk" in overrides)
        before = before or {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        results.append(two_ppo_steps(trainer))
    assert_same_float32_steps(*results, before)


@pytest.mark.parametrize("overrides", [
    {},
    {"advantage_estimator": "grpo", "num_generations": 2, "kl_coef": 0.0, "kl_loss_coef": 0.1},
], ids=["gae-separate-value-model", "grpo"])
def test_vocabulary_gradients_added_in_place_give_autograds_rollout_losses_and_weights(tiny_model_dir, monkeypatch,
                                                                                      overrides):
    """Full fine-tuning in micro-batches of 2 rows, the head's and the embeddings' gradients added into `.grad` in
    place (`add_vocabulary_gradients_in_place`, the replicated backend's default) against autograd's own
    accumulation (a backend that does not allow it), in float32, to `assert_same_float32_steps`' tolerances."""
    results = []
    before = None
    for in_place in (True, False):
        monkeypatch.setattr(Backend, "can_add_gradients_in_place", in_place)
        trainer = PPOTrainer(tiny_config(tiny_model_dir, use_lora=False, micro_batch_size=2, temperature=0.7,
                                         **overrides), reward_fn=length_reward)
        marked = [p for p in trainer.models.named_trainable().values() if getattr(p, GRADIENT_IN_PLACE, False)]
        assert len(marked) == (0 if not in_place else 1 if "num_generations" in overrides else 2)
        before = before or {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        results.append(two_ppo_steps(trainer))
    assert_same_float32_steps(*results, before)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"temperature": 0.7},
    {"advantage_estimator": "grpo", "num_generations": 2, "kl_coef": 0.0, "kl_loss_coef": 0.1, "lora_alpha": 24},
], ids=["gae-policy-and-value-adapters", "grpo-scaling-1.5"])
def test_fused_lora_layers_give_the_plain_paths_rollout_losses_and_weights(tiny_model_dir, monkeypatch, overrides):
    """LoRA layers whose up-projection is added to the base output in one `addmm` (`fuse_lora_layers`, the
    default) against peft's own forward, in float32, to `assert_same_float32_steps`' tolerances: `addmm` rounds the
    scaled sum once where peft rounds three times (a scaling of 2 is exact, 1.5 is not)."""
    results = []
    before = None
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr("ppo_lm.models.fuse_lora_layers", lambda model: 0)
        trainer = PPOTrainer(tiny_config(tiny_model_dir, **overrides), reward_fn=length_reward)
        layers = [m for m in trainer.models.policy.modules() if isinstance(m, FusedLoraLinear)]
        assert bool(layers) == fused
        before = before or {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        results.append(two_ppo_steps(trainer))
    assert_same_float32_steps(*results, before)


def test_micro_batch_size_wins_over_the_token_budget_and_auto_reads_the_model(trainer):
    assert trainer.config.micro_batch_tokens == "auto"  # the default
    model = trainer.models.policy.config
    per_token = 17 * model.num_hidden_layers * model.hidden_size * 4
    tokens = min(CPU_PASS_TOKENS, 2**30 // per_token)  # the tiny model: the CPU's cap decides
    assert trainer.token_budget == (max(256, tokens), 1 + 4 * model.vocab_size / per_token)
    body = backbone_of(trainer.models.policy)
    body.autocast_dtype = torch.bfloat16  # as `autocast_bodies` marks it: each value also has a 2-byte copy
    try:
        assert trainer._token_budget().response_cost == 1 + 4 * model.vocab_size / (per_token * 6 / 4)
    finally:
        del body.autocast_dtype
    plain_head = copy.copy(trainer)  # a model that keeps its whole logits: three float32 rows per response position
    plain_head.models = dataclasses.replace(trainer.models, fused_head=False)
    assert plain_head._token_budget().response_cost == 1 + 3 * 4 * model.vocab_size / per_token
    explicit = copy.copy(trainer)
    explicit.config = dataclasses.replace(trainer.config, micro_batch_size=2)
    assert explicit._token_budget() is None
    explicit.config = dataclasses.replace(trainer.config, micro_batch_tokens=None)
    assert explicit._token_budget() is None
    explicit.config = dataclasses.replace(trainer.config, micro_batch_tokens=100)
    assert explicit._token_budget() == (100, 1.0)  # a budget the user sets counts padded tokens


def test_every_process_runs_as_many_token_budget_passes_as_the_busiest(trainer, monkeypatch):
    """Sharded weights are gathered in every forward and backward pass, so every process must run the same number:
    a process with fewer groups than another halves its largest ones (here the other process reports 3)."""
    import ppo_lm.ppo_trainer as module

    batch = trainer.make_rollout(PROMPTS).batch
    local = copy.copy(trainer)
    local.token_budget = TokenBudget(10**6)  # everything in one group on this process
    local.layout = dataclasses.replace(trainer.layout, processes=2)
    monkeypatch.setattr(module, "all_sum", lambda counts: counts + torch.tensor([0.0, 3.0]))
    index = torch.arange(len(PROMPTS))
    assert len(local._micro_batches(batch, index, collective=False)) == 1  # passes on whole weights: no agreement
    groups = local._micro_batches(batch, index, collective=True)
    assert len(groups) == 3 and sorted(torch.cat(groups).tolist()) == index.tolist()  # every row, once


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir):
    weights = []
    for checkpointing in (False, True):
        trainer = PPOTrainer(tiny_config(tiny_model_dir, gradient_checkpointing=checkpointing, ppo_epochs=1),
                             reward_fn=length_reward)
        trainer.ppo_step(PROMPTS)
        weights.append({n: p.detach().clone() for n, p in trainer.models.named_trainable().items()})
        assert not trainer.models.policy.training  # back in eval mode after the update
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_max_grad_norm_of_zero_turns_clipping_off(tiny_model_dir):
    weights = []
    for max_grad_norm in (0.0, 1e9, 1e-4):
        trainer = PPOTrainer(tiny_config(tiny_model_dir, ppo_epochs=1, max_grad_norm=max_grad_norm),
                             reward_fn=length_reward)
        trainer.ppo_step(PROMPTS)
        weights.append({n: p.detach().clone() for n, p in trainer.models.named_trainable().items()})
    off, unclipped, clipped = weights
    for name in off:
        torch.testing.assert_close(off[name], unclipped[name])
    assert any(not torch.allclose(clipped[name], unclipped[name]) for name in off)


@pytest.mark.slow
def test_an_update_trains_the_value_adapter_and_head_as_well_as_the_policy(tiny_model_dir):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, ppo_epochs=1), reward_fn=length_reward)
    before = {name: tensor.detach().clone() for name, tensor in trainer.models.named_trainable().items()}
    trainer.ppo_step(PROMPTS)
    moved = {name for name, tensor in trainer.models.named_trainable().items() if not torch.equal(tensor, before[name])}
    # lora_B starts at zero, so after one step only the B matrices (and the head) can have moved.
    for prefix in ("policy.", "value.", "value_head."):
        assert any(name.startswith(prefix) for name in moved), prefix
    assert any(".lora_B.value." in name for name in moved)


@pytest.mark.slow
@pytest.mark.parametrize("estimator, sizing", [({}, {"micro_batch_size": 3}),
                                               ({"advantage_estimator": "rloo", "num_generations": 2},
                                                {"micro_batch_size": 3}),
                                               ({}, {"micro_batch_tokens": 24})],
                         ids=["gae", "rloo", "gae-token-budget"])
def test_caching_the_frozen_layers_gives_the_same_rollout_and_update(tiny_model_dir, estimator, sizing):
    """The fast path (bottom layer run once per rollout) against the plain one (every pass runs every layer)."""
    results = []
    critic_free = bool(estimator)
    for cache in (False, True):
        config = tiny_config(tiny_model_dir, lora_target_modules=["q_proj", "v_proj", "down_proj"], lora_layers=[1],
                             cache_frozen_layers=cache, batch_size=8, ppo_epochs=2, **sizing, **estimator)
        trainer = PPOTrainer(config, reward_fn=length_reward)
        assert trainer.frozen_layers == (1 if cache else 0)
        rollout = trainer.make_rollout((PROMPTS * 2)[: config.items_per_step])
        assert (rollout.batch.prefix_hidden is not None) == cache
        stats = trainer.update(rollout)
        weights = {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        results.append((rollout, stats, weights))
    (plain, plain_stats, plain_weights), (cached, cached_stats, cached_weights) = results
    assert torch.equal(plain.batch.input_ids, cached.batch.input_ids)
    mask = plain.batch.response_mask.bool()
    for name in ("old_logprobs", "ref_logprobs", "advantages", "entropy") + (() if critic_free else ("values",)):
        torch.testing.assert_close(getattr(plain, name)[mask], getattr(cached, name)[mask], atol=1e-5, rtol=1e-4)
    for name in ("policy_loss", "approx_kl", "policy_clip_fraction", "ratio_mean", "grad_norm") + (
            () if critic_free else ("value_loss",)):
        assert plain_stats[name] == pytest.approx(cached_stats[name], rel=1e-4, abs=1e-6), name
    assert plain_stats["grad_norm"] > 0
    for name in plain_weights:
        torch.testing.assert_close(plain_weights[name], cached_weights[name], atol=1e-5, rtol=1e-4)
    # The decoder has all its layers back after every pass.
    assert len(backbone_of(trainer.models.policy).layers) == 2


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"micro_batch_size": 3},
                                      {"micro_batch_tokens": 24},
                                      {"use_lora": False, "micro_batch_size": 3},
                                      {"lora_target_modules": ["q_proj", "down_proj"], "lora_layers": [1],
                                       "micro_batch_size": 3}],
                         ids=["lora", "lora-token-budget", "full", "lora-layers-too"])
def test_value_layers_train_the_top_layers_and_their_cache_keeps_the_numbers(tiny_model_dir, settings, tmp_path):
    """`value_layers: 1` trains the value model's top layer (and head) only; the fast path, its frozen bottom layer
    run once per rollout, gives the plain path's rollout, losses and weights (every value pass running every
    layer), in a second step, where the policy's adapter has moved away from the base the value layers start
    from."""
    results = []
    for cache in (False, True):
        config = tiny_config(tiny_model_dir, value_layers=1, cache_frozen_layers=cache, batch_size=8, ppo_epochs=2,
                             **settings)
        trainer = PPOTrainer(config, reward_fn=length_reward)
        shared = 1 if cache and "lora_layers" in settings else 0  # every role's bottom layer is cached already
        assert (trainer.frozen_layers, trainer.value_frozen_layers) == (shared, 1 if cache and not shared else 0)
        value_names = [name for name in trainer.models.named_trainable() if name.startswith("value.")]
        assert any(".layers.1." in name for name in value_names)  # and the final norm, in full fine-tuning
        assert not any(".layers.0." in name or "embed_tokens" in name for name in value_names)
        if settings.get("use_lora", True):  # the policy's adapter is where it was
            policy_names = [name for name in trainer.models.named_trainable() if name.startswith("policy.")]
            assert any(".layers.0." in name for name in policy_names) == ("lora_layers" not in settings)
        trainer.ppo_step((PROMPTS * 2)[: config.items_per_step])  # policy and value weights no longer the base's
        before = {name: tensor.detach().clone() for name, tensor in trainer.models.named_trainable().items()}
        rollout = trainer.make_rollout((PROMPTS * 2)[: config.items_per_step])
        assert (rollout.value_batch is not None) == (cache and not shared)
        stats = trainer.update(rollout)
        weights = {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        assert any(not torch.equal(weights[name], before[name]) for name in value_names)
        results.append((rollout, stats, weights))
    (plain, plain_stats, plain_weights), (cached, cached_stats, cached_weights) = results
    assert torch.equal(plain.batch.input_ids, cached.batch.input_ids)
    mask = plain.batch.response_mask.bool()
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(plain, name)[mask], getattr(cached, name)[mask], atol=1e-5, rtol=1e-4)
    for name in ("policy_loss", "value_loss", "value_clip_fraction", "approx_kl", "grad_norm"):
        assert plain_stats[name] == pytest.approx(cached_stats[name], rel=1e-4, abs=1e-6), name
    assert plain_stats["value_loss"] > 0
    assert plain_weights.keys() == cached_weights.keys()
    for name in plain_weights:
        torch.testing.assert_close(plain_weights[name], cached_weights[name], atol=1e-5, rtol=1e-4)
    assert len(backbone_of(trainer.models.value_backbone).layers) == 2  # every layer back after the passes
    # A checkpoint holds the trained layers only and resumes into a new trainer with the same setting.
    trainer.save_state(tmp_path)
    again = PPOTrainer(config, reward_fn=length_reward)
    again.load_state(tmp_path)
    for name, tensor in again.models.named_trainable().items():
        assert torch.equal(tensor, trainer.models.named_trainable()[name]), name


@pytest.mark.slow
def test_value_layers_beyond_the_model_say_how_many_it_has(tiny_model_dir):
    with pytest.raises(ValueError, match="value_layers is 3, but .* has 2 decoder layers"):
        PPOTrainer(tiny_config(tiny_model_dir, value_layers=3), reward_fn=length_reward)


@pytest.mark.slow
def test_evaluation_reports_the_exact_kl_and_greedy_responses_when_asked(tiny_model_dir):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, eval_greedy=True, temperature=0.7), reward_fn=length_reward)
    metrics, samples = trainer.evaluate(PROMPTS)
    assert metrics["eval/kl"] == 0.0  # the policy adapter starts as the identity: policy == reference
    assert [s["reward"] for s in samples] == pytest.approx([len(s["completion"]) / 10 for s in samples])
    trainer.ppo_step(PROMPTS)
    metrics, samples = trainer.evaluate(PROMPTS)
    assert trainer.evaluate(PROMPTS)[1] == samples  # greedy and seeded: the same weights give the same samples
    # Greedy: every response token is the policy's most likely next token.
    batch, _ = trainer._generate(PROMPTS, trainer.greedy_config)
    with torch.no_grad():
        logits = response_logits(trainer.models.policy, batch, trainer.config.temperature)
        with trainer.models.reference_model() as reference:
            ref_logits = response_logits(reference, batch, trainer.config.temperature)
    mask = batch.response_mask.bool()
    assert torch.equal(logits.argmax(-1)[mask], batch.responses[mask])
    # The KL of each sample: the exact KL of the next-token distributions, summed over its response.
    expected = torch.where(mask, exact_kl(logits, ref_logits), 0.0).sum(-1)
    assert [s["kl"] for s in samples] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-7)
    assert metrics["eval/kl"] == pytest.approx(expected.mean().item(), rel=1e-4) and metrics["eval/kl"] > 0
    assert metrics["eval/response_length"] == pytest.approx(mask.sum(-1).float().mean().item())


@pytest.mark.slow
def test_evaluation_samples_each_prompt_several_times(tiny_model_dir):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, eval_samples_per_prompt=3, batch_size=4), reward_fn=length_reward)
    metrics, samples = trainer.evaluate(PROMPTS[:2])
    assert [s["prompt"] for s in samples] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert len({s["completion"] for s in samples[:3]}) > 1  # sampled, not repeated
    assert metrics["eval/reward_mean"] == pytest.approx(sum(s["reward"] for s in samples) / 6)
    with pytest.raises(ValueError, match="eval_samples_per_prompt.*must be 1 with eval_greedy"):
        tiny_config(tiny_model_dir, eval_samples_per_prompt=2, eval_greedy=True).validate()


@pytest.mark.slow
def test_evaluation_of_the_reference_and_a_greedy_override(tiny_model_dir):
    """`evaluate(greedy=True)` gives one greedy response per prompt whatever eval_samples_per_prompt says, and
    `reference=True` evaluates where the run started: after a step it still gives the untrained policy's responses."""
    trainer = PPOTrainer(tiny_config(tiny_model_dir, eval_samples_per_prompt=2, batch_size=4), reward_fn=length_reward)
    _, untrained = trainer.evaluate(PROMPTS, greedy=True)
    assert [s["prompt"] for s in untrained] == PROMPTS
    trainer.ppo_step(PROMPTS)
    _, trained = trainer.evaluate(PROMPTS, greedy=True)
    _, reference = trainer.evaluate(PROMPTS, greedy=True, reference=True)
    assert reference == [{**s, "kl": 0.0} for s in untrained]
    assert trained != untrained and any(s["kl"] > 0 for s in trained)
    assert len(trainer.evaluate(PROMPTS)[1]) == 2 * len(PROMPTS)  # the config's sampled evaluation is unchanged


@pytest.mark.slow
def test_cached_frozen_layers_work_with_gradient_checkpointing(tiny_model_dir):
    weights = []
    for cache, checkpointing in ((False, False), (True, True)):
        config = tiny_config(tiny_model_dir, lora_target_modules=["q_proj", "down_proj"], lora_layers=[1],
                             cache_frozen_layers=cache, gradient_checkpointing=checkpointing, ppo_epochs=1)
        trainer = PPOTrainer(config, reward_fn=length_reward)
        trainer.ppo_step(PROMPTS)
        weights.append({n: p.detach().clone() for n, p in trainer.models.named_trainable().items()})
    assert any(not torch.equal(w, torch.zeros_like(w)) for n, w in weights[1].items() if ".lora_B." in n)
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-5, rtol=1e-4)


# --- a reward model with its own tokenizer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vocabulary_reward_model(tmp_path_factory):
    """A tiny reward model with its own word-level vocabulary, unrelated to the policy's Qwen tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "</s>", "hello", "the", "weather", "is", "sunny", "a", "TL;DR:", "Hello"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    path = tmp_path_factory.mktemp("other-vocab-reward")
    torch.manual_seed(2)
    config = tiny_qwen3_config(len(words), num_labels=1, pad_token_id=1, eos_token_id=2)
    from transformers import Qwen3ForSequenceClassification

    Qwen3ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


@pytest.mark.slow
def test_a_reward_model_with_another_tokenizer_scores_the_text(tiny_model_dir, other_vocabulary_reward_model):
    reward_dir, reward_tokenizer = other_vocabulary_reward_model
    config = PPOConfig(model_name=tiny_model_dir, reward_model_name=reward_dir, batch_size=2, max_new_tokens=4,
                       ppo_epochs=1, device="cpu")
    trainer = PPOTrainer(config)
    assert trainer.reward_tokenizer is not None  # the vocabularies differ: the text is tokenised again
    prompts = ["Hello the weather is", "TL;DR:"]
    rollout = trainer.make_rollout(prompts)
    texts = [p + c for p, c in zip(prompts, rollout.completions, strict=True)]
    with torch.no_grad():
        for i, text in enumerate(texts):  # each row alone; EOS after a response that ended, as `ppo-lm reward` trains
            ids = reward_tokenizer(text)["input_ids"] + ([reward_tokenizer.eos_token_id] if rollout.ended[i] else [])
            ids = torch.tensor([ids])
            expected = sequence_scores(trainer.models.reward_model, ids, torch.ones_like(ids))
            torch.testing.assert_close(rollout.raw_scores[i : i + 1], expected)
    stats = trainer.ppo_step(prompts)  # a whole step on the re-tokenised scores
    assert math.isfinite(stats["reward_mean"]) and math.isfinite(stats["policy_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_tokens", [None, 16])  # 16: the texts scored in several passes
def test_a_reward_model_with_another_tokenizer_reads_ended_responses_at_its_eos(eos_model_dir,
                                                                               other_vocabulary_reward_model,
                                                                               micro_batch_tokens):
    reward_dir, reward_tokenizer = other_vocabulary_reward_model
    prompts = (PROMPTS[1:] + ["Hello the weather is"]) * 2
    trainer = PPOTrainer(tiny_config(eos_model_dir, reward_model_name=reward_dir, batch_size=len(prompts),
                                     micro_batch_tokens=micro_batch_tokens))
    assert trainer.reward_tokenizer is not None
    rollout = trainer.make_rollout(prompts)
    assert rollout.ended.any() and not rollout.ended.all(), "the batch must hold ended and cut-off rows"
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    eos = reward_tokenizer.eos_token_id

    def plain_score(text: str, with_eos: bool) -> float:
        """A plain HF forward on the row alone, read at its last token (the EOS when there is one)."""
        ids = reward_tokenizer(text)["input_ids"] + ([eos] if with_eos else [])
        with torch.no_grad():
            return reward_model.score(reward_model.model(input_ids=torch.tensor([ids]))[0])[0, -1, 0].item()

    for i, (prompt, completion) in enumerate(zip(prompts, rollout.completions, strict=True)):
        expected = plain_score(prompt + completion, with_eos=bool(rollout.ended[i]))
        assert rollout.raw_scores[i].item() == pytest.approx(expected, abs=1e-4), i
    # The evaluation scores its samples the same way: a response shorter than max_new_tokens ended.
    _, samples = trainer.evaluate(prompts)
    shorter = [sample for sample in samples if sample["length"] < trainer.config.max_new_tokens]
    assert shorter
    for sample in shorter:
        expected = plain_score(sample["prompt"] + sample["completion"], with_eos=True)
        assert sample["reward"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_a_reward_model_with_the_same_tokenizer_shares_the_tokens(tiny_model_dir, tiny_reward_model_dir):
    config = PPOConfig(model_name=tiny_model_dir, reward_model_name=tiny_reward_model_dir, batch_size=2,
                       max_new_tokens=2, device="cpu")
    assert PPOTrainer(config).reward_tokenizer is None


# --- critic-free estimators, groups, where the KL goes -------------------------------------------------------------

GROUP_PROMPTS = ["The weather today is", "My favourite food:"]


@pytest.mark.slow
@pytest.mark.parametrize("run", list(CRITIC_FREE_RUNS))
def test_each_critic_free_estimator_raises_the_mean_reward(peaked_model_dir, run):
    """16 steps on two seeds: on each, the last four steps' mean reward is above the first step's (the untrained
    policy's samples); over the two, it is above 0.8 and 0.3 above the first step's.

    Two seeds, not one: over 16 seeds per estimator (`benchmarks/learning_seeds.py --run NAME`, benchmarks/RESULTS.md
    session 37) one seed's run missed the one-seed check (last four above 0.8 and 0.2 above the first four) on 4 of
    96 runs, so a same-math change that reshuffles the sampled paths would fail one of these six cases about one time
    in four by chance; this check passed on all 90 pairs of consecutive seeds there, the closest by 0.067."""
    firsts, lasts = [], []
    for seed in (0, 1):
        rewards = space_reward_run(peaked_model_dir, seed, steps=16, **CRITIC_FREE_RUNS[run])
        firsts.append(rewards[0])
        lasts.append(sum(rewards[-4:]) / 4)
    assert all(end > start for start, end in zip(firsts, lasts, strict=True)), (firsts, lasts)
    first, last = sum(firsts) / 2, sum(lasts) / 2
    assert last > 0.8 and last > first + 0.3, (firsts, lasts)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_a_critic_free_run_has_no_value_model_and_its_checkpoint_holds_none(tiny_model_dir, tmp_path, use_lora):
    from safetensors.torch import load_file

    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="rloo", num_generations=2, use_lora=use_lora),
                         reward_fn=length_reward)
    models = trainer.models
    assert models.value_head is None and models.value_backbone is None and models.value_parameters() == []
    assert len(trainer.optimizer.param_groups) == 1  # the policy's alone
    if use_lora:  # one adapter on the base: the policy's
        assert not any(".value." in name for name, _ in models.policy.named_parameters())
    stats = trainer.ppo_step(GROUP_PROMPTS)
    assert not {"value_loss", "value_mean", "value_clip_fraction", "time/values"} & stats.keys()
    trainer.save_state(tmp_path)
    saved = load_file(str(tmp_path / "trainable.safetensors"))
    assert saved and all(name.startswith("policy.") for name in saved)
    # The same config with gae holds a value model: the count above is not zero by construction.
    gae = PPOTrainer(tiny_config(tiny_model_dir, use_lora=use_lora), reward_fn=length_reward)
    assert len(gae.models.value_parameters()) > 0


@pytest.mark.slow
def test_groups_are_consecutive_rows_of_one_prompt_and_their_statistics_are_logged(tiny_model_dir):
    seen = {}

    def constant_for_the_second_prompt(prompts, completions):
        seen["prompts"] = list(prompts)
        return [0.5 if p == GROUP_PROMPTS[1] else float(len(c)) for p, c in zip(prompts, completions, strict=True)]

    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="grpo", num_generations=2),
                         reward_fn=constant_for_the_second_prompt)
    rollout = trainer.make_rollout(GROUP_PROMPTS)
    assert seen["prompts"] == [GROUP_PROMPTS[0]] * 2 + [GROUP_PROMPTS[1]] * 2
    assert rollout.batch.input_ids.shape[0] == 4
    assert torch.equal(rollout.batch.input_ids[0, : rollout.batch.prompt_width],
                       rollout.batch.input_ids[1, : rollout.batch.prompt_width])
    assert rollout.zero_variance.tolist()[1] is True  # the second prompt's group scored 0.5 twice
    assert torch.equal(rollout.advantages[2:], torch.zeros_like(rollout.advantages[2:]))
    assert rollout.statistics()["zero_variance_groups"] == (0.5 if rollout.zero_variance[0] == 0 else 1.0)


@pytest.mark.slow
def test_dropping_zero_variance_groups_leaves_them_out_and_skips_an_update_without_signal(tiny_model_dir):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="grpo", num_generations=2,
                                     drop_zero_variance_groups=True),
                         reward_fn=lambda prompts, completions: [1.0] * len(completions))
    before = snapshot_policy(trainer)
    stats = trainer.ppo_step(GROUP_PROMPTS)
    assert stats["zero_variance_groups"] == 1.0 and stats["optimizer_steps"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in trainer.models.policy.named_parameters())
    rollout = trainer.make_rollout(GROUP_PROMPTS)
    assert rollout.update_mask.sum() == 0 and rollout.batch.response_mask.sum() > 0


def snapshot_policy(trainer):
    return {name: p.detach().clone() for name, p in trainer.models.policy.named_parameters()}


@pytest.mark.slow
def test_without_a_kl_term_there_is_no_reference_pass(tiny_model_dir, monkeypatch):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="grpo", num_generations=2, kl_coef=0.0),
                         reward_fn=length_reward)

    def no_reference():
        raise AssertionError("the reference model was used")

    monkeypatch.setattr(trainer.models, "reference_model", no_reference)
    stats = trainer.ppo_step(GROUP_PROMPTS)
    assert "kl" not in stats and "kl_loss" not in stats and stats["optimizer_steps"] == 4


@pytest.mark.slow
def test_the_kl_in_the_loss_is_k3_to_the_reference_with_gradients(tiny_model_dir):
    from ppo_lm.losses import kl_k3

    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="grpo", num_generations=2, kl_coef=0.0,
                                     kl_loss_coef=0.5, ppo_epochs=1),
                         reward_fn=lambda prompts, completions: [1.0] * len(completions))  # no policy-loss signal
    trainer.update_reads_old_logprobs = False  # the rollout's own old logprobs, to compute the KL term from
    # Move the policy away from the reference first, so that the KL term is not zero.
    with torch.no_grad():
        for name, parameter in trainer.models.policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    rollout = trainer.make_rollout(GROUP_PROMPTS)
    mask = rollout.batch.response_mask
    expected = masked_mean(kl_k3(rollout.old_logprobs, rollout.ref_logprobs), mask).item()
    before = snapshot_policy(trainer)
    stats = trainer.update(rollout)
    # The first (only) epoch's logprobs are the rollout's: its KL term is the k3 of old against reference.
    assert expected > 1e-4 and stats["kl_loss"] == pytest.approx(expected, rel=1e-4)
    assert stats["policy_loss"] == pytest.approx(0.0, abs=1e-7)  # every advantage is 0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.models.policy.named_parameters())  # KL alone moved it


@pytest.mark.slow
def test_weighted_reward_functions_read_the_rows_columns_and_are_logged_each(tiny_model_dir):
    def exact_answer(prompts, completions, answer):
        return [1.0 if a == "4" else 0.0 for a in answer]

    def brevity(prompts, completions):
        return [-float(len(c)) for c in completions]

    trainer = PPOTrainer(tiny_config(tiny_model_dir, advantage_estimator="grpo", num_generations=2,
                                     reward_weights=[2.0, 0.5]),
                         reward_fn=[exact_answer, brevity])
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 2 + 3?", "answer": "5"}]
    stats = trainer.ppo_step(rows)
    lengths = [len(text) for text in stats["generated_texts"]]
    expected = [2.0 * a - 0.5 * n for a, n in zip([1, 1, 0, 0], lengths, strict=True)]
    assert stats["rewards"] == pytest.approx(expected)
    assert stats["reward/exact_answer"] == pytest.approx(0.5)
    assert stats["reward/brevity"] == pytest.approx(-sum(lengths) / 4)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    dict(advantage_estimator="grpo", num_generations=2, kl_loss_coef=0.1, ppo_epochs=1),
    dict(advantage_estimator="grpo", num_generations=2, kl_loss_coef=0.1, ppo_epochs=2, micro_batch_size=3),
    dict(ppo_epochs=2),
], ids=["grpo-one-epoch", "grpo-two-epochs-micro-batches", "gae-two-epochs"])
def test_the_updates_first_pass_gives_the_old_logprobs_and_the_plain_paths_numbers(tiny_model_dir, overrides):
    # One minibatch per epoch, no KL in the reward: the rollout skips its old-logprob pass and the update's first pass
    # (on the weights that sampled the batch) gives them to the later epochs; the weights, losses and statistics must
    # be those of the plain path, which runs the rollout's pass.
    settings = dict(kl_coef=0.0, num_mini_batches=1, **overrides)
    fast = PPOTrainer(tiny_config(tiny_model_dir, **settings), reward_fn=length_reward)
    plain = PPOTrainer(tiny_config(tiny_model_dir, **settings), reward_fn=length_reward)
    before = snapshot_policy(plain)
    plain.update_reads_old_logprobs = False
    assert fast.update_reads_old_logprobs
    for changed in (dict(num_mini_batches=2), dict(kl_coef=0.1)):  # the second minibatch, or the KL reward, needs them
        assert not PPOTrainer(tiny_config(tiny_model_dir, **{**settings, **changed}),
                              reward_fn=length_reward).update_reads_old_logprobs
    names = ["policy_loss", "grad_norm", "entropy", "reward_mean", "approx_kl", "ratio_mean", "policy_clip_fraction"]
    names += ["kl_loss", "kl"] if "kl_loss_coef" in overrides else ["value_loss", "value_mean"]
    for step in range(2):
        set_seed(step)  # the same sampling and minibatch order for both (the generators are global)
        fast_stats = fast.ppo_step(GROUP_PROMPTS)
        set_seed(step)
        plain_stats = plain.ppo_step(GROUP_PROMPTS)
        assert fast_stats["generated_texts"] == plain_stats["generated_texts"]
        assert fast_stats["ppo_epochs_run"] == plain_stats["ppo_epochs_run"] == settings["ppo_epochs"]
        for name in names:
            assert fast_stats[name] == pytest.approx(plain_stats[name], rel=1e-5, abs=1e-6), name
        if "kl_loss_coef" in overrides:
            assert fast_stats["time/logprobs"] > 0  # the reference pass remains
    # Adam divides each gradient by its running size: a component near zero turns rounding (the plain path's ratio
    # is 1 +- 1e-7, the fast path's exactly 1) into a visible step. So: under 1 % of each tensor's update.
    for (name, a), (_, b) in zip(fast.models.policy.named_parameters(), plain.models.policy.named_parameters(),
                                 strict=True):
        step = (b.detach() - before[name]).norm().item()
        assert (a.detach() - b.detach()).norm().item() <= 1e-2 * step + 1e-7, name


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_bfloat16_autocast_gives_the_float32_rollout_losses_and_update(tiny_model_dir, use_lora):
    """mixed_precision 'bf16' against 'no' on the same samples. bfloat16 keeps 8 bits of mantissa: the rollout's
    logprobs, values and losses agree to 2e-2 (absolute), and after 4 AdamW steps each tensor's update is within 30 %
    of its size of the float32 one and points the same way (cosine > 0.95); float32 fast paths agree to 1e-5 and 1 %.
    (Adam divides by each gradient's running size: the LoRA A matrices, whose first gradients are 0, turn rounding
    into steps; their updates differ by up to 26 % here, every other tensor's by less.) Before any update, the
    policy's logprobs of a differently composed micro-batch give ratios within 1e-2 of 1 (1e-5 in float32).
    The value clip is wide open: here three quarters of the value predictions leave the default 0.2 range within two
    steps, and whether a token on the edge is clipped (its gradient 0) then depends on rounding, which moved the
    value tensors' second gradients by 55 % (median; up to 83 %) when the attention kernel's operands changed from
    bfloat16 to float32."""
    results = []
    for precision in ("no", "bf16"):
        config = tiny_config(tiny_model_dir, batch_size=8, use_lora=use_lora, mixed_precision=precision,
                             learning_rate=1e-4, value_learning_rate=1e-4, value_clip=1e6)
        trainer = PPOTrainer(config, reward_fn=length_reward)
        assert body_autocast_dtype(trainer.models.policy) == (torch.bfloat16 if precision == "bf16" else None)
        before = {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        if results:  # the float32 run's samples, so that both score the same tokens
            batch = results[0][0].batch
            trainer._generate = lambda prompts, generation_config, model=None, batch=batch: (
                batch, results[0][0].completions)
        rollout = trainer.make_rollout((PROMPTS * 2)[: config.items_per_step])
        minibatch = rollout.batch.select(torch.tensor([5, 2, 0]))
        with torch.no_grad():
            logprobs, _ = sequence_logprobs(trainer.models.policy, minibatch, config.temperature)
        old = rollout.old_logprobs[torch.tensor([5, 2, 0]), : logprobs.shape[1]]
        ratio = torch.exp(logprobs - old)[minibatch.response_mask.bool()]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-2 if precision == "bf16" else 1e-5, rtol=0)
        first = trainer.update(rollout)
        weights = {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        results.append((rollout, first, before, weights))
    (plain, plain_stats, before, plain_weights), (mixed, mixed_stats, _, mixed_weights) = results
    assert torch.equal(plain.batch.input_ids, mixed.batch.input_ids)
    mask = plain.batch.response_mask.bool()
    for name in ("old_logprobs", "ref_logprobs", "values", "entropy"):
        if getattr(plain, name) is None:
            continue
        torch.testing.assert_close(getattr(plain, name)[mask], getattr(mixed, name)[mask], atol=2e-2, rtol=2e-2)
        assert not torch.equal(getattr(plain, name)[mask], getattr(mixed, name)[mask]), name  # autocast did run
    for name in ("policy_loss", "value_loss", "ratio_mean", "approx_kl"):
        assert plain_stats[name] == pytest.approx(mixed_stats[name], abs=2e-2), name
    for name in plain_weights:
        moved = (plain_weights[name] - before[name]).norm().item()
        assert moved > 0, name
        update, mixed_update = plain_weights[name] - before[name], mixed_weights[name] - before[name]
        assert (update - mixed_update).norm().item() <= 0.3 * moved, name
        assert torch.nn.functional.cosine_similarity(update.flatten(), mixed_update.flatten(), dim=0) > 0.95, name
        assert mixed_weights[name].dtype == torch.float32  # the master weights stay float32


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_a_shared_value_trunk_is_a_head_on_the_policy_and_one_pass_gives_the_two_pass_gradients(
        tiny_model_dir, tmp_path, use_lora):
    """shared_value_trunk: the value model is only a head on the policy's body. Its one pass per micro-batch gives the
    gradients of the plain path (the policy's pass and a value pass through the same body, one after the other) to
    float32 rounding; the value loss alone moves the policy's weights (what the option changes); the checkpoint holds
    the policy and the head, and loads back."""
    from safetensors.torch import load_file

    from ppo_lm.losses import MinibatchSize

    config = tiny_config(tiny_model_dir, shared_value_trunk=True, use_lora=use_lora, batch_size=8,
                         micro_batch_size=3)
    trainer = PPOTrainer(config, reward_fn=length_reward)
    models = trainer.models
    assert models.value_backbone is backbone_of(models.policy) and not models.value_adapter_on_policy
    assert {id(p) for p in models.value_parameters()} == {id(p) for p in models.value_head.parameters()}
    assert not any(".value." in name for name, _ in models.policy.named_parameters())  # no value adapter
    assert set(trainer.backend.optimizer.param_groups[1]["params"]) == set(models.value_head.parameters())

    rollout = trainer.make_rollout((PROMPTS * 2)[: config.items_per_step])
    with torch.no_grad():  # the rollout read its values from the old-logprob pass: they are the value pass's
        plain_values = sequence_values(models.value_backbone, models.value_head, rollout.batch)
        plain_logprobs, _ = sequence_logprobs(models.policy, rollout.batch, config.temperature)
    valid = rollout.batch.response_mask.bool()
    torch.testing.assert_close(rollout.values[valid], plain_values[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rollout.old_logprobs[valid], plain_logprobs[valid], atol=1e-5, rtol=1e-4)
    index = torch.arange(8)
    trained = models.named_trainable()

    def gradients() -> dict[str, torch.Tensor]:
        grads = {n: p.grad.clone() for n, p in trained.items() if p.grad is not None}
        trainer.optimizer.zero_grad(set_to_none=True)
        return grads

    stats = trainer._minibatch_gradients(rollout, index, "test")
    one_pass = gradients()
    mask = rollout.update_mask
    size = MinibatchSize(tokens=mask.sum(), responses=mask.any(-1).sum().to(mask.dtype))
    plain_stats: dict[str, float] = {}
    value_only = None
    for micro_index in trainer._micro_batches(rollout.batch, index, collective=True):
        micro = rollout.batch.select(micro_index)
        micro_mask = mask[micro_index, : micro.response_mask.shape[1]]
        share = micro_mask.sum() / size.tokens
        policy_objective, policy_stats = trainer._policy_terms(rollout, micro_index, micro, micro_mask, size, share)
        policy_objective.backward()
        value_objective, value_stats = trainer._value_terms(rollout, micro_index, micro, micro_mask, share)
        value_objective.backward()
        for name, value in {**policy_stats, **value_stats}.items():
            plain_stats[name] = plain_stats.get(name, 0.0) + value.item()
        if value_only is None:  # the value loss alone, on the first micro-batch
            before = gradients()
            trainer._value_terms(rollout, micro_index, micro, micro_mask, share)[0].backward()
            value_only = gradients()
            for name, grad in before.items():  # put the plain path's sums back
                trained[name].grad = grad
    two_passes = gradients()
    assert one_pass.keys() == two_passes.keys()
    for name in one_pass:
        torch.testing.assert_close(one_pass[name], two_passes[name], atol=1e-6, rtol=1e-4)
    for name in ("policy_loss", "value_loss", "approx_kl", "value_clip_fraction"):
        assert stats[name] == pytest.approx(plain_stats[name], rel=1e-5, abs=1e-7), name
    assert any(name.startswith("policy.") and grad.abs().sum() > 0 for name, grad in value_only.items())

    trainer.ppo_step(PROMPTS * 2)
    trainer.save_state(tmp_path)
    saved = load_file(str(tmp_path / "trainable.safetensors"))
    assert {name.split(".")[0] for name in saved} == {"policy", "value_head"}
    again = PPOTrainer(config, reward_fn=length_reward)
    again.load_state(tmp_path)
    for name, tensor in again.models.named_trainable().items():
        assert torch.equal(tensor, models.named_trainable()[name]), name


def test_a_shared_value_trunk_with_a_separate_value_model_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="shared_value_trunk=True is invalid.*value_model_name"):
        tiny_config(tiny_model_dir, shared_value_trunk=True, value_model_name=tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("mixed_precision, tolerance, estimator", [
    ("no", 1e-4, {"advantage_estimator": "rloo", "num_generations": 2, "kl_coef": 0.0}),
    ("bf16", 3e-2, {}),
], ids=["float32-policy-only", "bf16-autocast-every-adapter"])
def test_compiled_layers_give_the_eager_paths_rollout_losses_and_weights(tiny_model_dir, mixed_precision, tolerance,
                                                                          estimator):
    """`compile_layers` against the eager layers, one rollout and one update. Generation stays eager, so the samples
    are the same; the compiled graphs fuse and reorder the layers' arithmetic, so the rest agrees to a tolerance per
    dtype: the rollout's tensors, the first ratio and the update's losses to `tolerance` (absolute and relative), and
    the weights within a share of each tensor's update: 0.1 % in float32, a quarter under bfloat16 autocast, where
    Adam's first steps (about the gradient's sign per element) turn bfloat16-rounding differences of small gradients
    into differences of up to an eighth of some tensors' update (seen: 0.13). The float32 case runs the policy
    adapter only (RLOO without a KL term: two graphs to compile), the bfloat16 one every adapter state (GAE with
    the KL term: the policy's, the value adapter's and the reference's disabled one, with and without gradients)."""
    counters = torch._dynamo.utils.counters["stats"]
    results, before = [], None
    for compiled in (False, True):
        graphs = counters["unique_graphs"]
        # One pass per stage (micro_batch_tokens=None): the tiny model's wide vocabulary makes a response position
        # cost 70 tokens of the CPU's 1,024, and passes of other widths would only add graphs to compile.
        config = tiny_config(tiny_model_dir, mixed_precision=mixed_precision, compile_layers=compiled,
                             micro_batch_tokens=None, **estimator)
        trainer = PPOTrainer(config, reward_fn=length_reward)
        trainer.update_reads_old_logprobs = False  # the rollout's pass without gradients is one of the graphs
        before = before or {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        rollout = trainer.make_rollout((PROMPTS * 2)[: config.items_per_step])
        logprobs, _ = sequence_logprobs(trainer.models.policy, rollout.batch, trainer.config.temperature)
        ratio = torch.exp(logprobs - rollout.old_logprobs)[rollout.batch.response_mask.bool()]
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=tolerance, rtol=0)  # the first ratio
        stats = trainer.update(rollout)
        weights = {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        results.append((rollout, stats, weights))
        assert (counters["unique_graphs"] > graphs) == compiled  # the compiled path ran, and only when asked
    graphs = counters["unique_graphs"]
    prompt = trainer.tokenizer(["A different prompt length for a new shape"], return_tensors="pt")
    trainer.models.policy.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert counters["unique_graphs"] == graphs  # generation ran the eager layers: nothing compiled for its shapes
    (plain, plain_stats, plain_weights), (fast, fast_stats, fast_weights) = results
    assert torch.equal(plain.batch.input_ids, fast.batch.input_ids)
    mask = plain.batch.response_mask.bool()
    critic_free = bool(estimator)
    for name in ("old_logprobs", "advantages") + (() if critic_free else ("ref_logprobs", "values")):
        torch.testing.assert_close(getattr(fast, name)[mask], getattr(plain, name)[mask], atol=tolerance,
                                   rtol=tolerance)
    for name in ("policy_loss", "approx_kl", "ratio_mean", "grad_norm") + (() if critic_free else ("value_loss",)):
        assert fast_stats[name] == pytest.approx(plain_stats[name], rel=tolerance, abs=tolerance), name
    share = 1e-3 if mixed_precision == "no" else 0.25
    for name in plain_weights:
        moved = (plain_weights[name] - before[name]).norm().item()
        assert (plain_weights[name] - fast_weights[name]).norm().item() <= share * moved + 1e-6, name


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_frozen_weights_stored_in_the_autocast_dtype_give_the_same_rollout_losses_and_weights(
        tiny_model_dir, tiny_reward_model_dir, monkeypatch, use_lora):
    """Under bfloat16 autocast the frozen linear weights (the LoRA base, the separate reference, the reward model)
    are stored in bfloat16 (`store_frozen_linear_weights`), where autocast used to cast them on every pass. The
    products get the same operands, so the rollout, the update's losses and the trained weights are the same to the
    bit as with float32 frozen weights (a backend that does not store them). The trained weights stay float32."""
    results = []
    for store in (False, True):
        monkeypatch.setattr(Backend, "can_store_frozen_weights", store)
        config = tiny_config(tiny_model_dir, mixed_precision="bf16", use_lora=use_lora,
                             reward_model_name=tiny_reward_model_dir)
        trainer = PPOTrainer(config)
        models = trainer.models
        frozen = [models.reward_model.model.layers[0].mlp.up_proj.weight]
        frozen.append(models.reference.model.layers[0].self_attn.q_proj.weight if models.reference is not None
                      else models.policy.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
        assert {w.dtype for w in frozen} == {torch.bfloat16 if store else torch.float32}
        assert {p.dtype for p in models.named_trainable().values()} == {torch.float32}
        rollout = trainer.make_rollout((PROMPTS * 2)[: config.items_per_step])
        stats = trainer.update(rollout)
        results.append((rollout, stats, {n: p.detach().clone() for n, p in models.named_trainable().items()}))
    (plain, plain_stats, plain_weights), (stored, stored_stats, stored_weights) = results
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(getattr(stored.batch, name), getattr(plain.batch, name)), name
    for name in ("raw_scores", "kl", "old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
        assert torch.equal(getattr(stored, name), getattr(plain, name)), name
    for name in ("policy_loss", "value_loss", "approx_kl", "grad_norm"):
        assert stored_stats[name] == plain_stats[name], name
    for name, tensor in plain_weights.items():
        assert torch.equal(stored_weights[name], tensor), name


def test_compile_layers_is_refused_under_a_sharding_backend_before_any_model_loads(tiny_model_dir, monkeypatch):
    class Sharded(Backend):
        title = "FSDP"
        can_compile_layers = False

    monkeypatch.setattr("ppo_lm.ppo_trainer.select_backend", lambda stage: Sharded())
    monkeypatch.setattr("ppo_lm.ppo_trainer.load_role_models", None)  # reached only if the check let it through
    with pytest.raises(ValueError, match="compile_layers is tested with whole weights only, not under FSDP"):
        PPOTrainer(tiny_config(tiny_model_dir, compile_layers=True), reward_fn=length_reward)
