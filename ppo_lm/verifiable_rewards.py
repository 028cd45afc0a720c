"""Reward functions that check a completion's answer against the dataset's `answer` column (verifiable rewards).

Each is a plain `fn(prompts, completions, **columns) -> list[float]` (see `rewards.call_reward_fn`), so a config names
it by dotted path, e.g. `reward_fn: [ppo_lm.verifiable_rewards:math_answer, ppo_lm.verifiable_rewards:answer_format]`.
The ground truth comes from a dataset column named `answer`, one value per completion. Every function scores 1.0 or
0.0 and never raises on what a model writes (an empty, garbled or endless completion scores 0.0).

- `math_answer`: the completion's final answer equals the ground truth as mathematics (0.5 = 1/2 = \\frac{1}{2}),
  decided by Hugging Face's math-verify.
- `answer_format` / `gsm8k_answer_format`: the completion states its answer in the requested form (one `\\boxed{...}`;
  or a closing `#### <number>`).
- `exact_integer`: the last integer in the completion equals the integer answer (for simple arithmetic tasks);
  `number_only`: the completion is a number and nothing else ("Answer with the number only.").

Timeouts and threads: math-verify guards each parse and each comparison with a 5-second `signal.alarm`, which works
only in the main thread. Called from any other thread, `math_answer` runs math-verify without a timeout (the same
scores, but a pathological expression could then take long; math-verify logs once that the timeout is off). In the
main thread the alarm replaces any SIGALRM timer the caller had set.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

from math_verify import parse, verify

logger = logging.getLogger(__name__)

# Seconds math-verify may spend on one parse and on one comparison (its own default); main thread only.
TIMEOUT_SECONDS = 5

# GSM8K marks its final answer with a line `#### 72`; MATH and most chat models with `\boxed{72}`.
HASHES = "####"
BOXED = "\\boxed{"

# An integer or decimal, digits grouped by commas or not; a `-` is its sign unless it follows a word or a bracket
# (then it is a minus: `10-5`, `(3)-5`).
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_GSM8K_ENDING = re.compile(r"####[ \t]*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*\Z")
_NUMBER_ONLY = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?")


def normalize(text: str) -> str:
    """`text` with the Unicode minus sign (U+2212), which math-verify and the number pattern miss, as `-`."""
    return text.replace("\u2212", "-")


def hashes_answer(text: str) -> str | None:
    """The rest of the line after the last `####` in `text`, stripped; None when `text` has no `####`."""
    _, marker, tail = text.rpartition(HASHES)
    if not marker:
        return None
    return tail.split("\n", 1)[0].strip()


def boxed_answers(text: str) -> list[str]:
    """The contents of every complete `\\boxed{...}` in `text`, in order, stripped (nested braces kept whole).

    A box whose braces never close is not complete and is left out.
    """
    answers = []
    start = text.find(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            answers.append(text[start + len(BOXED) : i - 1].strip())
        start = text.find(BOXED, start + len(BOXED))
    return answers


def final_answer_text(text: str) -> str:
    """The part of `text` that holds its final answer: what follows the last `####` if there is one, else all of it.

    So a GSM8K solution ("... <<48/2=24>>24 clips ... #### 72") gives "72", and a completion that closes with
    `#### 48` is read there even when a chatty line with other numbers follows.
    """
    text = normalize(text)
    after_hashes = hashes_answer(text)
    return text if after_hashes is None else after_hashes


def to_integer(value: Any) -> int | None:
    """`value` as an int: an int, an integral float, or a string holding one integer ("1,234", " -7 ", "72.");
    a GSM8K solution gives the integer after its `####`. None for anything else (bool, 3.5, "seven", None)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if not isinstance(value, str):
        return None
    text = final_answer_text(value).strip().rstrip(".").strip()
    match = _NUMBER.fullmatch(text)
    return _number_as_integer(match.group()) if match else None


def last_integer(text: str) -> int | None:
    """The last number written in `text`, as an int; None when there is none or the last one is not whole (3.5).

    Commas that group digits are read as such (1,234 is 1234), a sentence's closing period is not a decimal point,
    and `-` right before the digits (not after a word or bracket) is a sign.
    """
    numbers = _NUMBER.findall(normalize(text))
    return _number_as_integer(numbers[-1]) if numbers else None


def _number_as_integer(number: str) -> int | None:
    """A string `_NUMBER` matched, as an int when it is whole ("12.0" is 12, "12.5" is None)."""
    whole, _, fraction = number.replace(",", "").partition(".")
    if fraction.strip("0"):
        return None
    try:
        return int(whole)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def _parse(text: str, timeout: int | None) -> list:
    """math-verify's parse of `text` (an empty list when it finds nothing or fails)."""
    try:
        return parse(text, parsing_timeout=timeout)
    except Exception:  # parse catches its own errors; this is a last guard so a reward never raises
        logger.debug("math-verify could not parse %r", text[:200], exc_info=True)
        return []


