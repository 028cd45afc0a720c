"""Configuration: one dataclass per stage, a docstring under every field.

`RunConfig` holds what every training run shares (data, length, schedule, checkpoints, logging); each stage's
config adds its own fields: `PPOConfig`, and `SFTConfig` and `RewardConfig` on `FinetuneConfig` (what the two
supervised stages share: model, LoRA, optimiser, batches). `PPOConfig`'s defaults are the original design's
(gamma 0.99, kl_coef 0.1, 10 new tokens, lr 1e-5, value lr 1e-4); the published TL;DR recipe lives in config
files (configs/tldr/), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from ppo_lm.advantages import ADVANTAGE_ESTIMATORS
from ppo_lm.losses import KL_ESTIMATORS, POLICY_LOSSES

KLEstimatorName = Literal[KL_ESTIMATORS.names()]
AdvantageEstimatorName = Literal[ADVANTAGE_ESTIMATORS.names()]
PolicyLossName = Literal[POLICY_LOSSES.names()]
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULERS = ("constant", "linear", "cosine")
TRACKERS = ("tensorboard", "wandb", "trackio")


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


def require_model_and_lora(config: Any) -> None:
    """Check the fields every model-training config shares: model_name and the LoRA settings."""
    require_ints(config, ("lora_r",), 1)
    require_numbers(config, ("lora_alpha",), positive=True)
    if not (isinstance(config.lora_dropout, (int, float)) and 0 <= config.lora_dropout < 1):
        raise _invalid(config, "lora_dropout", config.lora_dropout, "must be in [0, 1)")
    if not config.model_name:
        raise _invalid(config, "model_name", config.model_name, "must name a model (hub name or local directory)")
    if config.lora_layers is not None:
        if not config.lora_layers or not all(_is_int(i) and i >= 0 for i in config.lora_layers):
            raise _invalid(config, "lora_layers", config.lora_layers, "must be a non-empty list of layer indices >= 0")
        if not config.lora_target_modules:
            raise _invalid(config, "lora_layers", config.lora_layers, "needs lora_target_modules too (module names "
                           "such as [q_proj, k_proj, v_proj, o_proj]): peft cannot pick layers of 'all-linear'")


@dataclass
class RunConfig:
    """What every training run shares: where it writes, what data it reads, how long, how it saves and logs."""

    output_dir: str = "runs/ppo"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs and the report go here."""
    dataset: str | None = None
    """Training data: a hub dataset name, a local .jsonl/.json/.csv/.parquet file, or a saved dataset directory."""
    dataset_split: str = "train"
    """Split of `dataset` to train on (a local file is one 'train' split)."""
    eval_split: str | None = None
    """Split of `dataset` to evaluate on, or a local data file of its own (all its rows). None: hold out
    `eval_fraction` of the training rows."""
    eval_fraction: float = 0.05
    """Fraction of the training rows held out for evaluation when there is no `eval_split` (0: no evaluation)."""
    prompt_field: str = "prompt"
    """Column that holds the prompt. Rows with subreddit/title/post columns become TL;DR prompts instead."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens: a TL;DR post body is shortened to fit (the 'TL;DR:' suffix is kept). None: no limit."""
    total_steps: int = 100
    """Optimisation steps of the run (for PPO, one step is one rollout batch and its PPO epochs)."""
    lr_scheduler: str = "constant"
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
    dtype: str = "auto"
    """Weights' dtype: 'auto' (bfloat16 on a GPU that supports it, else float32), 'float32', 'bfloat16', 'float16'."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        require_ints(self, ("total_steps",), 1)
        require_ints(self, ("warmup_steps", "eval_steps", "save_steps", "save_total_limit", "max_eval_prompts"), 0)
        if not (isinstance(self.eval_fraction, (int, float)) and 0 <= self.eval_fraction < 1):
            raise _invalid(self, "eval_fraction", self.eval_fraction, "must be in [0, 1)")
        require_optional_ints(self, ("max_prompt_length",))
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise _invalid(self, "lr_scheduler", self.lr_scheduler, f"must be one of {LR_SCHEDULERS}")
        if self.dtype not in DTYPES:
            raise _invalid(self, "dtype", self.dtype, f"must be one of {DTYPES}")
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
class PPOConfig(RunConfig):
    """Everything one PPO run needs to know: the models, how to sample, how to reward, how to update."""

    # --- models -----------------------------------------------------------------------------------------
    model_name: str = "Qwen/Qwen3-0.6B-Base"
    """Base causal LM (hub name or local directory). The policy is this model plus a LoRA adapter."""
    ref_model_name: str | None = None
    """Reference model for the KL penalty. None: the base model with the policy adapter disabled (no copy)."""
    reward_model_name: str | None = None
    """Sequence-classification reward model (num_labels=1). None: the `reward_fn` given to the trainer."""
    value_model_name: str | None = None
    """Separate value model, e.g. the reward model. None: a second LoRA adapter plus a scalar head on the base."""
    use_lora: bool = True
    """Train LoRA adapters on a frozen base. False: full fine-tuning (the reference becomes a frozen copy)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the adapter output is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.1
    """Dropout inside LoRA layers. Inactive during PPO, which keeps every model in eval mode."""
    lora_target_modules: list[str] | None = None
    """Module names that get LoRA layers. None: every linear layer except the output head."""
    lora_layers: list[int] | None = None
    """Indices of the decoder layers that get LoRA (None: all). Needs `lora_target_modules` (e.g. q_proj, v_proj).
    The top layers alone make an update cheaper: the backward pass stops below the lowest adapted layer."""
    reward_fn: str | None = None
    """Reward function for the command line, 'package.module:function' or 'path/to/file.py:function'."""

    # --- rollout ----------------------------------------------------------------------------------------
    batch_size: int = 32
    """Prompts per PPO step (the rollout batch)."""
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
    """Weight of the per-token KL penalty against the reference (the initial value when adaptive)."""
    kl_estimator: KLEstimatorName = "k1"
    """Per-token KL estimator in the reward: 'k1' (logp - logp_ref) or 'k3' ((r - 1) - log r, r = p_ref / p)."""
    adaptive_kl_target: float | None = None
    """Target of the adaptive KL controller (summed KL per response). None: kl_coef stays fixed."""
    adaptive_kl_horizon: int = 10000
    """Horizon, in episodes, of the adaptive KL controller: how fast kl_coef moves toward the target."""
    missing_eos_penalty: float | None = None
    """Score given instead of the reward to a response that never emits EOS (e.g. -1.0). None: no penalty."""

    # --- advantages -------------------------------------------------------------------------------------
    advantage_estimator: AdvantageEstimatorName = "gae"
    """How advantages are estimated (`advantages.ADVANTAGE_ESTIMATORS`): 'gae', generalised advantage estimation
    over the shaped rewards and the value model's estimates."""
    gamma: float = 0.99
    """Discount factor of the per-token return."""
    lam: float = 0.95
    """GAE lambda: 0 is one-step TD, 1 is Monte Carlo."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the valid tokens of the batch."""

    # --- update -----------------------------------------------------------------------------------------
    learning_rate: float = 1e-5
    """AdamW learning rate of the policy."""
    value_learning_rate: float = 1e-4
    """AdamW learning rate of the value model (adapter and head)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Minibatches per pass; one optimizer step each."""
    policy_loss: PolicyLossName = "clipped"
    """The policy loss (`losses.POLICY_LOSSES`): 'clipped', PPO's clipped surrogate."""
    clip_epsilon: float = 0.2
    """Policy ratio clip range: the ratio is clipped to [1 - clip_epsilon, 1 + clip_epsilon]."""
    value_clip: float = 0.2
    """Value clip range around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0 turns it off)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip, applied to the policy and to the value model separately (under DeepSpeed: to both
    together); 0 turns clipping off."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward pass: each batch runs as micro-batches of similar prompt length (less
    padding, less memory), gradients accumulated to the same update. None: a whole minibatch per pass."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, about a third slower."""
    cache_frozen_layers: bool = True
    """With `lora_layers`, run the layers below the lowest adapted one once per rollout and start every later pass
    (reference, values, each PPO epoch) from their output: the same numbers for less compute, at the memory of one
    hidden state per token. Applies when the reference and the value model are the shared base (the default)."""
    target_kl: float | None = None
    """Stop the PPO epochs early when a minibatch's approximate KL to the rollout policy passes this. None: off."""

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        super().validate()
        require_model_and_lora(self)
        require_numbers(self, ("learning_rate", "value_learning_rate", "clip_epsilon", "temperature",
                               "adaptive_kl_horizon"), positive=True)
        require_ints(self, ("batch_size", "max_new_tokens", "ppo_epochs", "num_mini_batches",
                            "eval_samples_per_prompt"), 1)
        if self.eval_greedy and self.eval_samples_per_prompt != 1:
            raise _invalid(self, "eval_samples_per_prompt", self.eval_samples_per_prompt,
                           "must be 1 with eval_greedy: greedy decoding gives the same response every time")
        require_numbers(self, ("kl_coef", "value_clip", "vf_coef", "entropy_coef", "max_grad_norm"), positive=False)
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise _invalid(self, name, value, "must be in [0, 1]")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise _invalid(self, "top_p", self.top_p, "must be in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise _invalid(self, "top_k", self.top_k, "must be an integer >= 0 (0 turns it off)")
        for name, registry in (("kl_estimator", KL_ESTIMATORS), ("advantage_estimator", ADVANTAGE_ESTIMATORS),
                               ("policy_loss", POLICY_LOSSES)):
            if getattr(self, name) not in registry:
                raise _invalid(self, name, getattr(self, name), f"must be one of {registry.names()}")
        require_optional_ints(self, ("micro_batch_size",))
        for name in ("target_kl", "adaptive_kl_target"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise _invalid(self, name, value, "must be a number > 0, or None to turn it off")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise _invalid(self, "missing_eos_penalty", self.missing_eos_penalty, "must be a finite number or None")
        if self.num_mini_batches > self.batch_size:
            raise _invalid(self, "num_mini_batches", self.num_mini_batches,
                           f"must be <= batch_size ({self.batch_size}): each minibatch needs a sequence")


@dataclass
class FinetuneConfig(RunConfig):
    """What the supervised stages (SFT and reward-model training) share: the model, LoRA, optimiser, batches."""

    model_name: str = "Qwen/Qwen3-0.6B-Base"
    """Model to start from (hub name or local directory). SFT trains it as a causal LM; reward-model training puts a
    scalar head on its body (a sequence-classification checkpoint keeps its trained head)."""
    use_lora: bool = True
    """Train a LoRA adapter on a frozen base. False: full fine-tuning of every weight."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the adapter output is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout inside LoRA layers while training (0: none, as in the N+ implementation details of RLHF)."""
    lora_target_modules: list[str] | None = None
    """Module names that get LoRA layers. None: every linear layer except the output head."""
    lora_layers: list[int] | None = None
    """Indices of the decoder layers that get LoRA (None: all). Needs `lora_target_modules` (e.g. q_proj, v_proj)."""
    merge_lora: bool = True
    """At the end, write `<output_dir>/final` as one merged model (True), or as the LoRA adapter alone (False; it
    loads with `from_pretrained` when peft is installed). The next stage of the pipeline needs a merged model."""
    batch_size: int = 32
    """Rows (SFT) or preference pairs (reward model) per optimizer step."""
    micro_batch_size: int | None = None
    """Rows (or pairs) per forward/backward pass, gradients accumulated to the same step. None: the whole batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, about a third slower."""
    learning_rate: float = 1e-5
    """AdamW learning rate (the peak, after warmup)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient norm clip (0 turns clipping off)."""
    max_completion_length: int | None = None
    """Longest completion in tokens, EOS included: a longer one is cut (and then lacks its EOS), with a warning.
    None: no limit but the model's context (the prompt's start is cut first)."""
    max_eval_samples: int = 8
    """At most this many evaluation rows are written to samples.jsonl at each evaluation (SFT: with a greedily
    generated completion; reward model: the chosen completion with its score and the rejected one's)."""

    def validate(self) -> None:
        """Raise a ValueError naming the first field whose value is not allowed."""
        super().validate()
        require_model_and_lora(self)
        require_ints(self, ("batch_size",), 1)
        require_ints(self, ("max_eval_samples",), 0)
        require_optional_ints(self, ("micro_batch_size", "max_completion_length"))
        require_numbers(self, ("learning_rate",), positive=True)
        require_numbers(self, ("weight_decay", "max_grad_norm"), positive=False)


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
