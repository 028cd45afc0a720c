"""An example reward function for TL;DR summaries, for `reward_fn: examples/tldr_reward.py:reward`.

It needs no model: it prefers summaries of 8 to 30 words that end a sentence and share words with the post.
It is easy to game (copying the post's words scores well), which is why real runs use a reward model.
"""

import re

WORD = re.compile(r"[a-z']+")


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Score in about [-1, 2]: word overlap with the post, a length window, a clean ending."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        post_words = set(WORD.findall(prompt.lower()))
        words = WORD.findall(completion.lower())
        overlap = len(set(words) & post_words) / max(len(set(words)), 1)
        length_term = 1.0 if 8 <= len(words) <= 30 else -0.5
        ending = 0.5 if completion.strip().endswith((".", "!", "?")) else 0.0
        scores.append(overlap + length_term + ending - 0.5)
    return scores
