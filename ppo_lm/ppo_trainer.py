"""`PPOTrainer`: one PPO step for a causal LM, read top to bottom like the algorithm.

    1. generate    sample `num_generations` responses per prompt from the policy (a group)
    2. logprobs    the policy's (old) and, when a KL term needs them, the reference's logprobs of the sampled tokens
    3. score       the reward model or the weighted reward functions score prompt + response
    4. shape       per-token reward: -kl_coef * KL on each token, the score on the last
    5. values      the value model's estimate before each response token (when the estimator needs them)
    6. advantages  the advantage estimator (GAE by default), returns, whitening
    7. update      PPO epochs over shuffled minibatches: the aggregated policy loss (with the KL term when it is in
                   the loss) and, with a value model, the clipped value loss

Each stage is a function of tensors from its own module; this class holds the models and the optimizer and calls
the stages in order. A rollout is one batch of tensors: nothing here loops over tokens. The variable parts of the
algorithm (the advantage estimator, the policy loss, the KL estimator) are functions looked up by the config's
names in their registries; how the launch holds the weights is the backend's business (`backend.py`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import GenerationConfig, set_seed

from ppo_lm.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    masked_mean,
    masked_whiten,
    zero_variance_groups,
)
from ppo_lm.backend import LossTerm, NonFiniteLossError, adamw, select_backend
from ppo_lm.checkpoint import save_trained
from ppo_lm.config import PPOConfig
from ppo_lm.data import PromptItem, split_prompt_items
from ppo_lm.distributed import all_sum, batch_layout, gather_rows, process_state
from ppo_lm.generation import (
    SequenceBatch,
    TokenBudget,
    auto_micro_batch_tokens,
    encode_prompts,
    generate_responses,
    greedy_config,
    sampling_config,
)
from ppo_lm.losses import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    MinibatchSize,
    approx_kl,
    clipped_value_loss,
    exact_kl,
    kl_k3,
)
from ppo_lm.models import (
    POLICY_ADAPTER,
    body_autocast_dtype,
    encode_for_reward,
    load_role_models,
    load_tokenizer,
    policy_logprobs_and_values,
    prefix_hidden_states,
    resolve_device,
    resolve_dtype,
    response_logits,
    sequence_logprobs,
    sequence_scores,
    sequence_values,
    shared_frozen_layers,
    value_frozen_layers,
)
from ppo_lm.rewards import (
    KLController,
    RewardFn,
    WeightedRewards,
    apply_missing_eos_penalty,
    check_finite_scores,
    load_reward_functions,
    shape_rewards,
)

logger = logging.getLogger(__name__)


def repeated_prompts(items: list[PromptItem], times: int) -> tuple[list[str], dict[str, list]]:
    """Each prompt item `times` times in a row, as `(prompts, columns)` (`data.split_prompt_items`)."""
    if isinstance(items, (str, dict)):
        raise TypeError(f"prompts must be a list of strings or dataset rows, got {type(items).__name__}.")
    return split_prompt_items([item for item in items for _ in range(times)])


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
    kl: torch.Tensor | None
    """Per-token KL estimate between the policy and the reference; None when no KL term needs the reference (or
    until the update's first pass gives the old logprobs)."""
    kl_coef: float
    """KL coefficient used to shape the rewards."""
    old_logprobs: torch.Tensor | None
    """Policy logprobs of the sampled tokens; None until the update's first pass gives them, when the rollout runs
    no pass of its own for them (`PPOTrainer.update_reads_old_logprobs`)."""
    ref_logprobs: torch.Tensor | None
    """Reference logprobs of the sampled tokens; None when no KL term needs them."""
    values: torch.Tensor | None
    """Value estimates when sampled; None when the advantage estimator needs none."""
    advantages: torch.Tensor
    """The estimator's advantages (whitened when configured)."""
    returns: torch.Tensor
    """The estimator's returns, the value targets (GAE: raw advantages plus values)."""
    entropy: torch.Tensor | None
    """Entropy of the policy's next-token distribution at each response position, from the pass that gives the old
    logprobs (None until then)."""
    update_mask: torch.Tensor
    """The response mask the update trains on: without the groups `drop_zero_variance_groups` leaves out."""
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each reward function's raw scores, `[batch]`, by name (several reward functions only)."""
    zero_variance: torch.Tensor | None = None
    """Whether each group's scores are all equal, `[groups]` (None with one response per prompt)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each stage."""
    value_batch: SequenceBatch | None = None
    """What the value passes read: `batch` with the output of the value body's frozen lower layers attached
    (`value_layers`); None: `batch` itself."""
    first_pass: tuple[torch.Tensor, torch.Tensor] | None = None
    """The update's first pass's detached logprobs and entropy, `[batch, response]` each, written micro-batch by
    micro-batch while `old_logprobs` is None, and taken up as the old ones after its optimizer step."""

    def keep_first_pass(self, index: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor) -> None:
        """Write the rows `index` of the update's first pass (widths up to the micro-batch's; 0 beyond)."""
        if self.first_pass is None:
            shape = self.batch.response_mask.shape
            self.first_pass = (logprobs.new_zeros(shape), entropy.new_zeros(shape))
        for kept, values in zip(self.first_pass, (logprobs, entropy), strict=True):
            kept[index, : values.shape[1]] = values.detach()

    @property
    def summed_kl(self) -> torch.Tensor:
        """KL summed over each response's valid tokens, `[batch]` (0 without a reference pass)."""
        if self.kl is None:
            return torch.zeros_like(self.scores)
        return torch.where(self.batch.response_mask.bool(), self.kl, torch.zeros_like(self.kl)).sum(-1)

    def statistics(self) -> dict:
        """The texts, scores and summary numbers (Python floats) of the whole batch, every process's rows included.

        Each process contributes per-row numbers; the means are taken over all rows (token means over all tokens),
        so every process returns the same statistics.
        """
        mask = self.batch.response_mask
        per_token = {"value_mean": self.values, "return_mean": self.returns, "entropy": self.entropy}
        per_token = {name: values for name, values in per_token.items() if values is not None}
        row_sums = [torch.where(mask.bool(), values, torch.zeros_like(values)).sum(-1) for values in per_token.values()]
        parts = list(self.reward_parts.values())
        local = torch.stack([self.raw_scores, self.scores, self.summed_kl, mask.sum(-1), self.ended, *parts,
                             *row_sums], -1)
        rows = torch.tensor(gather_rows(local.double().tolist()), dtype=torch.float64).reshape(-1, local.shape[1])
        raw, scores, summed_kl, lengths, ended, *columns = rows.unbind(-1)
        part_scores, token_sums = columns[: len(parts)], columns[len(parts):]
        tokens = lengths.sum().clamp(min=1)
        kl_stats = {} if self.kl is None else {"kl": summed_kl.mean().item(),
                                                "non_score_reward": (-self.kl_coef * summed_kl).mean().item()}
        group_stats = {}
        if self.zero_variance is not None:
            flagged = self.zero_variance.sum()
            counts = all_sum(torch.stack([flagged, flagged.new_tensor(len(self.zero_variance))]).double())
            group_stats["zero_variance_groups"] = (counts[0] / counts[1]).item()
        return {
            "generated_texts": gather_rows(self.completions),
            "rewards": raw.tolist(),
            "reward_mean": raw.mean().item(),
            "reward_std": raw.std().item() if len(raw) > 1 else 0.0,
            "score_mean": scores.mean().item(),
            **kl_stats,
            "kl_coef": self.kl_coef,
            "response_length": lengths.mean().item(),
            "eos_fraction": ended.mean().item(),
            **{f"reward/{name}": part.mean().item() for name, part in zip(self.reward_parts, part_scores,
                                                                          strict=True)},
            **group_stats,
            **{name: (sums.sum() / tokens).item() for name, sums in zip(per_token, token_sums, strict=True)},
            **{f"time/{stage}": seconds for stage, seconds in self.timings.items()},
        }


class PPOTrainer:
    """Holds the four roles, the optimizer and the KL controller; `ppo_step` runs one PPO iteration.

    Args:
        config: the run's settings.
        reward_fn: `reward_fn(prompts, completions, **columns) -> list[float]`, one finite score per completion, or
            a list of such functions (weighted by `config.reward_weights`). When None, `config.reward_fn` names the
            functions or `config.reward_model_name` a sequence-classification model.
    """

    def __init__(self, config: PPOConfig, reward_fn: RewardFn | list[RewardFn] | None = None):
        # Checked at construction, checked again here: a config is a plain dataclass, and a field set since then
        # (config.batch_size = ...) must not reach the models unchecked. The rules themselves live in config.py.
        config.validate()
        config.check_reward_source(has_callable=reward_fn is not None)
        if reward_fn is None and config.reward_fn is not None:
            reward_fn = load_reward_functions(config.reward_fn)
        functions = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        self.config = config
        # WeightedRewards checks that each is callable and that the weights match them, before any model loads.
        self.rewards = None if reward_fn is None else WeightedRewards(functions, config.reward_weights)
        self.estimator = ADVANTAGE_ESTIMATORS[config.advantage_estimator]
        self.policy_loss = POLICY_LOSSES[config.policy_loss]
        self.aggregate = LOSS_AGGREGATIONS[config.loss_aggregation]
        self.backend = select_backend("train")  # how the launch holds and updates the weights
        if config.compile_layers and not self.backend.can_compile_layers:
            raise ValueError(f"compile_layers is tested with whole weights only, not under {self.backend.title}; set "
                             "compile_layers: false, or launch replicated (configs/accelerate/multi_gpu.yaml).")
        processes = process_state()
        self.layout = batch_layout(config.batch_size, processes.num_processes, config.num_mini_batches,
                                   config.micro_batch_size, config.num_generations, config.micro_batch_tokens)
        # Each process samples its own rollouts (its own seed); the weights are the main process's (broadcast below).
        set_seed(config.seed + processes.process_index)
        self.device = resolve_device(config.device, processes)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = load_tokenizer(config.model_name)
        self.models = load_role_models(config, self.device, self.dtype, self.backend.load_device(self.device),
                                       self.backend.can_store_frozen_weights,
                                       self.backend.can_add_gradients_in_place)
        self.optimizer = self.backend.prepare(
            self.models.trained_modules(), [self.models.reference], self._make_optimizer, config.max_grad_norm)
        with self.whole_weights():
            self.frozen_layers = shared_frozen_layers(config, self.models)  # run once per rollout, then reused
            self.value_frozen_layers = value_frozen_layers(config, self.models, below=self.frozen_layers)
        self.token_budget = self._token_budget()  # after loading: 'auto' reads what memory the models left
        self.reward_tokenizer = self._reward_tokenizer_if_different()

        context = getattr(self.models.policy.config, "max_position_embeddings", None) or 2**31
        self.max_prompt_tokens = config.check_prompt_room(context)
        self.stop_token_id = self.tokenizer.eos_token_id
        self.generation_config = sampling_config(
            config.max_new_tokens, config.temperature, config.top_k, config.top_p,
            self.stop_token_id, self.tokenizer.pad_token_id,
        )
        self.greedy_config = greedy_config(config.max_new_tokens, self.stop_token_id, self.tokenizer.pad_token_id)
        self.kl_controller = KLController(config.kl_coef, config.adaptive_kl_target, config.adaptive_kl_horizon)
        self.update_reads_old_logprobs = config.update_reads_old_logprobs  # the rollout skips the policy's pass
        self.step_count = 0

    def _token_budget(self) -> TokenBudget | None:
        """The padded tokens per pass that micro-batches are packed to (and what a response position counts for),
        or None when `micro_batch_size` (which wins) or nothing sizes them."""
        cfg = self.config
        if cfg.micro_batch_size is not None or cfg.micro_batch_tokens is None:
            return None
        if cfg.micro_batch_tokens != "auto":
            return TokenBudget(cfg.micro_batch_tokens)
        model = self.models.policy.config
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        autocast = body_autocast_dtype(self.models.policy)
        budget = auto_micro_batch_tokens(self.device.type, free, model.num_hidden_layers, model.hidden_size,
                                         model.vocab_size, self.dtype.itemsize,
                                         head_copies=1 if self.models.fused_head else 3,
                                         autocast_bytes=0 if autocast is None else autocast.itemsize)
        logger.info("micro_batch_tokens: auto chose %d tokens per forward/backward pass, a response position "
                    "counting as %.2f (the output head's memory there)", *budget)
        return budget

    def _micro_batches(self, batch: SequenceBatch, index: torch.Tensor, collective: bool) -> list[torch.Tensor]:
        """The rows `index` of `batch` as micro-batches, by `micro_batch_size` or else the token budget.

        `collective`: the passes run on sharded weights, where every forward and backward pass gathers weights from
        every process, so every process must run as many; token-budget groups then split until each process has
        as many as the process with the most (rows per minibatch are equal on every process, so this is possible).
        """
        cfg = self.config
        budget = self.token_budget
        tokens, response_cost = (None, 1.0) if budget is None else budget
        groups = batch.micro_batches(index, cfg.micro_batch_size, tokens, response_cost=response_cost)
        if collective and budget is not None and self.layout.processes > 1:
            counts = torch.zeros(self.layout.processes, device=self.device)
            counts[process_state().process_index] = len(groups)
            most = int(all_sum(counts).max().item())
            if most > len(groups):
                groups = batch.micro_batches(index, None, tokens, min_groups=most, response_cost=response_cost)
        return groups

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the policy's parameter group and, with a value model, the value model's. Called by the backend
        once it has placed the weights (sharding replaces the parameter objects)."""
        groups = [{"params": self.models.policy_parameters(), "lr": self.config.learning_rate}]
        if self.config.needs_value_model:
            groups.append({"params": self.models.value_parameters(), "lr": self.config.value_learning_rate})
        return adamw(groups, weight_decay=0.0)

    def train_step(self, prompts: list[PromptItem]) -> dict:
        """One step of a training run: a PPO step (the name every stage's trainer shares)."""
        return self.ppo_step(prompts)

    def ppo_step(self, prompts: list[PromptItem]) -> dict:
        """Run one PPO iteration on `prompts` and return its statistics.

        A prompt is a string, or a dataset row: a dict with the prompt under "prompt" and other columns that the
        reward functions may read. Each prompt gets `num_generations` responses.

        Prompts longer than the model's context minus `max_new_tokens` keep their last tokens (with a warning).
        Bad input (no prompts, a non-string prompt, a reward function that raises or returns the wrong number of
        scores or a non-finite one) raises before any weight, optimizer or controller state changes.

        Returns a dict with `generated_texts` (completions without the prompt), `rewards` (raw scores, one per
        response) and Python floats: losses, KL, entropy, clip fractions, lengths, the KL coefficient, the PPO epochs
        that ran and the seconds spent in each stage (`time/<stage>`).
        """
        step_start = time.perf_counter()
        rollout = self.make_rollout(prompts)
        with self._timed("update", rollout.timings):
            update_stats = self.update(rollout)
        stats = rollout.statistics()  # over every process's rows
        if "kl" in stats:  # an adaptive target implies a reference pass
            self.kl_controller.update(stats["kl"], len(stats["rewards"]))
        self.step_count += 1
        stats["time/step"] = time.perf_counter() - step_start
        return {**stats, **update_stats}

    def make_rollout(self, prompts: list[PromptItem]) -> Rollout:
        """Stages 1 to 6: sample, score, compute logprobs, shape rewards, values and advantages. No weight changes.

        `prompts` are this process's share of the step's prompts (strings or dataset rows); each is repeated
        `num_generations` times, so that rows `[g * num_generations, (g + 1) * num_generations)` are its group.
        """
        cfg, models = self.config, self.models
        timings: dict[str, float] = {}
        prompts, columns = repeated_prompts(prompts, cfg.num_generations)
        # Sharded weights are gathered whole for these passes: they need no gradients, and processes may run
        # different numbers of them (generation lengths differ).
        with self.whole_weights():
            # 1. generate: left-padded prompts -> sampled responses, cut after the first stop token. The prompts are
            #    read into the KV cache in groups of similar length within the token budget.
            with self._timed("generate", timings):
                batch, completions = self._generate(prompts, self.generation_config)
                batch = replace(batch, packed=models.packed)  # the passes below and the update's, packed or padded
                response_mask = batch.response_mask
                ended = self._ended(batch)

            # 3. score (before the heavier passes, so that a failing reward function fails fast); a reward model
            #    reads the rows in micro-batches, as the passes below do.
            with self._timed("reward", timings):
                raw_scores, reward_parts = self._score(prompts, completions, batch, ended, columns)
                raw_scores = raw_scores.to(self.device)

            # 2. logprobs of the sampled tokens under the policy (old) and the reference, at the sampling temperature.
            #    Each pass runs over micro-batches of similar prompt length, so short prompts carry little padding.
            #    The frozen bottom layers, the same in every role, run once here; every later pass starts from them.
            #    No KL term anywhere (both coefficients 0, no adaptive target): no reference pass at all.
            #    With one minibatch per epoch and no KL in the reward, the update's first pass gives the old logprobs.
            with self._timed("logprobs", timings), torch.no_grad():
                batch = self._with_prefix(batch, self.frozen_layers, models.policy)
                old_logprobs = entropy = values = None
                if not self.update_reads_old_logprobs and cfg.value_head_on_policy:
                    # the values come from the same pass of the policy's body (stage 5 needs none of its own)
                    with models.value_mode():
                        old_logprobs, entropy, values = self._per_token(batch, lambda micro: policy_logprobs_and_values(
                            models.policy, models.value_head, micro, cfg.temperature, with_entropy=True,
                            fused_head=models.fused_head))
                elif not self.update_reads_old_logprobs:
                    old_logprobs, entropy = self._per_token(batch, lambda micro: sequence_logprobs(
                        models.policy, micro, cfg.temperature, with_entropy=True, fused_head=models.fused_head))
                ref_logprobs = None
                if cfg.uses_reference:
                    with models.reference_model() as reference:
                        ref_logprobs, _ = self._per_token(batch, lambda micro: sequence_logprobs(
                            reference, micro, cfg.temperature, fused_head=models.fused_head))

            # 4. shape: per-token KL penalty plus the (possibly penalised) score on the last valid token.
            kl_coef = self.kl_controller.value
            kl = None
            if ref_logprobs is not None and old_logprobs is not None:
                kl = KL_ESTIMATORS[cfg.kl_estimator](old_logprobs, ref_logprobs)
            scores = apply_missing_eos_penalty(raw_scores, ended, cfg.missing_eos_penalty)
            no_kl = torch.zeros(response_mask.shape, device=self.device)
            rewards = shape_rewards(scores, no_kl if kl is None else kl, response_mask, kl_coef)

            # 5. values of the state before each response token, for an estimator that needs them. The value body's
            #    frozen lower layers (`value_layers`) run once here; its later passes start from their output.
            value_batch = None
            if cfg.needs_value_model and values is None:
                with self._timed("values", timings), torch.no_grad(), models.value_mode():
                    value_batch = self._with_prefix(batch, self.value_frozen_layers, models.value_backbone)
                    values, _ = self._per_token(value_batch, lambda micro: (
                        sequence_values(models.value_backbone, models.value_head, micro), None))

        # 6. advantages by the configured estimator (GAE by default); returns are the value targets. Whitening is
        #    over every process's tokens; by default, as the estimator registered it.
        inputs = AdvantageInputs(rewards, values, response_mask, scores, cfg.gamma, cfg.lam, cfg.num_generations,
                                 cfg.scale_rewards, all_sum)
        advantages, returns = self.estimator(inputs)
        whiten = self.estimator.whitens if cfg.whiten_advantages is None else cfg.whiten_advantages
        if whiten:
            advantages = masked_whiten(advantages, response_mask, all_sum=all_sum)
        zero_variance, update_mask = None, response_mask
        if cfg.num_generations > 1:
            zero_variance = zero_variance_groups(scores, cfg.num_generations)
            if cfg.drop_zero_variance_groups:
                keep = (~zero_variance).repeat_interleave(cfg.num_generations)
                update_mask = response_mask * keep.unsqueeze(-1).to(response_mask.dtype)

        return Rollout(
            batch=batch, completions=completions, raw_scores=raw_scores, scores=scores, ended=ended, kl=kl,
            kl_coef=kl_coef, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values,
            advantages=advantages, returns=returns, entropy=entropy, update_mask=update_mask,
            reward_parts=reward_parts, zero_variance=zero_variance, timings=timings,
            value_batch=value_batch if self.value_frozen_layers else None,
        )

    def _per_token(
        self, batch: SequenceBatch, forward: Callable[[SequenceBatch], tuple[torch.Tensor | None, ...]]
    ) -> tuple[torch.Tensor | None, ...]:
        """Run `forward` over the batch's micro-batches and put each of its `[rows, response]` outputs back in row
        order (None where it gives None)."""
        return self._per_row(batch, forward, width=batch.response_mask.shape[1])

    def _per_row(
        self, batch: SequenceBatch, forward: Callable[[SequenceBatch], tuple[torch.Tensor | None, ...]],
        width: int | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """Run `forward` over the batch's micro-batches and put each of its outputs back in row order (None where it
        gives None): `[rows]` outputs, or `[rows, up to width]` ones with `width`, zero beyond each micro-batch's."""
        rows = batch.input_ids.shape[0]
        outputs: list[torch.Tensor | None] = []
        everything = torch.arange(rows, device=batch.input_ids.device)
        for index in self._micro_batches(batch, everything, collective=False):  # weights held whole: no collective
            results = forward(batch.select(index))
            outputs = outputs or [None] * len(results)
            for slot, result in enumerate(results):
                if result is None:
                    continue
                if outputs[slot] is None:
                    shape = (rows,) if width is None else (rows, width)
                    outputs[slot] = torch.zeros(shape, dtype=result.dtype, device=result.device)
                if width is None:
                    outputs[slot][index] = result
                else:
                    outputs[slot][index, : result.shape[1]] = result
        return tuple(outputs)

    def evaluate(
        self, prompts: list[str], greedy: bool | None = None, reference: bool = False
    ) -> tuple[dict[str, float], list[dict]]:
        """Mean reward, KL to the reference and response length on held-out prompts, and each prompt's sample.

        Each prompt gets `eval_samples_per_prompt` responses sampled as in training (consecutive samples), or one
        greedy response with `greedy` (default: `eval_greedy`). Sampling uses its own seeded generator state, so
        evaluating never shifts the training run's randomness and the same weights always give the same samples. The
        KL of a response is exact rather than estimated from its tokens: the KL between the policy's and the
        reference's next-token distributions at each position, summed over the response. `reference` evaluates the
        reference model instead of the policy (where the run started, for a LoRA policy or a frozen copy; its KL is
        0). No weight changes.
        """
        cfg, models = self.config, self.models
        greedy = cfg.eval_greedy if greedy is None else greedy

        def exact_kl_per_token(micro: SequenceBatch) -> tuple[torch.Tensor, None]:
            logits = response_logits(models.policy, micro, cfg.temperature)
            with models.reference_model() as reference:
                return exact_kl(logits, response_logits(reference, micro, cfg.temperature)), None

        generation_config = self.greedy_config if greedy else self.generation_config
        prompts, columns = repeated_prompts(prompts, 1 if greedy else cfg.eval_samples_per_prompt)
        samples = []
        devices = [self.device] if self.device.type == "cuda" else []
        model = models.reference_model() if reference else contextlib.nullcontext(models.policy)
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.whole_weights(), model as model:
            torch.manual_seed(cfg.seed)
            for start in range(0, len(prompts), self.layout.per_process):
                part = prompts[start : start + self.layout.per_process]
                batch, completions = self._generate(part, generation_config, model)
                part_columns = {name: values[start : start + len(part)] for name, values in columns.items()}
                scores, parts = self._score(part, completions, batch, self._ended(batch), part_columns)
                mask = batch.response_mask
                if reference:
                    summed_kl = torch.zeros(len(part))
                else:
                    kl_per_token, _ = self._per_token(self._with_prefix(batch, self.frozen_layers, models.policy),
                                                      exact_kl_per_token)
                    summed_kl = torch.where(mask.bool(), kl_per_token, 0.0).sum(-1)  # padding's numbers never count
                fields = {"prompt": part, "completion": completions, "reward": scores.tolist(),
                          "kl": summed_kl.tolist(), "length": mask.sum(-1).tolist(),
                          **{f"reward/{name}": values.tolist() for name, values in parts.items()}}
                samples += [dict(zip(fields, row, strict=True)) for row in zip(*fields.values(), strict=True)]
        samples = gather_rows(samples)  # every process's share of the prompts, in order
        scores = torch.tensor([sample["reward"] for sample in samples], dtype=torch.float64)
        metrics = {
            "eval/reward_mean": scores.mean().item(),
            "eval/reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "eval/kl": sum(sample["kl"] for sample in samples) / len(samples),
            "eval/response_length": sum(sample["length"] for sample in samples) / len(samples),
            # with several reward functions, each one's mean (a GSM8K run's accuracy is eval/reward/math_answer)
            **{f"eval/{name}": sum(sample[name] for sample in samples) / len(samples)
               for name in samples[0] if name.startswith("reward/")},
        }
        return metrics, samples

    def _generate(
        self, prompts: list[str], generation_config: GenerationConfig, model: torch.nn.Module | None = None
    ) -> tuple[SequenceBatch, list[str]]:
        """Left-padded prompts -> `model`'s (default: the policy's) responses cut after the first stop token, and
        their decoded texts."""
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        batch = generate_responses(
            model or self.models.policy, prompt_ids.to(self.device), prompt_mask.to(self.device), generation_config,
            self.stop_token_id, self.tokenizer.pad_token_id,
            prefill_tokens=self.token_budget and self.token_budget.tokens,  # the prompts read in passes of this size
        )
        return batch, self.tokenizer.batch_decode(batch.responses, skip_special_tokens=True)

    def _with_prefix(self, batch: SequenceBatch, layers: int, model: torch.nn.Module) -> SequenceBatch:
        """The batch with the hidden states entering `model`'s decoder layer `layers` attached (from the batch's own
        prefix when it has one), for later passes to start from; the batch itself when `layers` is 0."""
        if not layers:
            return batch
        rows = self.config.micro_batch_size
        if self.token_budget is not None:  # bottom layers over the batch's whole width, no head: budget / width rows
            rows = max(1, self.token_budget.tokens // batch.input_ids.shape[1])
        hidden = prefix_hidden_states(model, batch, layers, rows)
        return replace(batch, prefix_hidden=hidden, prefix_layers=layers)

    # --- checkpoint state ----------------------------------------------------------------------------------------

    def whole_weights(self) -> contextlib.AbstractContextManager:
        """Inside, every role holds its whole weights on every process, however the launch holds them: for passes
        without gradients, which may differ in number between processes, and for writing checkpoints."""
        return self.backend.gathered(*self.models.held())

    def save_state(self, directory: Path) -> None:
        """Write the trained weights, the policy (peft adapter or full model) and the optimizer to `directory`.

        Every process calls it: sharded weights and optimizer state are gathered whole together (or each process
        writes its partition, as the backend does). The main process writes the rest."""
        self.backend.save_optimizer(directory)
        with self.whole_weights():
            if not PartialState().is_main_process:
                return
            save_trained(self.models.named_trainable(), directory)
            if self.config.use_lora:  # also the policy alone, as a peft adapter that PeftModel.from_pretrained reads
                self.models.policy.save_pretrained(str(directory / "policy"), selected_adapters=[POLICY_ADAPTER],
                                                   state_dict=self.backend.whole_state_dict(self.models.policy))
        self.tokenizer.save_pretrained(str(directory / "policy"))

    def load_state(self, directory: Path) -> None:
        """Load what `save_state` wrote (every process reads it); every trained tensor must be there with its
        shape."""
        self.backend.load_trained_state(directory, self.models.named_trainable())

    def extra_state(self) -> dict:
        """Small state a checkpoint keeps besides weights and optimizer: the KL controller and the step count."""
        return {"kl_controller": self.kl_controller.state_dict(), "step_count": self.step_count}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.step_count = state["step_count"]

    def _ended(self, batch: SequenceBatch) -> torch.Tensor:
        """Whether each response emitted the stop token (rather than being cut at `max_new_tokens`), `[batch]`."""
        return ((batch.responses == self.stop_token_id) & batch.response_mask.bool()).any(-1)

    def _score(
        self, prompts: list[str], completions: list[str], batch: SequenceBatch, ended: torch.Tensor,
        columns: dict[str, list],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores of the completions, and each reward function's own when there are several (else an empty dict).

        Reward functions get the prompts' other dataset `columns`. A reward model reads the policy's tokens and is
        read at the last real token: for an ended response its stop token. With a reward tokenizer of its own, the
        text is tokenised again and that tokenizer's EOS follows each ended response (`ended`), so the model is read
        at an EOS as `ppo-lm reward` trained it; a cut-off response is read at its last token.
        """
        if self.rewards is not None:
            scores, parts = self.rewards(prompts, completions, columns)
            return scores, parts if len(parts) > 1 else {}
        if self.reward_tokenizer is not None:  # the reward model reads another vocabulary: the text, tokenised its way
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
            input_ids, attention_mask = encode_for_reward(self.reward_tokenizer, texts, ended.cpu())
            batch = SequenceBatch(input_ids.to(self.device), attention_mask.to(self.device), input_ids.shape[1])
        with torch.no_grad():  # in micro-batches of similar length, as the other passes of the rollout
            scores, = self._per_row(batch, lambda micro: (
                sequence_scores(self.models.reward_model, micro.input_ids, micro.attention_mask),))
        return check_finite_scores(scores), {}

    def update(self, rollout: Rollout) -> dict[str, float]:
        """Stage 7: PPO epochs over shuffled minibatches, stopping once the approximate KL passes target_kl.

        Each minibatch: the policy loss (with the KL term when it is in the loss, minus the entropy bonus),
        aggregated as configured, and with a value model the clipped value loss; gradients clipped (`grad_norm` is
        their norm before clipping), one optimizer step. A minibatch runs as micro-batches of similar length whose
        loss parts add up to the whole minibatch's loss. A minibatch whose approximate KL is over the target takes no
        step and ends the update. When every group was left out (`drop_zero_variance_groups`), nothing is updated.
        """
        history: dict[str, list[float]] = defaultdict(list)
        optimizer_steps = 0
        rows = rollout.batch.input_ids.shape[0]
        if all_sum(rollout.update_mask.sum()).item() == 0:
            return {"ppo_epochs_run": 0.0, "optimizer_steps": 0.0}
        minibatches = self.config.num_mini_batches
        for epoch in range(self.config.ppo_epochs):
            order = torch.randperm(rows).to(self.device)
            for number, index in enumerate(order.tensor_split(minibatches), 1):
                where = f"PPO step {self.step_count + 1} (epoch {epoch + 1}, minibatch {number} of {minibatches})"
                step_stats = self._minibatch_step(rollout, index, where)
                if rollout.old_logprobs is None:  # the first minibatch was the whole batch, on the sampling weights
                    self._take_old_logprobs_from_the_first_pass(rollout)
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

    def _take_old_logprobs_from_the_first_pass(self, rollout: Rollout) -> None:
        """The first pass's logprobs become the rollout's old logprobs, with its entropy and, when there is a
        reference pass, the KL to the reference that the rollout would have computed from them."""
        (rollout.old_logprobs, rollout.entropy), rollout.first_pass = rollout.first_pass, None
        if rollout.ref_logprobs is not None:
            rollout.kl = KL_ESTIMATORS[self.config.kl_estimator](rollout.old_logprobs, rollout.ref_logprobs)

    def _minibatch_step(self, rollout: Rollout, index: torch.Tensor, where: str) -> dict[str, float] | None:
        """One optimizer step on the minibatch `index` (`where` names it in errors); its statistics, or None (and no
        step) when its approximate KL is over `target_kl`. A loss or gradient that is not finite on any process
        raises `NonFiniteLossError` on every process, with no step taken.

        The approximate KL comes with the minibatch's gradients, which are dropped when it is over the target; a
        backend that cannot drop gradients it has computed gets the decision first, from a pass without gradients.
        """
        target_kl = self.config.target_kl
        if (target_kl is not None and not self.backend.can_discard_gradients
                and self._minibatch_approx_kl(rollout, index) > target_kl):
            return None
        with self.models.gradient_mode():
            stats = self._minibatch_gradients(rollout, index, where)
        if target_kl is not None and self.backend.can_discard_gradients and stats["approx_kl"] > target_kl:
            self.backend.discard_gradients()
            return None
        groups = [self.models.policy_parameters()]
        if self.config.needs_value_model:
            groups.append(self.models.value_parameters())
        step = self.backend.step(groups)
        if not step.stepped:
            raise NonFiniteLossError(f"The gradient norm is {step.grad_norm} at {where}; this minibatch took no "
                                     "optimizer step. Lower the learning rate or check the rewards.")
        stats["grad_norm"] = step.grad_norm
        return stats

    def _minibatch_approx_kl(self, rollout: Rollout, index: torch.Tensor) -> float:
        """The minibatch's approximate KL between the current policy and the rollout's, over every process, from
        a pass without gradients."""
        batch = rollout.batch
        if rollout.old_logprobs is None:  # the first pass gives the old logprobs: its KL is 0
            return 0.0
        total_tokens = all_sum(rollout.update_mask[index].sum()).clamp(min=1)
        kl_sum = torch.zeros((), device=self.device)
        with torch.no_grad():
            for micro_index in self._micro_batches(batch, index, collective=True):
                micro = batch.select(micro_index)
                width = micro.response_mask.shape[1]
                mask = rollout.update_mask[micro_index, :width]
                logprobs, _ = sequence_logprobs(self.models.policy, micro, self.config.temperature)
                old = rollout.old_logprobs[micro_index, :width]
                kl_sum += approx_kl(logprobs, old, mask) * mask.sum() / total_tokens
        return all_sum(kl_sum).item()

    def _minibatch_gradients(self, rollout: Rollout, index: torch.Tensor, where: str) -> dict[str, float]:
        """Accumulate the gradients of one minibatch's losses, micro-batch by micro-batch; return its statistics.

        A micro-batch's loss terms are the policy's and, for an estimator with values, the value model's (computed
        inside `value_mode`); the backend runs their forward and backward passes. Each term returns its part of the
        minibatch's loss and of each statistic, so that the parts of every micro-batch and process add up.

        A term whose loss is not finite still runs its backward pass (a sharded backward is collective: every
        process must take part); whether any process saw one travels with the statistics, so that every process
        drops the minibatch's gradients and raises `NonFiniteLossError` together."""
        batch, update_mask = rollout.batch, rollout.update_mask
        # The minibatch's size over all processes: the loss aggregations' denominators.
        totals = all_sum(torch.stack([update_mask[index].sum(), update_mask[index].any(-1).sum()]).to(
            update_mask.dtype))
        size = MinibatchSize(tokens=totals[0], responses=totals[1])
        sums: dict[str, float] = defaultdict(float)
        if self.config.value_head_on_policy:
            term_names = ["policy and value loss"]
        else:
            term_names = ["policy loss", "value loss"] if self.config.needs_value_model else ["policy loss"]
        non_finite: dict[str, float] = {}  # this process's first non-finite value of each term

        def note_non_finite(objective: torch.Tensor, name: str) -> None:
            if not torch.isfinite(objective):
                non_finite.setdefault(name, objective.item())

        for micro_index in self._micro_batches(batch, index, collective=True):
            micro = batch.select(micro_index)
            mask = update_mask[micro_index, : micro.response_mask.shape[1]]
            share = mask.sum() / size.tokens.clamp(min=1)  # this micro-batch's share of the minibatch's tokens
            if self.config.value_head_on_policy:  # one pass of the policy's body for both losses
                terms = [LossTerm(term_names[0], partial(self._shared_trunk_terms, rollout, micro_index, micro, mask,
                                                         size, share), context=self._value_pass)]
            else:
                terms = [LossTerm("policy loss", partial(self._policy_terms, rollout, micro_index, micro, mask, size,
                                                         share), context=self._policy_pass)]
                if self.config.needs_value_model:
                    value_micro = micro if rollout.value_batch is None else rollout.value_batch.select(micro_index)
                    terms.append(LossTerm("value loss", partial(self._value_terms, rollout, micro_index, value_micro,
                                                                mask, share), context=self._value_pass))
            stats = self.backend.accumulate(terms, note_non_finite)
            for name, value in stats.items():
                sums[name] += value.item()
        names = sorted(sums)  # each process holds its rows' part of every statistic: their sum is the whole's
        local = [sums[name] for name in names] + [float(name in non_finite) for name in term_names]
        totals = all_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        failed = [name for name, count in zip(term_names, totals[len(names):], strict=True) if count > 0]
        if failed:
            self.backend.discard_gradients()
            value = non_finite.get(failed[0], "not finite (on another process)")
            raise NonFiniteLossError(f"The {failed[0]} is {value} at {where}; this minibatch took no optimizer "
                                     "step. Lower the learning rate or check the rewards.")
        return dict(zip(names, totals[: len(names)], strict=True))

    def _policy_terms(self, rollout: Rollout, micro_index: torch.Tensor, micro: SequenceBatch, mask: torch.Tensor,
                      size: MinibatchSize, share: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's part of the policy objective: the configured policy loss on each token, plus
        kl_loss_coef x the k3 KL to the reference, minus entropy_coef x the entropy, aggregated over the minibatch
        (`size`); and its part of each statistic (token means weighted by `share`)."""
        cfg = self.config
        logprobs, entropy = sequence_logprobs(self.models.policy, micro, cfg.temperature,
                                              with_entropy=cfg.entropy_coef > 0 or rollout.entropy is None,
                                              entropy_grad=cfg.entropy_coef > 0, fused_head=self.models.fused_head)
        return self._policy_objective(rollout, micro_index, mask, size, share, logprobs, entropy)

    def _policy_objective(self, rollout: Rollout, micro_index: torch.Tensor, mask: torch.Tensor, size: MinibatchSize,
                          share: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor | None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`_policy_terms` from the micro-batch's logprobs (and entropy, when computed)."""
        cfg = self.config
        width = mask.shape[1]
        if rollout.old_logprobs is None:  # the update's first pass, on the weights that sampled the batch
            old = logprobs.detach()
            rollout.keep_first_pass(micro_index, old, entropy)
        else:
            old = rollout.old_logprobs[micro_index, :width]
        policy_loss, loss_stats = self.policy_loss(logprobs, old, rollout.advantages[micro_index, :width], mask, cfg)
        per_token = policy_loss
        stats = {"policy_loss": self.aggregate(policy_loss.detach(), mask, size, cfg)}
        if cfg.kl_loss_coef > 0:
            kl = kl_k3(logprobs, rollout.ref_logprobs[micro_index, :width])
            per_token = per_token + cfg.kl_loss_coef * kl
            stats["kl_loss"] = masked_mean(kl.detach(), mask) * share
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy
        logprobs = logprobs.detach()
        stats.update({name: value * share for name, value in loss_stats.items()})
        stats["approx_kl"] = approx_kl(logprobs, old, mask) * share
        stats["ratio_mean"] = masked_mean(torch.exp(logprobs - old), mask) * share
        return self.aggregate(per_token, mask, size, cfg), stats

    def _value_terms(self, rollout: Rollout, micro_index: torch.Tensor, micro: SequenceBatch, mask: torch.Tensor,
                     share: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's part of the value objective (vf_coef x the clipped value loss, a token mean weighted by
        `share`) and of its statistics; inside `_value_pass`."""
        values = sequence_values(self.models.value_backbone, self.models.value_head, micro)
        return self._value_objective(rollout, micro_index, mask, share, values)

    def _value_objective(self, rollout: Rollout, micro_index: torch.Tensor, mask: torch.Tensor, share: torch.Tensor,
                         values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`_value_terms` from the micro-batch's values."""
        width = mask.shape[1]
        value_loss, value_clip = clipped_value_loss(
            values, rollout.values[micro_index, :width], rollout.returns[micro_index, :width], mask,
            self.config.value_clip)
        return (self.config.vf_coef * value_loss) * share, {"value_loss": value_loss.detach() * share,
                                                            "value_clip_fraction": value_clip * share}

    def _shared_trunk_terms(self, rollout: Rollout, micro_index: torch.Tensor, micro: SequenceBatch,
                            mask: torch.Tensor, size: MinibatchSize, share: torch.Tensor
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """With `shared_value_trunk`: the policy objective plus the value objective, both read from one pass of the
        policy's body (inside `_value_pass`, which gathers the weights the output head needs under sharding)."""
        cfg = self.config
        logprobs, entropy, values = policy_logprobs_and_values(
            self.models.policy, self.models.value_head, micro, cfg.temperature,
            with_entropy=cfg.entropy_coef > 0 or rollout.entropy is None, entropy_grad=cfg.entropy_coef > 0,
            fused_head=self.models.fused_head)
        policy_objective, stats = self._policy_objective(rollout, micro_index, mask, size, share, logprobs, entropy)
        value_objective, value_stats = self._value_objective(rollout, micro_index, mask, share, values)
        return policy_objective + value_objective, {**stats, **value_stats}

    @contextlib.contextmanager
    def _policy_pass(self) -> Iterator[None]:
        """The weights a pass through the policy's body and head needs at hand (a fused head's pass calls them
        directly, not the policy's forward)."""
        self.backend.gather_root_weights(self.models.policy)
        yield

    @contextlib.contextmanager
    def _value_pass(self) -> Iterator[None]:
        """The value adapter active, and the weights a pass through the value body needs at hand."""
        with self.models.value_mode():
            self.backend.gather_root_weights(self.models.value_root)  # the value pass runs a body, not a forward
            yield

    def _reward_tokenizer_if_different(self):
        """The reward model's tokenizer when its vocabulary differs from the policy's, else None (share tokens)."""
        if self.config.reward_model_name is None:
            return None
        reward_tokenizer = load_tokenizer(self.config.reward_model_name, "reward_model_name")
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
