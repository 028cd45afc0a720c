"""What the supervised stages share: SFT (`sft_trainer.py`) and reward-model training (`reward_trainer.py`).

`FinetuneTrainer` holds one model (LoRA adapter or full weights), its tokenizer and its AdamW optimizer, and
implements the `StageTrainer` protocol of the shared loop (`training.run_training`): a training step accumulates
micro-batch gradients into one clipped optimizer step, evaluation sums the same losses without gradients, and the
checkpoint state is the trained tensors and the optimizer (safetensors). A stage only says how a list of items
becomes micro-batch losses (`micro_losses`) and what its evaluation samples are (`samples`).

Texts become one batch of tensors with `encode_completions`: `[left pad | prompt | completion + EOS | right pad]`, a
`SequenceBatch` like a PPO rollout's, so the completion block sits in the same columns in every row.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from ppo_lm.backend import NonFiniteLossError, adamw, select_backend
from ppo_lm.checkpoint import save_trained
from ppo_lm.config import FinetuneConfig
from ppo_lm.distributed import batch_layout, gather_rows, mean_over_processes, process_state
from ppo_lm.generation import SequenceBatch, encode_prompts
from ppo_lm.models import (
    add_vocabulary_gradients_in_place,
    autocast_bodies,
    autocast_dtype,
    enable_activation_checkpointing,
    fuse_lora_layers,
    load_pretrained,
    load_tokenizer,
    lora_config,
    resolve_device,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
"""Folder of the run directory where a supervised stage writes the model the next stage reads."""


def completion_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The completion (label) mask, `[rows, width]`: 1 on the first `lengths[i]` columns of row i, 0 after."""
    return (torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)).long()


