"""`PPOTrainer`: one PPO step for a causal LM, read top to bottom like the algorithm.

    1. generate    sample one response per prompt from the policy
    2. logprobs    the policy's (old) and the reference's logprobs of the sampled tokens
    3. score       the reward model or function scores prompt + response
    4. shape       per-token reward: -kl_coef * KL on each token, the score on the last
    5. values      the value model's estimate before each response token
    6. advantages  GAE, returns, whitening
    7. update      PPO epochs over shuffled minibatches: clipped policy and value losses

Each stage is a function of tensors from its own module; this class holds the models and the optimizer and calls
the stages in order. A rollout is one batch of tensors: nothing here loops over tokens.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn
from transformers import GenerationConfig, set_seed

from ppo_lm.advantages import compute_gae, masked_mean, masked_whiten
from ppo_lm.checkpoint import CheckpointError, load_state, load_trained, save_state, save_trained
from ppo_lm.config import PPOConfig
from ppo_lm.distributed import (
    all_sum,
    batch_layout,
    broadcast_parameters,
    deepspeed_backward,
    deepspeed_settings,
    fsdp_sharding,
    full_tensors,
    gather_rows,
    gathered_state_dict,
    process_state,
    shard_optimizer_state,
    start_deepspeed,
    sum_gradients,
)
from ppo_lm.generation import SequenceBatch, encode_prompts, generate_responses, greedy_config, sampling_config
from ppo_lm.losses import approx_kl, clipped_policy_loss, clipped_value_loss, exact_kl, kl_estimate
from ppo_lm.models import (
    POLICY_ADAPTER,
    load_role_models,
    load_tokenizer,
    prefix_hidden_states,
    resolve_device,
    resolve_dtype,
    response_logits,
    sequence_logprobs,
    sequence_scores,
    sequence_values,
    shared_frozen_layers,
)
from ppo_lm.rewards import (
    KLController,
    RewardFn,
    apply_missing_eos_penalty,
    call_reward_fn,
    check_finite_scores,
    load_reward_function,
    shape_rewards,
)

DEEPSPEED_STATE = "deepspeed"
"""A checkpoint's folder of DeepSpeed's own files (the optimizer state, partitioned as the engine holds it)."""
DEEPSPEED_TAG = "state"


@dataclass
class Rollout:
    """Everything stages 1 to 6 produce for one batch of prompts; `[batch, response]` unless noted."""

    batch: SequenceBatch
    """Prompt and response tokens with their masks."""
    completions: list[str]
    """Decoded responses, without the prompt and the stop token."""
    raw_scores: torch.Tensor
    """Reward model or function scores, `[batch]`."""
    scores: torch.Tensor
    """Scores after the missing-EOS penalty, `[batch]`."""
    ended: torch.Tensor
    """Whether each response emitted the stop token, `[batch]`."""
    kl: torch.Tensor
    """Per-token KL estimate between the policy and the reference."""
    kl_coef: float
    """KL coefficient used to shape the rewards."""
    old_logprobs: torch.Tensor
    """Policy logprobs of the sampled tokens when sampled."""
    ref_logprobs: torch.Tensor
    """Reference logprobs of the sampled tokens."""
    values: torch.Tensor
    """Value estimates when sampled."""
    advantages: torch.Tensor
    """GAE advantages (whitened when configured)."""
    returns: torch.Tensor
    """Value targets: raw advantages plus values."""
    entropy: torch.Tensor
    """Entropy of the policy's next-token distribution at each response position, when sampled."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each stage."""

    @property
    def summed_kl(self) -> torch.Tensor:
        """KL summed over each response's valid tokens, `[batch]`."""
        return torch.where(self.batch.response_mask.bool(), self.kl, torch.zeros_like(self.kl)).sum(-1)

    def statistics(self) -> dict:
        """The texts, scores and summary numbers (Python floats) of the whole batch, every process's rows included.

        Each process contributes per-row numbers; the means are taken over all rows (token means over all tokens),
        so every process returns the same statistics.
        """
        mask = self.batch.response_mask
        zeros = torch.zeros_like(self.values)
        row_sums = [torch.where(mask.bool(), per_token, zeros).sum(-1)
                    for per_token in (self.values, self.returns, self.entropy)]
        local = torch.stack([self.raw_scores, self.scores, self.summed_kl, mask.sum(-1), self.ended, *row_sums], -1)
        rows = torch.tensor(gather_rows(local.double().tolist()), dtype=torch.float64).reshape(-1, local.shape[1])
        raw, scores, summed_kl, lengths, ended, value_sums, return_sums, entropy_sums = rows.unbind(-1)
        tokens = lengths.sum().clamp(min=1)
        return {
            "generated_texts": gather_rows(self.completions),
            "rewards": raw.tolist(),
            "reward_mean": raw.mean().item(),
            "reward_std": raw.std().item() if len(raw) > 1 else 0.0,
            "score_mean": scores.mean().item(),
            "kl": summed_kl.mean().item(),
            "kl_coef": self.kl_coef,
            "non_score_reward": (-self.kl_coef * summed_kl).mean().item(),
            "response_length": lengths.mean().item(),
            "eos_fraction": ended.mean().item(),
            "value_mean": (value_sums.sum() / tokens).item(),
            "return_mean": (return_sums.sum() / tokens).item(),
            "entropy": (entropy_sums.sum() / tokens).item(),
            **{f"time/{stage}": seconds for stage, seconds in self.timings.items()},
        }