def math_answer(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **kwargs: Any
) -> list[float]:
    """1.0 for each completion whose final answer is mathematically equal to its row's `answer`, else 0.0.

    Both sides go through math-verify: LaTeX (`\\frac{3}{4}`, `$0.5$`), plain numbers (1,234 is 1234) and
    expressions (3/4), and `\\boxed{}`. The ground truth may be a bare answer (str, int or float) or a GSM8K solution
    ending in `#### 72`; a completion with a `####` is read after its last one.

    Which answer counts when a completion states several is math-verify's rule: a `\\boxed{}` answer first, then one
    after "answer is" / "answer:", then any number or expression; among those of one kind, the last in the text
    ("I think it's 7... no wait, 8" answers 8). Two different `\\boxed{}` answers are read as the set of both, which
    equals no single number: hedging scores 0.0. math-verify is lenient with units and percent signs: "8 cm" and
    "8%" both equal 8 (and `8\\%` equals 0.08).

    A completion with no answer, or one math-verify cannot read, scores 0.0, as does a row whose ground truth cannot
    be read (logged as a warning once per call, since that is a data problem).
    """
    # signal.alarm, math-verify's timeout, exists only in the main thread; elsewhere run without one.
    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    golds: dict[str, list] = {}  # num_generations completions share one ground truth: parse it once
    scores, unreadable = [], []
    for completion, truth in zip(completions, answer, strict=True):
        key = "" if truth is None else str(truth)
        if key not in golds:
            golds[key] = _parse(final_answer_text(key), timeout)
        gold = golds[key]
        if not gold:
            unreadable.append(key)
        predicted = _parse(final_answer_text(completion), timeout) if gold and isinstance(completion, str) else []
        try:
            correct = bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)
        except Exception:  # verify catches its own errors; a last guard as in `_parse`
            logger.debug("math-verify could not compare %r", completion[:200], exc_info=True)
            correct = False
        scores.append(1.0 if correct else 0.0)
    if unreadable:
        logger.warning(
            "math_answer: the ground-truth answer of %d of %d rows could not be read (for example %r); they score 0.0.",
            len(unreadable), len(scores), unreadable[0][:200],
        )
    return scores


def answer_format(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 for each completion that gives exactly one answer in `\\boxed{...}` (non-empty, braces closed), else 0.0.

    The default form: what MATH, Qwen's math prompts and math-verify expect. Two boxes count as hedging (0.0).
    """
    return [1.0 if isinstance(c, str) and _one_boxed_answer(c) else 0.0 for c in completions]


def gsm8k_answer_format(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 for each completion that ends with `#### <number>` (GSM8K's form) and has no other `####`, else 0.0.

    The number may carry a sign, comma groups and decimals (`#### -1,234.5`); only whitespace may follow it.
    """
    return [
        1.0 if isinstance(c, str) and c.count(HASHES) == 1 and _GSM8K_ENDING.search(normalize(c)) else 0.0
        for c in completions
    ]


def _one_boxed_answer(text: str) -> bool:
    """Whether `text` holds exactly one `\\boxed{...}` and it is complete and not blank."""
    boxes = boxed_answers(text)
    return len(boxes) == 1 and text.count(BOXED) == 1 and bool(boxes[0])


def exact_integer(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any], **kwargs: Any
) -> list[float]:
    """1.0 for each completion whose last integer (`last_integer`) equals its row's integer `answer`, else 0.0.

    For simple tasks ("What is 7 + 5?") where reading the last number is enough and math-verify's cost is not
    needed. `answer` may be an int or a string ("42", "1,234", or a GSM8K solution ending in `#### 42`); a row whose
    answer is not one integer scores 0.0. A completion whose last number is not whole (3.5) scores 0.0.
    """
    scores = []
    for completion, truth in zip(completions, answer, strict=True):
        expected = to_integer(truth)
        got = last_integer(completion) if isinstance(completion, str) else None
        scores.append(1.0 if expected is not None and got == expected else 0.0)
    return scores


def number_only(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 for each completion that is one number and nothing else (surrounding whitespace and one closing period
    allowed: "14", " 14.", "-3", "1,234"), else 0.0: the form "Answer with the number only." asks for."""
    return [1.0 if isinstance(c, str) and _NUMBER_ONLY.fullmatch(normalize(c).strip()) else 0.0 for c in completions]
