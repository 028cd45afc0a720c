"""Answer-checking reward functions: exact scores on completions a small instruct model writes, GSM8K-style ground
truths, malformed text that scores 0.0 without raising, and the functions run through `WeightedRewards` by name."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ppo_lm.rewards import RewardFunctionError, WeightedRewards, call_reward_fn, load_reward_functions
from ppo_lm.verifiable_rewards import (
    answer_format,
    boxed_answers,
    exact_integer,
    final_answer_text,
    gsm8k_answer_format,
    hashes_answer,
    last_integer,
    math_answer,
    number_only,
    to_integer,
)

NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
LONG_REASONING = "We add 3 + 4 = 7 and double it to get 14. " * 500 + "So the answer is \\boxed{14}."
MALFORMED = [
    "",
    "banana",
    "   \n\t  ",
    "\\boxed{}",
    "\\boxed{42",
    "}}}{{{\\frac{",
    "$$$$",
    "\\\\\\",
    "NaN",
    "####",
    "#### ",
    "The answer is 9^{9^{9^{9}}}",
    "\\boxed{\\frac{1}{0}}",
    "1" * 5000,  # more digits than int() converts by default
    "blah " * 5000,
    "\x00\x01\ufffd",
    "🎉" * 100,
]


NO_ANSWER = object()


def score(fn, completion, answer=NO_ANSWER):
    """`fn` on one completion (and its row's answer, when given)."""
    if answer is NO_ANSWER:
        return fn(["prompt"], [completion])[0]
    return fn(["prompt"], [completion], answer=[answer])[0]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is 42.", "42", 1.0),
        ("The answer is 42.", 42, 1.0),
        ("The answer is 42.", "43", 0.0),
        ("So 3/4 of the pizza is left, \\boxed{\\frac{3}{4}}", "\\frac{3}{4}", 1.0),
        ("So 3/4 of the pizza is left, \\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("So 3/4 of the pizza is left, \\boxed{\\frac{3}{4}}", "\\frac{1}{4}", 0.0),
        ("Let me compute: 12 * 4 = 48. #### 48", "48", 1.0),
        ("Let me compute: 12 * 4 = 48. #### 48", "#### 48", 1.0),
        ("Let me compute: 12 * 4 = 48. #### 48", "12", 0.0),
        # The `####` line is the answer even when chat with other numbers follows it.
        ("#### 48\n\nHope this helps with your 3 questions!", "48", 1.0),
        ("#### 48\n\nHope this helps with your 3 questions!", "3", 0.0),
        ("The total is 1,234 dollars.", "1234", 1.0),
        ("x = \u22125", "-5", 1.0),  # the Unicode minus sign
        ("The answer is -5.", "5", 0.0),
        ("La réponse est 42 ✓ — voilà 🎉", "42", 1.0),
        ("答案是 42。", "42", 1.0),
        (LONG_REASONING, "14", 1.0),
        (LONG_REASONING, "7", 0.0),
        ("Natalia sold 24 clips in May, so 48 + 24 = 72 clips in all. The answer is 72.", NATALIA, 1.0),
        ("The answer is 24.", NATALIA, 0.0),
        ("The answer is 72.", "\\boxed{72}", 1.0),
        # math-verify's leniency with units and percent signs (documented in math_answer).
        ("The rope is 8 cm long.", "8", 1.0),
        ("\\boxed{8\\%}", "0.08", 1.0),
    ],
)
def test_math_answer_scores_realistic_completions(completion, answer, expected):
    assert score(math_answer, completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        # The last answer counts when the model changes its mind...
        ("I think it's 7... no wait, 8", "8", 1.0),
        ("I think it's 7... no wait, 8", "7", 0.0),
        # ...but one after "answer is" beats a loose number that comes later (math-verify's order),
        ("The answer is 7. Hmm, actually it is 8.", "7", 1.0),
        ("The answer is 7. Hmm, actually it is 8.", "8", 0.0),
        # and a boxed answer beats both.
        ("The final answer is 7. \\boxed{8}", "8", 1.0),
        ("\\boxed{8}. Earlier I said the answer is 7.", "8", 1.0),
        # Two boxed answers are read as the set {7, 8}, which equals neither: hedging scores nothing.
        ("\\boxed{7} or maybe \\boxed{8}", "7", 0.0),
        ("\\boxed{7} or maybe \\boxed{8}", "8", 0.0),
    ],
)
def test_math_answer_reads_the_final_of_several_answers(completion, answer, expected):
    assert score(math_answer, completion, answer) == expected


HALF = [
    "0.5", "1/2", "\\frac{1}{2}", "$\\frac{1}{2}$", "\\boxed{0.5}", "The answer is \\boxed{\\frac{1}{2}}.", "#### 0.5",
]


