"""Configuration: one dataclass per stage, a docstring under every field, each shared field declared once.

    RunConfig                 what every run shares: data, length, schedule, checkpoints, logging, device
    └── TrainConfig           what every training stage shares: model, LoRA, optimiser, batches
        ├── PPOConfig         `ppo-lm train`
        └── FinetuneConfig    what the two supervised stages share: merging, weight decay, completion length
            ├── SFTConfig     `ppo-lm sft`
            └── RewardConfig  `ppo-lm reward`

A field with a fixed set of values is typed with a `Literal` alias (so `--help` lists the choices) and its allowed
tuple is derived from that alias. `validate()` checks every value and every rule between fields that needs nothing
but the config; it runs from `__post_init__`, so every new instance (a YAML file, tyro's `--FIELD VALUE`,
`dataclasses.replace`) is checked before any model loads. The rules that need something from outside are `PPOConfig`
methods the trainer calls: `check_reward_source` (a Python reward function given to the trainer) and
`check_prompt_room` (the model's context length). `PPOConfig`'s defaults are the original design's (gamma 0.99,
kl_coef 0.1, 10 new tokens, lr 1e-5, value lr 1e-4, batch 32); the published TL;DR recipe lives in config files
(configs/tldr/), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from ppo_lm.advantages import ADVANTAGE_ESTIMATORS
from ppo_lm.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

LRSchedulerName = Literal["constant", "linear", "cosine"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16", "bfloat16_if_native"]
LR_SCHEDULERS: tuple[str, ...] = get_args(LRSchedulerName)
DTYPES: tuple[str, ...] = get_args(DTypeName)
MixedPrecisionName = Literal["auto", "bf16", "no"]
MIXED_PRECISIONS: tuple[str, ...] = get_args(MixedPrecisionName)
# The algorithm's variable parts: the choices are the names registered in advantages.py and losses.py.
KLEstimatorName = Literal[KL_ESTIMATORS.names()]
AdvantageEstimatorName = Literal[ADVANTAGE_ESTIMATORS.names()]
PolicyLossName = Literal[POLICY_LOSSES.names()]
LossAggregationName = Literal[LOSS_AGGREGATIONS.names()]
ScaleRewardsName = Literal["group", "batch", "none"]
OnNonFiniteName = Literal["raise", "skip"]
MicroBatchTokens = int | Literal["auto"] | None
"""`micro_batch_tokens`: a number of tokens, 'auto' (chosen from the device and the model) or None (off)."""
PackSequencesName = Literal["auto", "on", "off"]
PACK_SEQUENCES: tuple[str, ...] = get_args(PackSequencesName)
ON_NON_FINITE: tuple[str, ...] = get_args(OnNonFiniteName)
SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewardsName)
TRACKERS = ("tensorboard", "wandb", "trackio")
"""Trackers `report_to` may name (a comma-separated list, so a plain str rather than a Literal)."""


def _invalid(config: Any, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{type(config).__name__}.{name}={value!r} is invalid: {allowed}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_ints(config: Any, names: tuple[str, ...], minimum: int) -> None:
    """Raise a ValueError for the first of `names` whose value is not an integer >= `minimum`."""
    for name in names:
        value = getattr(config, name)
        if not (_is_int(value) and value >= minimum):
            raise _invalid(config, name, value, f"must be an integer >= {minimum}")


def require_optional_ints(config: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    """Raise a ValueError for the first of `names` whose value is neither None nor an integer >= `minimum`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (_is_int(value) and value >= minimum):
            raise _invalid(config, name, value, f"must be an integer >= {minimum}, or None")


def require_numbers(config: Any, names: tuple[str, ...], positive: bool) -> None:
    """Raise a ValueError for the first of `names` whose value is not a finite number > 0 (`positive`) or >= 0."""
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (value > 0 if positive else value >= 0)):
            raise _invalid(config, name, value, f"must be a finite number {'>' if positive else '>='} 0")