def encode_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    max_completion_tokens: int | None = None,
) -> SequenceBatch:
    """Tokenise prompt/completion pairs into `[left pad | prompt | completion + EOS | right pad]` rows.

    The prompt and the completion are tokenised apart (as PPO samples a response after the prompt's tokens) and EOS
    ends each completion. The response mask of the batch is the completion mask: the only tokens a loss reads.
    A completion longer than `max_completion_tokens` (EOS included) is cut, losing its EOS, with a warning; prompts
    keep their last tokens so that every row fits in `max_length` tokens (see `encode_prompts`).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; give one completion per prompt.")
    limit = min(max_completion_tokens or max_length - 1, max_length - 1)
    token_lists = [ids + [tokenizer.eos_token_id]
                   for ids in tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    too_long = [i for i, ids in enumerate(token_lists) if len(ids) > limit]
    if too_long:
        logger.warning("%d completion(s) longer than %d tokens (EOS included) are cut and end without EOS; first: "
                       "row %d of the batch. Raise max_completion_length to keep them whole.",
                       len(too_long), limit, too_long[0])
        token_lists = [ids[:limit] for ids in token_lists]
    completion_ids = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(ids, dtype=torch.long) for ids in token_lists], batch_first=True,
        padding_value=tokenizer.pad_token_id,
    )
    width = completion_ids.shape[1]
    mask = completion_mask(torch.tensor([len(ids) for ids in token_lists]), width)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_length - width)
    return SequenceBatch(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask.long(), mask], dim=1),
        prompt_width=prompt_ids.shape[1],
    )


def local_or_hub(name: str) -> str:
    """An existing local directory as an absolute path (a saved adapter then finds its base from anywhere), else
    `name` (a hub id)."""
    return os.path.abspath(name) if os.path.isdir(name) else name


class FinetuneTrainer:
    """One model trained by gradient descent on a supervised loss; SFT and reward-model training subclass it.

    Subclasses set `stage` (their command's name) and `full_modules` (modules trained in full beside a LoRA adapter,
    e.g. a new scalar head) and implement `load_model`, `micro_losses` and `samples`.
    """

    stage: str = ""
    full_modules: list[str] | None = None

    def __init__(self, config: FinetuneConfig):
        config.validate()  # again: a field may have been set since construction (see PPOTrainer.__init__)
        self.config = config
        self.backend = select_backend(self.stage)  # how the launch holds and updates the weights
        processes = process_state()
        self.layout = batch_layout(config.batch_size, processes.num_processes, 1, config.micro_batch_size)
        set_seed(config.seed + processes.process_index)  # the weights are the main process's (broadcast below)
        self.device = resolve_device(config.device, processes)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = load_tokenizer(config.model_name)
        model = load_pretrained(self.load_model, local_or_hub(config.model_name), "model_name")
        self.max_length = getattr(model.config, "max_position_embeddings", None) or 2**31
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if config.use_lora:
            model = get_peft_model(model, lora_config(config, self.full_modules))
            fuse_lora_layers(model)
        elif self.backend.can_add_gradients_in_place:
            add_vocabulary_gradients_in_place(model)
        self.model = model.to(self.backend.load_device(self.device)).eval()
        autocast_bodies([self.model], self.device, autocast_dtype(config.mixed_precision, self.device, self.dtype),
                        self.backend.can_store_frozen_weights)
        self.optimizer = self.backend.prepare(
            {"model": self.model}, [], lambda: adamw(
                self.trainable().values(), lr=config.learning_rate, weight_decay=config.weight_decay),
            config.max_grad_norm)
        self.step_count = 0

    # --- what a stage provides -----------------------------------------------------------------------------------

    def load_model(self, name: str) -> PreTrainedModel:
        """Load the stage's model (before any LoRA adapter) from `name`."""
        raise NotImplementedError

    def micro_losses(self, items: list, micro_batch_size: int | None) -> Iterator[tuple[torch.Tensor, dict]]:
        """Yield `(loss, statistics)` per micro-batch of `items`, each weighted by its share of the whole batch, so
        that the losses add up to the batch's loss and the statistics (floats) to the batch's statistics."""
        raise NotImplementedError

    def samples(self, items: list) -> list[dict]:
        """Evaluation samples for samples.jsonl: dicts with at least `prompt` and `completion`."""
        raise NotImplementedError

    # --- the StageTrainer protocol -------------------------------------------------------------------------------

    def trainable(self) -> dict[str, nn.Parameter]:
        """The trained tensors by name: the adapter (and `full_modules`), or every weight in full fine-tuning."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def train_step(self, items: list) -> dict:
        """One optimizer step on a batch of items: micro-batch gradients accumulated, clipped, applied.

        Each process's items give their own mean loss; the step's loss is the mean of those over the processes, so
        each process backpropagates its mean divided by the process count (the backend sums the gradients).
        A loss that is not finite on any process raises `NonFiniteLossError` on every process before the optimizer
        step, with every gradient of the batch dropped.
        """
        self.model.train()  # dropout as configured (off by default); turns gradient checkpointing on
        sums: dict[str, float] = defaultdict(float)
        first_non_finite: float | None = None
        try:
            for loss, stats in self.micro_losses(items, self.config.micro_batch_size):
                if first_non_finite is None and not torch.isfinite(loss):
                    first_non_finite = loss.item()
                # every process runs every backward pass (a sharded one is collective), finite or not
                self.backend.backward(loss / self.layout.processes)
                for name, value in stats.items():
                    sums[name] += value
        finally:
            self.model.eval()
        sums["non_finite"] = float(first_non_finite is not None)
        sums = mean_over_processes(sums)
        if sums.pop("non_finite") > 0:
            self.backend.discard_gradients()
            value = "not finite (on another process)" if first_non_finite is None else first_non_finite
            raise NonFiniteLossError(f"The loss is {value} at step {self.step_count + 1}; no optimizer step was "
                                     "taken. Lower the learning rate or check the data.")
        step = self.backend.step([list(self.trainable().values())])
        if not step.stepped:
            raise NonFiniteLossError(f"The gradient norm is {step.grad_norm} at step {self.step_count + 1}; no "
                                     "optimizer step was taken. Lower the learning rate or check the data.")
        sums["grad_norm"] = step.grad_norm
        self.step_count += 1
        return dict(sums)

    def evaluate(self, items: list) -> tuple[dict[str, float], list[dict]]:
        """The training statistics over all of `items` (prefixed `eval/`) without gradients, and samples."""
        size = self.config.micro_batch_size or self.config.batch_size
        sums: dict[str, float] = defaultdict(float)
        with torch.no_grad(), self.whole_weights():  # processes may hold different numbers of items
            for _, stats in self.micro_losses(items, size):
                for name, value in stats.items():
                    sums[name] += value
            local_samples = self.samples(items[: self.config.max_eval_samples])
        metrics = {f"eval/{name}": value for name, value in mean_over_processes(dict(sums)).items()}
        samples = gather_rows(local_samples)
        return metrics, samples[: self.config.max_eval_samples]

    def whole_weights(self) -> contextlib.AbstractContextManager:
        """Inside, the model holds its whole weights on every process, however the launch holds them."""
        return self.backend.gathered(self.model)

    def save_state(self, directory: Path) -> None:
        """Write the trained tensors and the optimizer state to `directory` (safetensors + JSON). Every process
        calls it (sharded tensors are gathered whole, together); the main process writes."""
        self.backend.save_optimizer(directory)
        with self.whole_weights():
            if PartialState().is_main_process:
                save_trained(self.trainable(), directory)

    def load_state(self, directory: Path) -> None:
        """Load what `save_state` wrote; every trained tensor must be there with its shape."""
        self.backend.load_trained_state(directory, self.trainable())

    def extra_state(self) -> dict:
        """Small state a checkpoint keeps besides weights and optimizer: the step count."""
        return {"step_count": self.step_count}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""
        self.step_count = state["step_count"]

    # --- the stage's output ------------------------------------------------------------------------------------

    def _merged_copy(self) -> PreTrainedModel:
        """A plain transformers model with the adapter merged in; the trainer's own model keeps its adapter.

        The base is loaded again and the adapter (whole inside `whole_weights`, where this runs) merged into it,
        since a sharded model cannot be deep-copied; the trained model's config (e.g. score_offset) goes with it."""
        with tempfile.TemporaryDirectory() as adapter_dir:
            self.model.save_pretrained(adapter_dir, state_dict=self.backend.whole_state_dict(self.model))
            base = self.load_model(local_or_hub(self.config.model_name))
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.config = copy.deepcopy(self.model.config)
        return merged

    def save_final(self, directory: str | Path) -> Path:
        """Write the trained model and its tokenizer to `directory`, for the next stage or plain transformers.

        With LoRA and `merge_lora`, a merged copy is written (the trainer keeps its adapter and can go on training);
        with LoRA alone, the adapter (its config names the base model, so `from_pretrained` on the folder loads both
        when peft is installed); in full fine-tuning, the whole model. Weights are safetensors. A sharded model must
        be inside `whole_weights` (on every process).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.use_lora and self.config.merge_lora:
            merged = self._merged_copy()
            merged.save_pretrained(str(directory))
            del merged
        else:
            self.model.save_pretrained(str(directory), state_dict=self.backend.whole_state_dict(self.model))
        self.tokenizer.save_pretrained(str(directory))
        return directory