@pytest.mark.parametrize("truth", ["0.5", "1/2", "\\frac{1}{2}", 0.5, "Half of 1 is 1/2.\n#### 0.5"])
def test_math_answer_equal_forms_of_one_half(truth):
    others = ["0.51", "\\frac{2}{3}", "2", "\\boxed{1/3}"]
    scores = math_answer(["p"] * 11, HALF + others, [truth] * 11)
    assert scores == [1.0] * len(HALF) + [0.0] * len(others)


@pytest.mark.parametrize("completion", MALFORMED)
def test_math_answer_scores_malformed_completions_zero(completion):
    assert score(math_answer, completion, "1") == 0.0


def test_math_answer_scores_unreadable_ground_truths_zero_and_warns(caplog):
    completions = ["The answer is 42."] * 4
    with caplog.at_level(logging.WARNING, logger="ppo_lm.verifiable_rewards"):
        scores = math_answer(["p"] * 4, completions, answer=[None, "", "banana", "42"])
    assert scores == [0.0, 0.0, 0.0, 1.0]
    assert "the ground-truth answer of 3 of 4 rows could not be read" in caplog.text


def test_math_answer_groups_share_one_ground_truth():
    """`num_generations` completions per prompt arrive with the prompt's answer repeated."""
    completions = ["#### 72", "The answer is 72.", "#### 24", "", "\\boxed{5}", "\\boxed{5.0}"]
    answers = [NATALIA] * 4 + ["5"] * 2
    assert math_answer(["p"] * 6, completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_math_answer_runs_in_other_threads_and_leaves_no_alarm():
    """math-verify's signal.alarm timeout raises outside the main thread; math_answer then runs without one."""
    completions = ["The answer is 42.", "\\boxed{\\frac{3}{4}}", "banana", "#### 48", "I think it's 7... no wait, 8"]
    answers = ["42", "0.75", "1", "48", "7"]
    expected = [1.0, 1.0, 0.0, 1.0, 0.0]
    handler = signal.getsignal(signal.SIGALRM)
    assert math_answer(["p"] * 5, completions, answers) == expected
    assert signal.alarm(0) == 0  # no alarm left pending
    assert signal.getsignal(signal.SIGALRM) is handler
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: math_answer(["p"] * 5, completions, answers), range(2)))
    assert results == [expected, expected]
    thread = threading.Thread(target=lambda: results.append(math_answer(["p"], ["#### 48"], ["48"])))
    thread.start()
    thread.join()
    assert results[-1] == [1.0]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("\\boxed{42}", 1.0),
        ("So 3/4 of the pizza is left, \\boxed{\\frac{3}{4}}", 1.0),
        ("The answer is $\\boxed{72}$ clips.", 1.0),
        ("\\boxed{}", 0.0),
        ("\\boxed{  }", 0.0),
        ("\\boxed{42", 0.0),
        ("\\boxed{7} or maybe \\boxed{8}", 0.0),
        ("The answer is 42.", 0.0),
        ("#### 42", 0.0),
        ("", 0.0),
        ("banana", 0.0),
    ],
)
def test_answer_format_wants_one_boxed_answer(completion, expected):
    assert score(answer_format, completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Let me compute: 12 * 4 = 48. #### 48", 1.0),
        ("12 * 4 = 48\n#### 48\n", 1.0),
        ("#### 1,234", 1.0),
        ("#### -3.5", 1.0),
        ("#### \u22123", 1.0),
        ("#### 48\n\nHope this helps!", 0.0),
        ("#### 7\n#### 8", 0.0),
        ("#### 48.", 0.0),
        ("####", 0.0),
        ("#### forty-eight", 0.0),
        ("\\boxed{48}", 0.0),
        ("The answer is 48.", 0.0),
        ("", 0.0),
    ],
)
def test_gsm8k_answer_format_wants_a_closing_hashes_number(completion, expected):
    assert score(gsm8k_answer_format, completion) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is 42.", 42, 1.0),
        ("The answer is 42.", "42", 1.0),
        ("The answer is 42.", " 42 ", 1.0),
        ("The answer is 42.", 43, 0.0),
        ("There are 1,234 apples.", "1234", 1.0),
        ("There are 1,234 apples.", 1234, 1.0),
        ("1234", "1,234", 1.0),
        ("1,2,3", 3, 1.0),  # a list, not a number with comma groups
        ("It is -7.", -7, 1.0),
        ("It is -7.", 7, 0.0),
        ("x = \u22127", "-7", 1.0),
        ("10-5", 5, 1.0),  # after a digit, `-` is a minus, not a sign
        ("(3)-5", 5, 1.0),
        ("I think it's 7... no wait, 8", 8, 1.0),
        ("I think it's 7... no wait, 8", 7, 0.0),
        ("The result is 42.0", 42, 1.0),
        ("The result is 3.5", 3, 0.0),  # the last number is not whole
        ("The result is 3.5", 5, 0.0),
        ("Natalia sold 72 clips.", NATALIA, 1.0),
        ("Natalia sold 72 clips.", 72.0, 1.0),
        ("Natalia sold 72 clips.", "seventy-two", 0.0),
        ("Natalia sold 72 clips.", None, 0.0),
        ("Natalia sold 72 clips.", True, 0.0),
        ("Natalia sold 72 clips.", "72.5", 0.0),
    ],
)
def test_exact_integer(completion, answer, expected):
    assert score(exact_integer, completion, answer) == expected


