"""`RewardTrainer`: a pairwise (Bradley-Terry) reward model from preference rows, the second stage of RLHF.

A reward model is a sequence classifier with one output (`AutoModelForSequenceClassification`, num_labels=1). Its
score of prompt + completion is read at the last real token, the EOS that ends the completion, exactly where PPO
reads it (`models.sequence_scores`). Training lowers `-logsigmoid(r_chosen - r_rejected)` over pairs; a model that
starts from a causal LM gets a fresh scalar head, normal with std 1/sqrt(hidden + 1).

Optionally the model is normalised after training: the mean score of a set of reference completions (e.g. the SFT
data's human summaries) becomes `score_offset` in the model's config, which `sequence_scores` subtracts, so that those
completions score 0 on average. HF decoder classifiers have no bias in their head, so the offset cannot live there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from ppo_lm.config import RewardConfig
from ppo_lm.finetune import FinetuneTrainer, encode_completions
from ppo_lm.generation import SequenceBatch
from ppo_lm.models import init_scalar_head, score_head_of, sequence_scores

logger = logging.getLogger(__name__)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss, `-logsigmoid(chosen - rejected)` averaged over pairs: log 2 at a tie, 0 when sure."""
    return -F.logsigmoid(chosen - rejected).mean()


def preference_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (share of pairs with chosen scored above rejected), mean margin and mean scores, as floats."""
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "chosen_score": chosen.mean().item(),
        "rejected_score": rejected.mean().item(),
    }


class RewardTrainer(FinetuneTrainer):
    """Trains a reward model on `{"prompt", "chosen", "rejected"}` items; see `FinetuneTrainer`.

    `train_step(items)` returns `loss`, `accuracy`, `margin`, `chosen_score`, `rejected_score` and `grad_norm`;
    `evaluate(items)` the same (but `grad_norm`) prefixed `eval/`, and pairs with their scores as samples.
    """

    config: RewardConfig
    stage = "reward"
    full_modules = ["score"]  # the scalar head is trained in full beside the LoRA adapter

    def load_model(self, name: str) -> PreTrainedModel:
        """The classifier: a causal LM's body with a new scalar head, or a classifier checkpoint with its own."""
        model, info = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, dtype=self.dtype,
                                                                         output_loading_info=True)
        head = score_head_of(model)
        if any(key.startswith("score.") for key in info["missing_keys"]):
            init_scalar_head(head)
            logger.info("New scalar head on %s (normal, std 1/sqrt(hidden + 1)).", name)
        model.config.pad_token_id = self.tokenizer.pad_token_id  # HF's own forward finds the last token by it
        return model

    def encode(self, prompts: list[str], completions: list[str]) -> SequenceBatch:
        """Prompt + completion + EOS rows as one batch of tensors on the model's device."""
        batch = encode_completions(self.tokenizer, prompts, completions, self.max_length,
                                   self.config.max_completion_length)
        return SequenceBatch(batch.input_ids.to(self.device), batch.attention_mask.to(self.device),
                             batch.prompt_width)

    def micro_losses(self, items: list[dict[str, str]], micro_batch_size: int | None
                     ) -> Iterator[tuple[torch.Tensor, dict[str, float]]]:
        """Pairwise loss and statistics of each micro-batch of pairs (chosen and rejected in one forward pass)."""
        n = len(items)
        prompts = [item["prompt"] for item in items]
        batch = self.encode(prompts * 2, [item["chosen"] for item in items] + [item["rejected"] for item in items])
        for pairs in torch.arange(n, device=self.device).split(micro_batch_size or n):
            micro = batch.select(torch.cat([pairs, pairs + n]))
            self.backend.gather_root_weights(self.model)  # scoring runs the body and the head, not the forward
            chosen, rejected = sequence_scores(self.model, micro.input_ids, micro.attention_mask).chunk(2)
            share = len(pairs) / n
            loss = pairwise_loss(chosen, rejected) * share
            stats = {name: value * share for name, value in preference_statistics(chosen, rejected).items()}
            yield loss, {"loss": loss.item(), **stats}

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Scores of prompt + completion + EOS (the normalised scores once `normalize` ran), `[len(prompts)]`."""
        size = self.config.micro_batch_size or self.config.batch_size
        scores = []
        with torch.no_grad():
            for start in range(0, len(prompts), size):
                batch = self.encode(prompts[start : start + size], completions[start : start + size])
                scores.append(sequence_scores(self.model, batch.input_ids, batch.attention_mask))
        return torch.cat(scores).cpu()

    def samples(self, items: list[dict[str, str]]) -> list[dict]:
        """Each eval pair with both scores: the chosen completion is the sample's completion."""
        if not items:
            return []
        prompts = [item["prompt"] for item in items]
        scores = self.score(prompts * 2, [item["chosen"] for item in items] + [item["rejected"] for item in items])
        chosen, rejected = scores.chunk(2)
        return [{"prompt": item["prompt"], "completion": item["chosen"], "reward": c, "rejected": item["rejected"],
                 "rejected_reward": r}
                for item, c, r in zip(items, chosen.tolist(), rejected.tolist(), strict=True)]

    def normalize(self, reference_items: list[dict[str, str]]) -> float:
        """Shift every score so that the reference completions score 0 on average; return the new `score_offset`.

        The offset goes into the model's config (saved with the final model); `sequence_scores` subtracts it.
        """
        if not reference_items:
            raise ValueError("normalize needs at least one reference prompt/completion row.")
        mean = self.score([item["prompt"] for item in reference_items],
                          [item["completion"] for item in reference_items]).mean().item()
        offset = getattr(self.model.config, "score_offset", 0.0) + mean
        self.model.config.score_offset = offset
        logger.info("Reward model normalised: score_offset %.4f (mean score of %d reference completions).",
                    offset, len(reference_items))
        return offset
