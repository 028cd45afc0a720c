"""`SFTTrainer`: supervised fine-tuning of a causal LM on prompt/completion rows, the first stage of RLHF.

Each row becomes `[left pad | prompt | completion + EOS | right pad]` (`finetune.encode_completions`); the loss is
the mean negative log-likelihood of the completion tokens and the EOS that ends them, over every such token of the
batch. Prompt tokens are read, never trained on. The logprobs come from the same function PPO uses
(`models.sequence_logprobs`, temperature 1), so only the completion columns go through the output head, and, as
in PPO, through the fused head (one float32 row of logits per column) where the model allows it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ppo_lm.config import SFTConfig
from ppo_lm.finetune import FinetuneTrainer, encode_completions
from ppo_lm.generation import SequenceBatch, encode_prompts, generate_responses, greedy_config
from ppo_lm.models import fused_head_reproduces_logprobs, sequence_logprobs


def completion_nll(logprobs: torch.Tensor, mask: torch.Tensor, total_tokens: torch.Tensor | int) -> torch.Tensor:
    """Negative log-likelihood of the masked tokens, summed and divided by `total_tokens`.

    With `total_tokens` the number of completion tokens in the whole batch, the values of its micro-batches add up
    to the batch's per-token mean, whatever the split. Unmasked positions (padding) count for nothing.
    """
    return -torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs)).sum() / total_tokens


class SFTTrainer(FinetuneTrainer):
    """Fine-tunes `config.model_name` (LoRA or full) on `{"prompt", "completion"}` items; see `FinetuneTrainer`.

    `train_step(items)` returns `loss` (mean NLL per completion token), `tokens` (completion tokens in the batch)
    and `grad_norm`; `evaluate(items)` returns `eval/loss` and `eval/tokens`, and greedy samples of the eval prompts.
    """

    config: SFTConfig
    stage = "sft"
    fused_head: bool
    """Whether the completion logprobs come through `models.head_token_logprobs` (one float32 row of logits per
    completion position instead of three), checked at start-up against the model's own forward pass."""

    def __init__(self, config: SFTConfig):
        super().__init__(config)
        with self.whole_weights():  # however the launch holds the weights, the probe runs on whole ones
            self.fused_head = fused_head_reproduces_logprobs(self.model)

    def load_model(self, name: str) -> PreTrainedModel:
        """The causal LM to fine-tune."""
        return AutoModelForCausalLM.from_pretrained(name, dtype=self.dtype)

    def encode(self, items: list[dict[str, str]]) -> SequenceBatch:
        """Prompt/completion items as one batch of tensors on the model's device."""
        batch = encode_completions(self.tokenizer, [item["prompt"] for item in items],
                                   [item["completion"] for item in items], self.max_length,
                                   self.config.max_completion_length)
        return SequenceBatch(batch.input_ids.to(self.device), batch.attention_mask.to(self.device),
                             batch.prompt_width)

    def micro_losses(self, items: list[dict[str, str]], micro_batch_size: int | None
                     ) -> Iterator[tuple[torch.Tensor, dict[str, float]]]:
        """The completion NLL of each micro-batch (rows of similar prompt length), as its share of the batch mean."""
        batch = self.encode(items)
        total_tokens = batch.response_mask.sum().clamp(min=1)
        everything = torch.arange(len(items), device=self.device)
        for index in batch.micro_batches(everything, micro_batch_size):
            micro = batch.select(index)
            if self.fused_head:  # the fused pass runs the body and the head directly, not the model's forward
                self.backend.gather_root_weights(self.model)
            logprobs, _ = sequence_logprobs(self.model, micro, temperature=1.0, fused_head=self.fused_head)
            loss = completion_nll(logprobs, micro.response_mask, total_tokens)
            yield loss, {"loss": loss.item(), "tokens": float(micro.response_mask.sum())}

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of `prompts` (without the prompt and the EOS)."""
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.max_length - max_new_tokens)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        batch = generate_responses(self.model, prompt_ids.to(self.device), prompt_mask.to(self.device),
                                   greedy_config(max_new_tokens, eos, pad), eos, pad)
        return self.tokenizer.batch_decode(batch.responses, skip_special_tokens=True)

    def samples(self, items: list[dict[str, str]]) -> list[dict]:
        """Each eval prompt with its greedy completion and the reference completion of the data."""
        if not items or self.config.sample_max_new_tokens == 0:
            return []
        prompts = [item["prompt"] for item in items]
        completions = self.generate(prompts, self.config.sample_max_new_tokens)
        return [{"prompt": item["prompt"], "completion": completion, "reference": item["completion"]}
                for item, completion in zip(items, completions, strict=True)]