class PPOTrainer:
    """Holds the four roles, the optimizer and the KL controller; `ppo_step` runs one PPO iteration.

    Args:
        config: the run's settings.
        reward_fn: `reward_fn(prompts, completions) -> list[float]`, one finite score per completion. When None,
            `config.reward_model_name` must name a sequence-classification model.
    """

    def __init__(self, config: PPOConfig, reward_fn: RewardFn | None = None):
        # Checked at construction, checked again here: a config is a plain dataclass, and a field set since then
        # (config.batch_size = ...) must not reach the models unchecked. The rules themselves live in config.py.
        config.validate()
        config.check_reward_source(has_callable=reward_fn is not None)
        if reward_fn is None and config.reward_fn is not None:
            reward_fn = load_reward_function(config.reward_fn)
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}.")
        self.config = config
        self.reward_fn = reward_fn
        processes = process_state()
        self.layout = batch_layout(config.batch_size, processes.num_processes, config.num_mini_batches,
                                   config.micro_batch_size)
        # Each process samples its own rollouts (its own seed); the weights are the main process's (broadcast below).
        set_seed(config.seed + processes.process_index)
        self.device = resolve_device(config.device, processes)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = load_tokenizer(config.model_name)
        self.sharding = fsdp_sharding()
        self.models = load_role_models(config, self.device, self.dtype, sharded=self.sharding is not None)
        broadcast_parameters(self.models.named_trainable().values())
        if self.sharding is not None:
            self.models.shard(self.sharding)
        with self.models.gathered():
            self.frozen_layers = shared_frozen_layers(config, self.models)  # run once per rollout, then reused
        self.reward_tokenizer = self._reward_tokenizer_if_different()

        context = getattr(self.models.policy.config, "max_position_embeddings", None) or 2**31
        self.max_prompt_tokens = config.check_prompt_room(context)
        self.stop_token_id = self.tokenizer.eos_token_id
        self.generation_config = sampling_config(
            config.max_new_tokens, config.temperature, config.top_k, config.top_p,
            self.stop_token_id, self.tokenizer.pad_token_id,
        )
        self.greedy_config = greedy_config(config.max_new_tokens, self.stop_token_id, self.tokenizer.pad_token_id)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.models.policy_parameters(), "lr": config.learning_rate},
                {"params": self.models.value_parameters(), "lr": config.value_learning_rate},
            ],
            weight_decay=0.0,
        )
        # Under DeepSpeed its engine owns the trained models and the optimizer: it reduces, clips and steps.
        self.engine = None
        if (deepspeed := deepspeed_settings()) is not None:
            self.engine = start_deepspeed(self.models.trained_modules(), self.optimizer, deepspeed,
                                          config.max_grad_norm)
            self.models.engine = self.engine
        self.kl_controller = KLController(config.kl_coef, config.adaptive_kl_target, config.adaptive_kl_horizon)
        self.step_count = 0

    def train_step(self, prompts: list[str]) -> dict:
        """One step of a training run: a PPO step (the name every stage's trainer shares)."""
        return self.ppo_step(prompts)

    def ppo_step(self, prompts: list[str]) -> dict:
        """Run one PPO iteration on `prompts` and return its statistics.

        Prompts longer than the model's context minus `max_new_tokens` keep their last tokens (with a warning).
        Bad input (no prompts, a non-string prompt, a reward function that raises or returns the wrong number of
        scores or a non-finite one) raises before any weight, optimizer or controller state changes.

        Returns a dict with `generated_texts` (completions without the prompt), `rewards` (raw scores, one per
        prompt) and Python floats: losses, KL, entropy, clip fractions, lengths, the KL coefficient, the PPO epochs
        that ran and the seconds spent in each stage (`time/<stage>`).
        """
        step_start = time.perf_counter()
        rollout = self.make_rollout(prompts)
        with self._timed("update", rollout.timings):
            update_stats = self.update(rollout)
        stats = rollout.statistics()  # over every process's rows
        self.kl_controller.update(stats["kl"], len(stats["rewards"]))
        self.step_count += 1
        stats["time/step"] = time.perf_counter() - step_start
        return {**stats, **update_stats}

    def make_rollout(self, prompts: list[str]) -> Rollout:
        """Stages 1 to 6: sample, score, compute logprobs, shape rewards, values and advantages. No weight changes.

        `prompts` are this process's share of the batch.
        """
        cfg, models = self.config, self.models
        timings: dict[str, float] = {}
        # Sharded weights are gathered whole for these passes: they need no gradients, and processes may run
        # different numbers of them (generation lengths differ).
        with models.gathered():
            # 1. generate: left-padded prompts -> sampled responses, cut after the first stop token.
            with self._timed("generate", timings):
                batch, completions = self._generate(prompts, self.generation_config)
                response_mask = batch.response_mask

            # 3. score (before the heavier passes, so that a failing reward function fails fast).
            with self._timed("reward", timings):
                raw_scores = self._score(list(prompts), completions, batch).to(self.device)

            # 2. logprobs of the sampled tokens under the policy (old) and the reference, at the sampling temperature.
            #    Each pass runs over micro-batches of similar prompt length, so short prompts carry little padding.
            #    The frozen bottom layers, the same in every role, run once here; every later pass starts from them.
            with self._timed("logprobs", timings), torch.no_grad():
                batch = self._with_frozen_prefix(batch)
                old_logprobs, entropy = self._per_token(batch, lambda micro: sequence_logprobs(
                    models.policy, micro, cfg.temperature, with_entropy=True))
                with models.reference_model() as reference:
                    ref_logprobs, _ = self._per_token(batch, lambda micro: sequence_logprobs(
                        reference, micro, cfg.temperature))

            # 4. shape: per-token KL penalty plus the (possibly penalised) score on the last valid token.
            kl_coef = self.kl_controller.value
            kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator)
            ended = ((batch.responses == self.stop_token_id) & response_mask.bool()).any(-1)
            scores = apply_missing_eos_penalty(raw_scores, ended, cfg.missing_eos_penalty)
            rewards = shape_rewards(scores, kl, response_mask, kl_coef)

            # 5. values of the state before each response token.
            with self._timed("values", timings), torch.no_grad(), models.value_mode():
                values, _ = self._per_token(batch, lambda micro: (
                    sequence_values(models.value_backbone, models.value_head, micro), None))

        # 6. advantages by GAE over the response mask; returns are the value targets.
        advantages, returns = compute_gae(rewards, values, response_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, response_mask, all_sum=all_sum)  # over every process's tokens

        return Rollout(
            batch=batch, completions=completions, raw_scores=raw_scores, scores=scores, ended=ended, kl=kl,
            kl_coef=kl_coef, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values,
            advantages=advantages, returns=returns, entropy=entropy, timings=timings,
        )

    def _per_token(
        self, batch: SequenceBatch, forward: Callable[[SequenceBatch], tuple[torch.Tensor, torch.Tensor | None]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run `forward` over the batch's micro-batches and put its `[rows, response]` outputs back in row order."""
        rows, width = batch.response_mask.shape
        outputs: list[torch.Tensor | None] = [None, None]
        everything = torch.arange(rows, device=batch.input_ids.device)
        for index in batch.micro_batches(everything, self.config.micro_batch_size):
            micro = batch.select(index)
            for slot, result in enumerate(forward(micro)):
                if result is None:
                    continue
                if outputs[slot] is None:
                    outputs[slot] = torch.zeros(rows, width, dtype=result.dtype, device=result.device)
                outputs[slot][index, : result.shape[1]] = result
        return outputs[0], outputs[1]

    def evaluate(self, prompts: list[str]) -> tuple[dict[str, float], list[dict]]:
        """Mean reward, KL to the reference and response length on held-out prompts, and each prompt's sample.

        Each prompt gets `eval_samples_per_prompt` responses sampled as in training (consecutive samples), or one
        greedy response with `eval_greedy`. Sampling uses its own seeded generator state, so evaluating never shifts
        the training run's randomness and the same weights always give the same samples. The KL of a response is
        exact rather than estimated from its tokens: the KL between the policy's and the reference's next-token
        distributions at each position, summed over the response. No weight changes.
        """
        cfg, models = self.config, self.models

        def exact_kl_per_token(micro: SequenceBatch) -> tuple[torch.Tensor, None]:
            logits = response_logits(models.policy, micro, cfg.temperature)
            with models.reference_model() as reference:
                return exact_kl(logits, response_logits(reference, micro, cfg.temperature)), None

        generation_config = self.greedy_config if cfg.eval_greedy else self.generation_config
        prompts = [prompt for prompt in prompts for _ in range(cfg.eval_samples_per_prompt)]
        samples = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), models.gathered():
            torch.manual_seed(cfg.seed)
            for start in range(0, len(prompts), self.layout.per_process):
                part = prompts[start : start + self.layout.per_process]
                batch, completions = self._generate(part, generation_config)
                scores = self._score(part, completions, batch)
                kl_per_token, _ = self._per_token(self._with_frozen_prefix(batch), exact_kl_per_token)
                mask = batch.response_mask
                summed_kl = torch.where(mask.bool(), kl_per_token, 0.0).sum(-1)  # padding's numbers never count
                samples += [
                    {"prompt": prompt, "completion": completion, "reward": score, "kl": kl, "length": length}
                    for prompt, completion, score, kl, length in zip(
                        part, completions, scores.tolist(), summed_kl.tolist(), mask.sum(-1).tolist(), strict=True)
                ]
        samples = gather_rows(samples)  # every process's share of the prompts, in order
        scores = torch.tensor([sample["reward"] for sample in samples], dtype=torch.float64)
        metrics = {
            "eval/reward_mean": scores.mean().item(),
            "eval/reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "eval/kl": sum(sample["kl"] for sample in samples) / len(samples),
            "eval/response_length": sum(sample["length"] for sample in samples) / len(samples),
        }
        return metrics, samples

    def _generate(self, prompts: list[str], generation_config: GenerationConfig) -> tuple[SequenceBatch, list[str]]:
        """Left-padded prompts -> responses cut after the first stop token, and their decoded texts."""
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        batch = generate_responses(
            self.models.policy, prompt_ids.to(self.device), prompt_mask.to(self.device), generation_config,
            self.stop_token_id, self.tokenizer.pad_token_id,
        )
        return batch, self.tokenizer.batch_decode(batch.responses, skip_special_tokens=True)

    def _with_frozen_prefix(self, batch: SequenceBatch) -> SequenceBatch:
        """The batch with the output of the frozen bottom layers attached, for every later pass to start from."""
        if not self.frozen_layers:
            return batch
        hidden = prefix_hidden_states(self.models.policy, batch, self.frozen_layers, self.config.micro_batch_size)
        return replace(batch, prefix_hidden=hidden, prefix_layers=self.frozen_layers)

    # --- checkpoint state ----------------------------------------------------------------------------------------

    def save_state(self, directory: Path) -> None:
        """Write the trained weights, the policy (peft adapter or full model) and the optimizer to `directory`.

        Every process calls it: sharded weights are gathered whole together, and under DeepSpeed each process writes
        its partition of the optimizer state (DeepSpeed's own files, under `deepspeed/`). The main process writes the
        rest."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory / DEEPSPEED_STATE), tag=DEEPSPEED_TAG, save_latest=False,
                                        exclude_frozen_parameters=True)
            optimizer_state = None
        else:
            optimizer_state = full_tensors(self.optimizer.state_dict())
        with self.models.gathered():
            if not PartialState().is_main_process:
                return
            save_trained(self.models.named_trainable(), directory)
            if self.config.use_lora:  # also the policy alone, as a peft adapter that PeftModel.from_pretrained reads
                self.models.policy.save_pretrained(str(directory / "policy"), selected_adapters=[POLICY_ADAPTER],
                                                   state_dict=gathered_state_dict(self.models.policy))
        self.tokenizer.save_pretrained(str(directory / "policy"))
        if optimizer_state is not None:
            save_state(optimizer_state, directory, "optimizer")

    def load_state(self, directory: Path) -> None:
        """Load what `save_state` wrote (every process reads it); every trained tensor must be there with its
        shape. A checkpoint written under DeepSpeed resumes only under DeepSpeed, and the other way round."""
        written_by_deepspeed = (directory / DEEPSPEED_STATE).is_dir()
        if written_by_deepspeed != (self.engine is not None):
            written, launched = ("with", "without") if written_by_deepspeed else ("without", "with")
            raise CheckpointError(
                f"{directory} was written by a run {written} DeepSpeed and this run is launched {launched} it: resume "
                "with the accelerate config that wrote it, or start a new run from its policy (`ppo-lm export`).")
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(str(directory / DEEPSPEED_STATE), tag=DEEPSPEED_TAG,
                                                  load_module_strict=False, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed found no state to load in {directory / DEEPSPEED_STATE}.")
            return
        load_trained(self.models.named_trainable(), directory)
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, load_state(directory, "optimizer")))

    def extra_state(self) -> dict:
        """Small state a checkpoint keeps besides weights and optimizer: the KL controller and the step count."""
        return {"kl_controller": self.kl_controller.state_dict(), "step_count": self.step_count}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.step_count = state["step_count"]

    def _score(self, prompts: list[str], completions: list[str], batch: SequenceBatch) -> torch.Tensor:
        """Scores of the completions from the reward function, or from the reward model at the last real token."""
        if self.reward_fn is not None:
            return call_reward_fn(self.reward_fn, prompts, completions)
        with torch.no_grad():
            if self.reward_tokenizer is None:
                input_ids, attention_mask = batch.input_ids, batch.attention_mask
            else:  # the reward model reads another vocabulary: give it the text, tokenised its way
                encoded = self.reward_tokenizer(
                    [p + c for p, c in zip(prompts, completions, strict=True)], padding=True, padding_side="right",
                    return_tensors="pt",
                ).to(self.device)
                input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
            return check_finite_scores(sequence_scores(self.models.reward_model, input_ids, attention_mask))

    def update(self, rollout: Rollout) -> dict[str, float]:
        """Stage 7: PPO epochs over shuffled minibatches, stopping once the approximate KL passes target_kl.

        Each minibatch: clipped policy loss (minus the entropy bonus) and clipped value loss, gradients clipped
        per model, one optimizer step. A minibatch runs as micro-batches of similar length whose gradients add up
        to the whole minibatch's (each weighted by its share of the valid tokens). A minibatch whose approximate KL
        is over the target takes no step and ends the update.

        Under DeepSpeed, the policy and value losses of a micro-batch are backpropagated together and the engine
        clips every trained weight's gradient together (`grad_norm`); the approximate KL is measured in a pass
        without gradients before the minibatch's gradients, because the engine cannot drop gradients it has reduced.
        """
        history: dict[str, list[float]] = defaultdict(list)
        optimizer_steps = 0
        rows = rollout.batch.input_ids.shape[0]
        for _epoch in range(self.config.ppo_epochs):
            order = torch.randperm(rows).to(self.device)
            for index in order.tensor_split(self.config.num_mini_batches):
                step_stats = self._minibatch_step(rollout, index)
                if step_stats is None:
                    break
                optimizer_steps += 1
                for name, value in step_stats.items():
                    history[name].append(value)
            if step_stats is None:  # the approximate KL passed the target
                break
        stats = {name: sum(values) / len(values) for name, values in history.items()}
        stats["ppo_epochs_run"] = optimizer_steps / self.config.num_mini_batches
        stats["optimizer_steps"] = float(optimizer_steps)
        return stats

    def _minibatch_step(self, rollout: Rollout, index: torch.Tensor) -> dict[str, float] | None:
        """One optimizer step on the minibatch `index`; its statistics, or None (and no step) when its approximate
        KL is over `target_kl`."""
        cfg, models = self.config, self.models
        if self.engine is not None:
            if cfg.target_kl is not None and self._minibatch_approx_kl(rollout, index) > cfg.target_kl:
                return None
            with models.gradient_mode():
                stats = self._minibatch_gradients(rollout, index)
            self.engine.step()
            stats["grad_norm"] = float(self.engine.get_global_grad_norm())
            return stats
        policy_params, value_params = models.policy_parameters(), models.value_parameters()
        with models.gradient_mode():
            stats = self._minibatch_gradients(rollout, index)
        sum_gradients(policy_params + value_params)  # every process now holds the global minibatch's
        if cfg.target_kl is not None and stats["approx_kl"] > cfg.target_kl:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        max_norm = cfg.max_grad_norm or float("inf")  # 0: no clipping (as DeepSpeed's gradient_clipping)
        stats["policy_grad_norm"] = nn.utils.clip_grad_norm_(policy_params, max_norm).item()
        stats["value_grad_norm"] = nn.utils.clip_grad_norm_(value_params, max_norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def _minibatch_approx_kl(self, rollout: Rollout, index: torch.Tensor) -> float:
        """The minibatch's approximate KL between the current policy and the rollout's, over every process, from
        a pass without gradients."""
        batch = rollout.batch
        total_tokens = all_sum(batch.response_mask[index].sum()).clamp(min=1)
        kl_sum = torch.zeros((), device=self.device)
        with torch.no_grad():
            for micro_index in batch.micro_batches(index, self.config.micro_batch_size):
                micro = batch.select(micro_index)
                mask = micro.response_mask
                logprobs, _ = sequence_logprobs(self.models.policy, micro, self.config.temperature)
                old = rollout.old_logprobs[micro_index, : mask.shape[1]]
                kl_sum += approx_kl(logprobs, old, mask) * mask.sum() / total_tokens
        return all_sum(kl_sum).item()

    def _minibatch_gradients(self, rollout: Rollout, index: torch.Tensor) -> dict[str, float]:
        """Accumulate the gradients of one minibatch's losses, micro-batch by micro-batch; return its statistics."""
        models, batch = self.models, rollout.batch
        # Token shares are of the minibatch over all processes: the gradients then add up across processes.
        total_tokens = all_sum(batch.response_mask[index].sum()).clamp(min=1)
        sums: dict[str, float] = defaultdict(float)
        for micro_index in batch.micro_batches(index, self.config.micro_batch_size):
            micro = batch.select(micro_index)
            share = micro.response_mask.sum() / total_tokens  # this micro-batch's weight in the minibatch's mean
            if self.engine is None:
                policy_objective, stats = self._policy_terms(rollout, micro_index, micro)
                self._backward(policy_objective * share, "policy loss")
                with models.value_mode():  # backward inside, where the value adapter is the active one
                    value_objective, value_stats = self._value_terms(rollout, micro_index, micro)
                    self._backward(value_objective * share, "value loss")
            else:  # one pass of the engine per micro-batch: both losses, backpropagated together
                policy_objective, value_objective, stats, value_stats = self.engine(
                    lambda micro=micro, micro_index=micro_index: self._both_terms(rollout, micro_index, micro))
                self._check_finite(policy_objective, "policy loss")
                self._check_finite(value_objective, "value loss")
                deepspeed_backward(self.engine, (policy_objective + value_objective) * share)
            weight = share.item()
            for name, value in {**stats, **value_stats}.items():
                sums[name] += value.item() * weight
        names = sorted(sums)  # each process holds its tokens' share of every statistic: their sum is the whole's
        totals = all_sum(torch.tensor([sums[name] for name in names], dtype=torch.float64, device=self.device))
        return dict(zip(names, totals.tolist(), strict=True))

    def _policy_terms(self, rollout: Rollout, micro_index: torch.Tensor, micro: SequenceBatch
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's policy objective (clipped policy loss minus the entropy bonus) and its statistics."""
        cfg, mask = self.config, micro.response_mask
        width = mask.shape[1]
        old = rollout.old_logprobs[micro_index, :width]
        logprobs, entropy = sequence_logprobs(self.models.policy, micro, cfg.temperature,
                                              with_entropy=cfg.entropy_coef > 0, entropy_grad=True)
        policy_loss, policy_clip = clipped_policy_loss(
            logprobs, old, rollout.advantages[micro_index, :width], mask, cfg.clip_epsilon)
        objective = policy_loss
        if entropy is not None:
            objective = objective - cfg.entropy_coef * masked_mean(entropy, mask)
        logprobs = logprobs.detach()
        return objective, {"policy_loss": policy_loss.detach(), "policy_clip_fraction": policy_clip,
                           "approx_kl": approx_kl(logprobs, old, mask),
                           "ratio_mean": masked_mean(torch.exp(logprobs - old), mask)}

    def _value_terms(self, rollout: Rollout, micro_index: torch.Tensor, micro: SequenceBatch
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's value objective (vf_coef x clipped value loss) and its statistics; inside value_mode."""
        width = micro.response_mask.shape[1]
        values = sequence_values(self.models.value_backbone, self.models.value_head, micro)
        value_loss, value_clip = clipped_value_loss(
            values, rollout.values[micro_index, :width], rollout.returns[micro_index, :width], micro.response_mask,
            self.config.value_clip)
        return self.config.vf_coef * value_loss, {"value_loss": value_loss.detach(), "value_clip_fraction": value_clip}

    def _both_terms(self, rollout: Rollout, micro_index: torch.Tensor, micro: SequenceBatch) -> tuple:
        """`_policy_terms` and `_value_terms` of one micro-batch, for one forward pass of the DeepSpeed engine."""
        policy_objective, stats = self._policy_terms(rollout, micro_index, micro)
        with self.models.value_mode():
            value_objective, value_stats = self._value_terms(rollout, micro_index, micro)
        return policy_objective, value_objective, stats, value_stats

    def _check_finite(self, loss: torch.Tensor, what: str) -> None:
        """Drop every gradient of this minibatch and raise if `loss` is not finite."""
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"The {what} is {loss.item()} at PPO step {self.step_count}; this minibatch took no optimizer step. "
                "Lower the learning rate or check the rewards."
            )

    def _backward(self, loss: torch.Tensor, what: str) -> None:
        """Backpropagate `loss`, or drop every gradient of this minibatch and raise if it is not finite."""
        self._check_finite(loss, what)
        loss.backward()

    def _reward_tokenizer_if_different(self):
        """The reward model's tokenizer when its vocabulary differs from the policy's, else None (share tokens)."""
        if self.config.reward_model_name is None:
            return None
        reward_tokenizer = load_tokenizer(self.config.reward_model_name)
        if reward_tokenizer.get_vocab() == self.tokenizer.get_vocab():
            return None
        return reward_tokenizer

    @contextlib.contextmanager
    def _timed(self, stage: str, timings: dict[str, float]) -> Iterator[None]:
        """Add the wall-clock seconds of the block to `timings[stage]` (waiting for the GPU to finish)."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