def require_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError when field `name` is not one of `choices` (a dataclass does not enforce its Literal)."""
    value = getattr(config, name)
    if value not in choices:
        raise _invalid(config, name, value, f"must be one of {choices}")


@dataclass
class RunConfig:
    """What every training run shares: where it writes, what data it reads, how long, how it saves and logs."""

    output_dir: str = "runs/ppo"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs and the report go here."""
    dataset: str | None = None
    """Training data: a hub dataset name, a local .jsonl/.json/.csv/.parquet file, or a saved dataset directory."""
    dataset_config: str | None = None
    """Configuration (subset) of a hub `dataset` that has several, e.g. 'main' for openai/gsm8k. None: its default."""
    dataset_split: str = "train"
    """Split of `dataset` to train on (a local file is one 'train' split)."""
    eval_split: str | None = None
    """Split of `dataset` to evaluate on, or a local data file of its own (all its rows). None: hold out
    `eval_fraction` of the training rows."""
    eval_fraction: float = 0.05
    """Fraction of the training rows held out for evaluation when there is no `eval_split` (0: no evaluation)."""
    prompt_field: str = "prompt"
    """Column that holds the prompt: text, or a conversation (a list of `{"role", "content"}` messages, put into the
    model's chat template). Rows with subreddit/title/post columns become TL;DR prompts instead."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens: a TL;DR post body is shortened to fit (the 'TL;DR:' suffix is kept). None: no limit."""
    total_steps: int = 100
    """Optimisation steps of the run (for PPO, one step is one rollout batch and its PPO epochs)."""
    max_train_minutes: float | None = None
    """Stop earlier than total_steps once the training steps have taken this many minutes (in this process's run;
    evaluations and saving not counted), then evaluate and save as at the end. The learning-rate schedule still
    counts to total_steps. None: total_steps alone decides. For comparisons at an equal time budget."""
    lr_scheduler: LRSchedulerName = "constant"
    """Learning-rate schedule after warmup: 'constant', 'linear' (to 0 at total_steps) or 'cosine'."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warmup from 0."""
    eval_steps: int = 50
    """Evaluate on the held-out prompts every this many steps, and at the start and the end (0: only start and end)."""
    max_eval_prompts: int = 64
    """At most this many held-out prompts are evaluated (the same ones each time)."""
    save_steps: int = 50
    """Write a checkpoint every this many steps, and at the end (0: only at the end)."""
    save_total_limit: int = 2
    """Keep only the newest this many checkpoints (0: keep all)."""
    report_to: str = "tensorboard"
    """Trackers besides metrics.jsonl, comma-separated: 'tensorboard', 'wandb', 'trackio'; 'none' for none."""
    seed: int = 0
    """Seed of the python, numpy and torch random generators (sampling, minibatch order, data order, head init)."""
    device: str = "auto"
    """Where the models run: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: DTypeName = "auto"
    """Weights' dtype: 'auto' (bfloat16 on a GPU that supports it, else float32), 'float32', 'bfloat16', 'float16', or
    'bfloat16_if_native': bfloat16 where the device multiplies it natively (a GPU that supports it, a CPU with
    AVX-512 BF16 or AMX), else float32, which a CPU without those instructions multiplies many times faster (the
    demos' setting: LoRA on a frozen bfloat16 base)."""
    mixed_precision: MixedPrecisionName = "auto"
    """Matrix products of the transformer bodies in bfloat16 (autocast) while trained weights, optimizer state, output
    heads, logprobs and losses stay float32 (the bodies' frozen linear weights, such as a LoRA base, are stored in
    bfloat16, the operands autocast gives their products): 'auto' on a CPU that multiplies bfloat16 natively
    (AVX-512 BF16 or AMX; a PPO step there took 0.56x to 0.72x the float32 time, benchmarks/RESULTS.md), off
    elsewhere (on a GPU `dtype: auto` already gives bfloat16 weights); 'bf16' wherever the weights are float32; 'no'
    for float32 throughout, as earlier versions ran."""

    def __post_init__(self) -> None:
        # The one place a config is checked on its own: every construction (a YAML file, tyro, dataclasses.replace)
        # comes through here. A trainer calls validate() again for a config whose fields were set afterwards.
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        require_ints(self, ("total_steps",), 1)
        require_ints(self, ("warmup_steps", "eval_steps", "save_steps", "save_total_limit", "max_eval_prompts"), 0)
        if not (isinstance(self.eval_fraction, (int, float)) and 0 <= self.eval_fraction < 1):
            raise _invalid(self, "eval_fraction", self.eval_fraction, "must be in [0, 1)")
        require_optional_ints(self, ("max_prompt_length",))
        if self.max_train_minutes is not None and not (
            isinstance(self.max_train_minutes, (int, float)) and self.max_train_minutes > 0
        ):
            raise _invalid(self, "max_train_minutes", self.max_train_minutes, "must be a positive number or None")
        require_choice(self, "lr_scheduler", LR_SCHEDULERS)
        require_choice(self, "dtype", DTYPES)
        require_choice(self, "mixed_precision", MIXED_PRECISIONS)
        unknown = [name for name in self.trackers() if name not in TRACKERS]
        if unknown:
            raise _invalid(self, "report_to", self.report_to, f"names unknown tracker(s) {unknown}: use "
                           f"{', '.join(TRACKERS)}, a comma-separated list of them, or 'none'")
        if not self.output_dir:
            raise _invalid(self, "output_dir", self.output_dir, "must name a directory")

    def trackers(self) -> list[str]:
        """The trackers named by `report_to` (empty for 'none')."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        return [] if names == ["none"] else names

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field, in declaration order."""
        return [f.name for f in fields(cls)]


@dataclass
class TrainConfig(RunConfig):
    """What every training stage shares: the model it trains, the LoRA adapter, the optimiser and the batches."""

    model_name: str = "Qwen/Qwen3-0.6B-Base"
    """Model to start from (hub name or local directory). PPO: the base causal LM of the policy (and, by default, of
    the reference and the value model); SFT trains it as a causal LM; reward-model training puts a scalar head on its
    body (a sequence-classification checkpoint keeps its trained head)."""
    use_lora: bool = True
    """Train LoRA adapters on a frozen base. False: full fine-tuning of every weight (in PPO the reference then
    becomes a frozen copy of the model)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the adapter output is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout inside LoRA layers while training. 0.0 in every stage, as in the N+ implementation details of RLHF;
    PPO keeps every model in eval mode, so dropout is inactive there whatever this says."""
    lora_target_modules: list[str] | None = None
    """Module names that get LoRA layers. None: every linear layer except the output head."""
    lora_layers: list[int] | None = None
    """Indices of the decoder layers that get LoRA (None: all). Needs `lora_target_modules` (e.g. q_proj, v_proj).
    The top layers alone make an update cheaper: the backward pass stops below the lowest adapted layer."""
    batch_size: int = 32
    """Items per training step, over all processes: PPO, prompts per rollout (each PPO epoch splits them into
    `num_mini_batches` minibatches, one optimizer step each); SFT, rows per optimizer step; reward-model training,
    preference pairs per optimizer step."""
    micro_batch_size: int | None = None
    """Items per forward/backward pass on a process (sequences in PPO, rows in SFT, pairs in reward training),
    gradients accumulated to the same optimizer step; PPO groups a minibatch's sequences by prompt length (less
    padding, less memory). None: a process's whole minibatch (PPO) or share of the batch in one pass; in PPO, passes
    are then sized by `micro_batch_tokens` instead, which a set `micro_batch_size` overrides."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, about a third slower."""
    learning_rate: float = 1e-5
    """AdamW learning rate (the peak, after warmup). In PPO, the policy's; the value model has
    `value_learning_rate`."""
    max_grad_norm: float = 1.0
    """Gradient norm clip (0 turns clipping off). PPO clips the policy and the value model separately (under
    DeepSpeed: both together)."""
    step_rollback: bool = True
    """Keep a copy of the trained weights and optimizer state at the start of each step, so that a step that fails
    (a non-finite loss in its third minibatch, an out-of-memory in the update, a reward function that raises) leaves
    them, the KL controller and the step count exactly as they were. The copy costs memory: with AdamW, three times
    the trained weights (small with LoRA; with full fine-tuning, as much again as the weights and optimizer state).
    False: no copy; a failed step then ends the run with the weights as the failure left them (resume from the last
    checkpoint). Not available under DeepSpeed, which runs without it."""
    on_nonfinite: OnNonFiniteName = "raise"
    """What a step whose loss or gradient is not finite does: 'raise' (undo the step, then stop with an error that
    names the step, the minibatch and the loss) or 'skip' (undo the step, count it in the `skipped_steps` metric
    and go on with the next batch; needs `step_rollback`)."""
    max_skipped_steps: int = 3
    """With `on_nonfinite: skip`, stop with an error once this many steps in a row have been skipped."""

    @property
    def items_per_step(self) -> int:
        """Dataset items each training step draws (PPO: prompts, `batch_size / num_generations`)."""
        return self.batch_size

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        super().validate()
        if not self.model_name:
            raise _invalid(self, "model_name", self.model_name, "must name a model (hub name or local directory)")
        require_ints(self, ("lora_r",), 1)
        require_numbers(self, ("lora_alpha",), positive=True)
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise _invalid(self, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if self.lora_layers is not None:
            if not self.lora_layers or not all(_is_int(i) and i >= 0 for i in self.lora_layers):
                raise _invalid(self, "lora_layers", self.lora_layers, "must be a non-empty list of layer indices >= 0")
            if not self.lora_target_modules:
                raise _invalid(self, "lora_layers", self.lora_layers, "needs lora_target_modules too (module names "
                               "such as [q_proj, k_proj, v_proj, o_proj]): peft cannot pick layers of 'all-linear'")
        require_ints(self, ("batch_size",), 1)
        require_optional_ints(self, ("micro_batch_size",))
        require_numbers(self, ("learning_rate",), positive=True)
        require_numbers(self, ("max_grad_norm",), positive=False)
        require_choice(self, "on_nonfinite", ON_NON_FINITE)
        require_ints(self, ("max_skipped_steps",), 1)
        if self.on_nonfinite == "skip" and not self.step_rollback:
            raise _invalid(self, "on_nonfinite", self.on_nonfinite, "needs step_rollback: true (a skipped step must "
                           "leave no trace); set step_rollback: true or on_nonfinite: raise")


@dataclass
class PPOConfig(TrainConfig):
    """Everything one PPO run needs to know: the models, how to sample, how to reward, how to update.

    The model, LoRA, batch and optimiser fields it shares with the supervised stages are `TrainConfig`'s.
    """

    # --- models (model_name, use_lora and the lora_* fields: TrainConfig) ---------------------------------------
    ref_model_name: str | None = None
    """Reference model for the KL penalty. None: the base model with the policy adapter disabled (no copy)."""
    reward_model_name: str | None = None
    """Sequence-classification reward model (num_labels=1). None: a reward function (`reward_fn`, or a Python
    callable given to the trainer); exactly one of the two scores the responses."""
    value_model_name: str | None = None
    """Separate value model, e.g. the reward model. None: a second LoRA adapter plus a scalar head on the base (a
    second copy of the base in full fine-tuning), or a head on the policy with `shared_value_trunk`."""
    shared_value_trunk: bool = False
    """gae only: the value model is a scalar head on the policy's own final hidden states (the design of trlx and of
    TRL's older PPOTrainer) instead of a model of its own. One forward and backward pass per micro-batch serves both
    losses, and there are no value weights besides the head (in full fine-tuning no second copy of the model, its
    gradients and AdamW state). What it changes: vf_coef x the value loss's gradient reaches the policy's trained
    weights, so the value loss shapes the policy's features too, and the values start from the policy's features
    (the head itself learns at `value_learning_rate`). Not with `value_model_name`."""
    value_layers: int | None = None
    """Train only the value model's top `value_layers` decoder layers and its head: with LoRA its adapter goes on
    those layers only, in full fine-tuning its embeddings and lower layers are frozen. The layers below then compute
    the same hidden states in every value pass, so (with `cache_frozen_layers`) they run once per rollout without
    gradients and every value pass, the rollout's and each PPO epoch's, starts from their output: the value model's
    share of the update shrinks to about value_layers / num_hidden_layers of it, and in full fine-tuning its
    gradients and AdamW state to those layers'. What it changes: the value model's features below those layers are
    the base model's, fixed; the policy is untouched. None: every layer. Not with `shared_value_trunk`."""
    reward_fn: str | list[str] | None = None
    """Reward function for the command line, 'package.module:function' or 'path/to/file.py:function', or a list of
    them whose weighted sum is the score (each one's mean is logged as `reward/<name>`). A function is called as
    `fn(prompts, completions, **columns)` with the dataset row's other columns it names (or all of them, given
    `**kwargs`). Not together with `reward_model_name`."""
    reward_weights: list[float] | None = None
    """Weight of each function of a `reward_fn` list in the score, in the same order. None: 1.0 each."""

    # --- prompts (dataset, prompt_field, max_prompt_length: RunConfig) --------------------------------------------
    chat_template: bool = False
    """Put plain-text prompts into the model's chat template as the user message, ready for the assistant's reply
    (for an instruct model). Conversational prompts (a column of chat messages) always go through it."""
    system_prompt: str | None = None
    """System message put first in every chat prompt that does not start with one (needs chat prompts: a column of
    messages, or `chat_template`). None: the chat template's own default, if it has one."""

    # --- rollout (batch_size: TrainConfig; it counts responses, not prompts) ------------------------------------
    num_generations: int = 1
    """Responses sampled per prompt, a group. `batch_size` counts responses and must be a multiple of it; each step
    draws `batch_size / num_generations` prompts. The group estimators (grpo, rloo, reinforce_pp_baseline) compare
    the responses of a group and need at least 2."""
    max_new_tokens: int = 10
    """Longest response, in tokens. Generation stops at the first EOS token."""
    temperature: float = 1.0
    """Sampling temperature. Logprobs are recomputed from logits divided by it, so the first ratio is exactly 1."""
    top_k: int = 50
    """Sample among the k most likely tokens; 0 turns top-k filtering off."""
    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1.0 turns it off."""
    eval_greedy: bool = False
    """Evaluate greedy responses (the most likely token at each step) instead of sampled ones: one deterministic
    response per prompt, so a change in the eval reward is not hidden under sampling noise."""
    eval_samples_per_prompt: int = 1
    """Sampled responses evaluated per held-out prompt; more average out sampling noise (samples.jsonl gets one row
    each, the demo's summary averages each prompt's before its standard error). Must be 1 with `eval_greedy`."""

    # --- reward -----------------------------------------------------------------------------------------
    kl_coef: float = 0.1
    """Weight of the per-token KL penalty against the reference in the reward (the initial value when adaptive).
    0 with `kl_loss_coef` 0 and no adaptive target: no reference pass at all."""
    kl_estimator: KLEstimatorName = "k1"
    """Per-token KL estimator in the reward: 'k1' (logp - logp_ref) or 'k3' ((r - 1) - log r, r = p_ref / p)."""
    kl_loss_coef: float = 0.0
    """Weight of a KL term in the loss instead (GRPO's): the k3 estimate between the current policy and the reference
    on each sampled token, aggregated like the policy loss, with gradients. 0: no KL term in the loss."""
    adaptive_kl_target: float | None = None
    """Target of the adaptive KL controller (summed KL per response). None: kl_coef stays fixed."""
    adaptive_kl_horizon: int = 10000
    """Horizon, in episodes, of the adaptive KL controller: how fast kl_coef moves toward the target."""
    missing_eos_penalty: float | None = None
    """Score given instead of the reward to a response that never emits EOS (e.g. -1.0). None: no penalty."""

    # --- advantages -------------------------------------------------------------------------------------
    advantage_estimator: AdvantageEstimatorName = "gae"
    """How advantages are estimated (`advantages.ADVANTAGE_ESTIMATORS`; docs/estimators.md says which to reach for):
    'gae', generalised advantage estimation over the shaped rewards and a value model (PPO); the critic-free ones
    train no value model: 'grpo' (the group's rewards normalised, see `scale_rewards`), 'rloo' (leave-one-out
    baseline), 'reinforce_pp' (REINFORCE++: discounted returns of the shaped rewards, whitened over the batch) and
    'reinforce_pp_baseline' (the same after subtracting the group's mean score)."""
    scale_rewards: ScaleRewardsName = "group"
    """grpo only: divide the centred rewards by the group's std ('group', GRPO), the whole batch's std ('batch'), or
    nothing ('none': Dr. GRPO, which removes the bias towards groups of nearly equal rewards)."""
    gamma: float = 0.99
    """Discount factor of the per-token return."""
    lam: float = 0.95
    """GAE lambda: 0 is one-step TD, 1 is Monte Carlo."""
    whiten_advantages: bool | None = None
    """Normalise advantages to mean 0, std 1 over the valid tokens of the batch. None: the estimator's own choice
    (yes for gae and the reinforce_pp ones, no for grpo and rloo, whose group baseline already centres them)."""
    drop_zero_variance_groups: bool = False
    """Leave groups whose rewards are all equal (advantage 0 everywhere) out of the update, so that the loss is
    averaged over the groups that carry a signal (DAPO's dynamic sampling, without resampling). Their fraction is
    logged as `zero_variance_groups` either way."""

    # --- update (learning_rate, max_grad_norm, micro_batch_size, gradient_checkpointing: TrainConfig) ---------
    value_learning_rate: float = 1e-4
    """AdamW learning rate of the value model (adapter and head); gae only."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Minibatches per pass; one optimizer step each. Must divide `batch_size` (and, over several processes, each
    process's share of it)."""
    policy_loss: PolicyLossName = "clipped"
    """The policy loss (`losses.POLICY_LOSSES`): 'clipped', PPO's clipped surrogate of each token's ratio; 'gspo',
    the same surrogate of each response's sequence ratio (the geometric mean of its token ratios; GSPO uses clip
    ranges of a few 1e-4)."""
    clip_epsilon: float = 0.2
    """Policy ratio clip range below 1: the ratio is clipped to [1 - clip_epsilon, 1 + clip_epsilon_high]."""
    clip_epsilon_high: float | None = None
    """Clip range above 1 (DAPO's clip-higher: a larger value lets unlikely tokens with positive advantages grow,
    which keeps entropy from collapsing). None: `clip_epsilon`."""
    dual_clip: float | None = None
    """Dual clip (> 1): for negative advantages the loss is at most `dual_clip` x |A|, so that a ratio far above 1
    cannot produce an unbounded update. None: off."""
    loss_aggregation: LossAggregationName = "token_mean"
    """How per-token policy losses make the minibatch's loss (`losses.LOSS_AGGREGATIONS`): 'token_mean', the mean
    over every valid token (each token counts the same, PPO's and DAPO's choice); 'sequence_mean', the mean over
    responses of each response's token mean (each response counts the same, GRPO's original choice, which favours
    short correct answers and long wrong ones); 'sequence_sum', each response's token sum divided by
    `max_new_tokens`, averaged over responses (Dr. GRPO: no length bias)."""
    value_clip: float = 0.2
    """Value clip range around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0 turns it off)."""
    cache_frozen_layers: bool = True
    """With `lora_layers`, run the layers below the lowest adapted one once per rollout and start every later pass
    (reference, values, each PPO epoch) from their output: the same numbers for less compute, at the memory of one
    hidden state per token. Applies when the reference and the value model are the shared base (the default). With
    `value_layers`, the value model's frozen lower layers likewise run once per rollout. False: every pass runs every
    layer (the plain path these caches are tested against)."""
    compile_layers: bool = False
    """Run each decoder layer of the policy, reference and value bodies through `torch.compile` in every pass but
    generation (the rollout's logprobs and values, and the update); generation stays eager, its shapes change with
    every new token. The compiled layers fuse the elementwise work between the matrix products, after a compilation
    in the first step (one graph per adapter, gradient mode and shape, shared by the layers; one to two minutes on a
    2-core CPU, figures in benchmarks/RESULTS.md). Their numbers agree with the eager layers' to the rounding of the
    bodies' dtype, not bit for bit, so an update's first ratio is 1 to that rounding too. Replicated launches only,
    and not with `gradient_checkpointing`."""
    target_kl: float | None = None
    """Stop the PPO epochs early when a minibatch's approximate KL to the rollout policy passes this. None: off."""
    micro_batch_tokens: MicroBatchTokens = "auto"
    """Padded tokens per forward/backward pass when `micro_batch_size` is None: a process's minibatch (and each
    rollout and evaluation pass) is sorted by prompt length and split into as few groups as keep rows x own width
    within this budget, evened out so that the largest group is as small as that number of passes allows (a single
    longer row gets a pass of its own). The same loss and gradients as one pass, for less padding and memory.
    'auto': memory / bytes per token (`generation.auto_micro_batch_tokens`), where the memory is 1 GiB on the CPU
    (for at most 1,024 tokens, `generation.CPU_PASS_TOKENS`) and a quarter of the GPU's free memory after the models
    load, a token costs about 17 x layers x hidden_size values of activations (each also as a bfloat16 copy in an
    autocast body), and a response position also the float32 row of logits that the output head holds there. None:
    the whole minibatch in one pass. `micro_batch_size`, when set, wins."""
    pack_sequences: PackSequencesName = "auto"
    """Padding-free passes: each micro-batch's real tokens end to end in one row, each sequence attending only to
    itself through PyTorch's variable-length FlashAttention (`ppo_lm.packing`), for the rollout's logprob and value
    passes and the update. The same numbers as the padded passes to the rounding of 16-bit attention kernels, with
    no work on padding. 'auto': on for a CUDA device with bfloat16 or float16 weights, a PyTorch that has
    `torch.nn.attention.varlen`, and models whose packed pass gives their padded pass's hidden states (checked at
    load on two short rows), unless `compile_layers`; 'on': the same, but anything missing is an error; 'off':
    padded passes. Micro-batches are formed as without it (`micro_batch_tokens`)."""

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        super().validate()
        require_numbers(self, ("value_learning_rate", "clip_epsilon", "temperature", "adaptive_kl_horizon"),
                        positive=True)
        require_ints(self, ("max_new_tokens", "ppo_epochs", "num_mini_batches", "eval_samples_per_prompt",
                            "num_generations"), 1)
        if self.eval_greedy and self.eval_samples_per_prompt != 1:
            raise _invalid(self, "eval_samples_per_prompt", self.eval_samples_per_prompt,
                           "must be 1 with eval_greedy: greedy decoding gives the same response every time")
        require_numbers(self, ("kl_coef", "kl_loss_coef", "value_clip", "vf_coef", "entropy_coef"), positive=False)
        require_choice(self, "pack_sequences", PACK_SEQUENCES)
        tokens = self.micro_batch_tokens
        if not (tokens is None or tokens == "auto" or (_is_int(tokens) and tokens >= 1)):
            raise _invalid(self, "micro_batch_tokens", tokens, "must be an integer >= 1, 'auto' or None")
        for name, registry in (("kl_estimator", KL_ESTIMATORS), ("advantage_estimator", ADVANTAGE_ESTIMATORS),
                               ("policy_loss", POLICY_LOSSES), ("loss_aggregation", LOSS_AGGREGATIONS)):
            require_choice(self, name, registry.names())  # read when validating: a variant may register later
        self._check_groups()
        self._check_policy_loss()
        if self.compile_layers and self.gradient_checkpointing:
            raise _invalid(self, "compile_layers", self.compile_layers, "is not supported with gradient_checkpointing "
                           "(the recomputed layers would run outside the compiled graphs); turn one of them off")
        require_optional_ints(self, ("value_layers",))
        if self.value_layers is not None and self.shared_value_trunk:
            raise _invalid(self, "value_layers", self.value_layers, "trains part of a value model of its own, and "
                           "shared_value_trunk has none (its head reads the policy's body); set one of them off")
        if self.shared_value_trunk and self.value_model_name is not None:
            raise _invalid(self, "shared_value_trunk", self.shared_value_trunk,
                           "puts the value head on the policy: leave value_model_name unset, or set this to false")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise _invalid(self, name, value, "must be in [0, 1]")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise _invalid(self, "top_p", self.top_p, "must be in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise _invalid(self, "top_k", self.top_k, "must be an integer >= 0 (0 turns it off)")
        for name in ("target_kl", "adaptive_kl_target"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise _invalid(self, name, value, "must be a number > 0, or None to turn it off")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise _invalid(self, "missing_eos_penalty", self.missing_eos_penalty, "must be a finite number or None")
        # The batch arithmetic that needs no process count; distributed.batch_layout splits it over the processes.
        self._check_reward_functions()
        if self.num_mini_batches > self.batch_size:
            raise _invalid(self, "num_mini_batches", self.num_mini_batches,
                           f"must be <= batch_size ({self.batch_size}): each minibatch needs a sequence")
        if self.batch_size % self.num_mini_batches:
            raise _invalid(self, "num_mini_batches", self.num_mini_batches,
                           f"must divide batch_size ({self.batch_size}): every minibatch gets the same number of "
                           "sequences")
        self.check_reward_source(required=False)

    @property
    def items_per_step(self) -> int:
        """Prompts each step draws: `batch_size` responses in groups of `num_generations`."""
        return self.batch_size // self.num_generations

    @property
    def update_reads_old_logprobs(self) -> bool:
        """One minibatch per epoch and no KL in the reward: the update's first pass runs on the weights that sampled
        the batch, before any optimizer step, so its detached logprobs are the old ones (later epochs read them) and
        the rollout needs no pass of its own for them. With KL in the reward the advantages need the old logprobs
        before the update starts; with several minibatches, the second runs on updated weights."""
        return self.num_mini_batches == 1 and self.kl_coef == 0 and self.adaptive_kl_target is None

    @property
    def needs_value_model(self) -> bool:
        """Whether the advantage estimator reads a value model's estimates (only then is one loaded and trained)."""
        return ADVANTAGE_ESTIMATORS[self.advantage_estimator].needs_values

    @property
    def value_head_on_policy(self) -> bool:
        """Whether the value model is a head on the policy's body (`shared_value_trunk` with an estimator that reads
        values)."""
        return self.shared_value_trunk and self.needs_value_model

    @property
    def uses_reference(self) -> bool:
        """Whether any KL term needs the reference model's logprobs during training."""
        return self.kl_coef > 0 or self.kl_loss_coef > 0 or self.adaptive_kl_target is not None

    def _check_groups(self) -> None:
        if self.batch_size % self.num_generations:
            raise _invalid(self, "batch_size", self.batch_size, f"must be a multiple of num_generations "
                           f"({self.num_generations}): it counts responses, num_generations per prompt")
        estimator = ADVANTAGE_ESTIMATORS[self.advantage_estimator]
        if estimator.needs_groups and self.num_generations < 2:
            raise _invalid(self, "num_generations", self.num_generations, f"must be >= 2 with advantage_estimator="
                           f"{self.advantage_estimator!r}: it compares the responses to one prompt (try 4 or 8)")
        for name in ("value_model_name", "value_layers"):
            if not estimator.needs_values and getattr(self, name) is not None:
                raise _invalid(self, name, getattr(self, name), f"must be None with advantage_estimator="
                               f"{self.advantage_estimator!r}, which trains no value model")
        require_choice(self, "scale_rewards", SCALE_REWARDS)

    def _check_policy_loss(self) -> None:
        if self.clip_epsilon_high is not None:
            require_numbers(self, ("clip_epsilon_high",), positive=True)
        if self.dual_clip is not None and not (isinstance(self.dual_clip, (int, float)) and self.dual_clip > 1
                                               and math.isfinite(self.dual_clip)):
            raise _invalid(self, "dual_clip", self.dual_clip, "must be a number > 1, or None to turn it off")

    def _check_reward_functions(self) -> None:
        functions = self.reward_functions()
        if isinstance(self.reward_fn, list) and not functions:
            raise _invalid(self, "reward_fn", self.reward_fn, "must name at least one function")
        if self.reward_weights is None or not functions:  # weights for Python callables: the trainer checks them
            return
        if len(self.reward_weights) != len(functions) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                for w in self.reward_weights):
            raise _invalid(self, "reward_weights", self.reward_weights, f"must be {len(functions)} finite number(s), "
                           f"one per function of reward_fn ({', '.join(functions)})")

    def reward_functions(self) -> list[str]:
        """The names of `reward_fn` as a list (empty when there is none)."""
        if self.reward_fn is None:
            return []
        return [self.reward_fn] if isinstance(self.reward_fn, str) else list(self.reward_fn)

    def check_reward_source(self, has_callable: bool = False, required: bool = True) -> None:
        """Raise a ValueError unless one reward source at most is set: a reward model (`reward_model_name`) or a
        reward function (`reward_fn`, or a Python callable given to the trainer: `has_callable`, which takes the
        place of `reward_fn`). `required`: also raise when there is none (validate() cannot know of a callable)."""
        function = "a reward_fn callable" if has_callable else f"reward_fn={self.reward_fn!r}"
        if self.reward_model_name is not None and (has_callable or self.reward_fn is not None):
            raise ValueError(f"{type(self).__name__}.reward_model_name={self.reward_model_name!r} and {function} are "
                             "both given: choose one reward source.")
        if self.reward_weights is not None and not has_callable and self.reward_fn is None and (
                required or self.reward_model_name is not None):
            raise _invalid(self, "reward_weights", self.reward_weights, "needs reward functions (weights are per "
                           "function), not a reward model")
        if required and not has_callable and self.reward_fn is None and self.reward_model_name is None:
            raise ValueError(f"No reward: pass reward_fn=... to the trainer, or set {type(self).__name__}.reward_fn "
                             f"to a function or {type(self).__name__}.reward_model_name to a reward model.")

    def check_prompt_room(self, context_length: int) -> int:
        """The room for a prompt, in tokens, in a model's context of `context_length` tokens: the context less
        `max_new_tokens`. Raise a ValueError when that leaves no room (the context is only known from the model)."""
        room = context_length - self.max_new_tokens
        if room < 1:
            raise ValueError(f"{type(self).__name__}.max_new_tokens={self.max_new_tokens} leaves no room for a prompt "
                             f"in the model's context of {context_length} tokens; lower max_new_tokens.")
        return room


@dataclass
class FinetuneConfig(TrainConfig):
    """What the supervised stages (SFT and reward-model training) share beyond `TrainConfig`: how the final model is
    written, weight decay, the completion length and the evaluation samples."""

    merge_lora: bool = True
    """At the end, write `<output_dir>/final` as one merged model (True), or as the LoRA adapter alone (False; it
    loads with `from_pretrained` when peft is installed). The next stage of the pipeline needs a merged model."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_completion_length: int | None = None
    """Longest completion in tokens, EOS included: a longer one is cut (and then lacks its EOS), with a warning.
    None: no limit but the model's context (the prompt's start is cut first)."""
    max_eval_samples: int = 8
    """At most this many evaluation rows are written to samples.jsonl at each evaluation (SFT: with a greedily
    generated completion; reward model: the chosen completion with its score and the rejected one's)."""

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        super().validate()
        require_ints(self, ("max_eval_samples",), 0)
        require_optional_ints(self, ("max_completion_length",))
        require_numbers(self, ("weight_decay",), positive=False)


@dataclass
class SFTConfig(FinetuneConfig):
    """Supervised fine-tuning on prompt/completion rows: the loss is on the completion tokens (and EOS) only."""

    output_dir: str = "runs/sft"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs, the report, and `final/` (the fine-tuned model,
    merged, with its tokenizer: what `ppo-lm reward` and `ppo-lm train` read as model_name)."""
    completion_field: str = "completion"
    """Column that holds the completion. TL;DR rows (subreddit/title/post) without it use their `summary` column."""
    sample_max_new_tokens: int = 53
    """Tokens generated greedily for each evaluation sample written to samples.jsonl (0: no samples)."""

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        super().validate()
        require_ints(self, ("sample_max_new_tokens",), 0)
        if not self.completion_field:
            raise _invalid(self, "completion_field", self.completion_field, "must name a column")


@dataclass
class RewardConfig(FinetuneConfig):
    """Pairwise (Bradley-Terry) reward-model training on preference rows: prompt, chosen and rejected completions."""

    output_dir: str = "runs/reward"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs, the report, and `final/` (the reward model with
    its tokenizer: what `ppo-lm train` reads as reward_model_name and value_model_name)."""
    reference_dataset: str | None = None
    """Prompt/completion rows (the SFT data's schema) whose completions should score 0 on average: after training, their
    mean score is stored as `score_offset` in the model's config and subtracted from every score. None: no offset."""
    reference_split: str = "train"
    """Split of `reference_dataset` (slices such as 'train[:2000]' work)."""

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        super().validate()
        if self.reference_dataset is not None and self.use_lora and not self.merge_lora:
            raise _invalid(self, "merge_lora", self.merge_lora, "must be True when reference_dataset is set: the "
                           "score offset lives in the merged model's config, which an adapter alone does not carry")