@pytest.mark.parametrize("completion", MALFORMED)
def test_exact_integer_scores_malformed_completions_zero(completion):
    assert score(exact_integer, completion, 5) == 0.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("14", 1.0), (" 14.", 1.0), ("14\n", 1.0), ("-3", 1.0), ("\u22123", 1.0), ("1,234", 1.0), ("2.5", 1.0),
        ("The answer is 14.", 0.0), ("14 apples", 0.0), ("7 + 7 = 14", 0.0), ("14.\n\nHope this helps!", 0.0),
        ("14 or 15", 0.0), ("fourteen", 0.0), ("", 0.0), ("   ", 0.0), (".", 0.0), ("14..", 0.0), ("#### 14", 0.0),
        ("\\boxed{14}", 0.0), ("1,23", 0.0), ("--14", 0.0),
    ],
)
def test_number_only_wants_the_number_and_nothing_else(completion, expected):
    assert score(number_only, completion) == expected


def test_answer_extraction_helpers():
    assert hashes_answer(NATALIA) == "72"
    assert hashes_answer("#### 48\n\nThanks!") == "48"
    assert hashes_answer("#### 1\n#### 2") == "2"
    assert hashes_answer("no marker") is None
    assert hashes_answer("####") == ""
    assert final_answer_text(NATALIA) == "72"
    assert final_answer_text("x = \u22125") == "x = -5"
    assert boxed_answers("a \\boxed{\\frac{3}{4}} b \\boxed{ 7 } c \\boxed{8") == ["\\frac{3}{4}", "7"]
    assert boxed_answers("nothing here") == []
    assert last_integer("12 * 4 = 48.") == 48
    assert last_integer("from -3 to 1,234,567.") == 1234567
    assert last_integer("no numbers") is None
    assert last_integer("9" * 5000) is None
    assert to_integer("#### 1,234") == 1234
    assert to_integer("72.") == 72
    assert to_integer(False) is None
    assert to_integer(1.5) is None
    assert to_integer("3 apples") is None


def test_through_weighted_rewards_by_dotted_name():
    functions = load_reward_functions([
        "ppo_lm.verifiable_rewards:math_answer",
        "ppo_lm.verifiable_rewards:answer_format",
        "ppo_lm.verifiable_rewards:exact_integer",
        "ppo_lm.verifiable_rewards:gsm8k_answer_format",
    ])
    assert functions == [math_answer, answer_format, exact_integer, gsm8k_answer_format]
    rewards = WeightedRewards(functions, weights=[1.0, 0.25, 0.5, 0.125])
    prompts = ["Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?"] * 4
    prompts += ["What is 0.25 + 0.25?"] * 2
    completions = [
        "She sold 48 / 2 = 24 in May, so 48 + 24 = \\boxed{72}.",
        "48 + 24 = 72\n#### 72",
        "I think it's 24.",
        "",
        "0.25 + 0.25 = \\boxed{\\frac{1}{2}}",
        "The answer is 0.5",
    ]
    columns = {"answer": [NATALIA] * 4 + ["0.5"] * 2, "question_id": [7, 7, 7, 7, 8, 8]}
    scores, per_function = rewards(prompts, completions, columns)
    assert rewards.names == ["math_answer", "answer_format", "exact_integer", "gsm8k_answer_format"]
    assert per_function["math_answer"].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert per_function["answer_format"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert per_function["exact_integer"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert per_function["gsm8k_answer_format"].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert scores.tolist() == [1.75, 1.625, 0.0, 0.0, 1.25, 1.0]
    # Without the `answer` column the functions that need it fail loudly, naming themselves.
    with pytest.raises(RewardFunctionError, match="math_answer"):
        call_reward_fn(math_answer, prompts, completions, {"question_id": columns["question_id"]})
