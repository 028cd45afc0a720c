"""rewards.py: the per-token rewards (KL penalty and score), the KL coefficient's controller, and reward functions
(dataset columns as keyword arguments, several functions with weights), by hand."""

import functools

import pytest
import torch

from ppo_lm import KLController, RewardFunctionError, rewards, shape_rewards
from ppo_lm.rewards import WeightedRewards, call_reward_fn, check_reward_columns, load_reward_functions


def test_shape_rewards_puts_kl_on_every_token_and_score_on_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = shape_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-2.25, 0.0, 0.0]]))


def test_adaptive_kl_controller_moves_toward_target_and_fixed_does_not():
    fixed = KLController(0.1)
    fixed.update(kl=100.0, episodes=64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=1000)
    adaptive.update(kl=12.0, episodes=100)  # error clipped to +0.2 -> x(1 + 0.2 * 0.1)
    assert adaptive.value == pytest.approx(0.102)
    adaptive.update(kl=3.0, episodes=100)  # error clipped to -0.2
    assert adaptive.value == pytest.approx(0.102 * 0.98)
    restored = KLController(1.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.state_dict() == adaptive.state_dict()


# Reward functions: dataset columns as keyword arguments, several functions with weights ------------------------


def accuracy(prompts, completions, answer):
    """Reads the `answer` column only."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def length(prompts, completions):
    return [float(len(c)) for c in completions]


def test_call_reward_fn_passes_the_columns_a_function_names():
    columns = {"answer": ["4", "9"], "source": ["gsm", "gsm"]}
    assert call_reward_fn(accuracy, ["2+2=", "3*3="], [" 4", "8"], columns).tolist() == [1.0, 0.0]

    seen = {}

    def everything(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    call_reward_fn(everything, ["a", "b"], ["x", "y"], columns)
    assert seen == columns

    # A two-argument function gets no column and works as before, with or without columns.
    assert call_reward_fn(length, ["a", "b"], ["xyz", ""], columns).tolist() == [3.0, 0.0]
    assert call_reward_fn(length, ["a", "b"], ["xyz", ""]).tolist() == [3.0, 0.0]


def test_columns_reach_keyword_only_parameters_but_never_the_positional_two():
    def keyword_only(prompts, completions, *, answer=None):
        return [float(answer is not None)] * len(completions)

    assert call_reward_fn(keyword_only, ["p"], ["c"], {"answer": ["a"]}).tolist() == [1.0]
    # A column named like the completions parameter must not be passed twice ("multiple values for argument").
    assert call_reward_fn(length, ["p"], ["abc"], {"completions": ["zz"]}).tolist() == [3.0]


def test_a_function_without_a_readable_signature_gets_no_columns(monkeypatch):
    def no_signature(*args, **kwargs):
        return [float(len(kwargs))] * len(args[1])

    monkeypatch.setattr(rewards.inspect, "signature", lambda fn: (_ for _ in ()).throw(ValueError("no signature")))
    assert call_reward_fn(no_signature, ["p"], ["c"], {"answer": ["a"]}).tolist() == [0.0]


def test_a_column_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="Column 'answer' holds 1 values for 2 completions"):
        call_reward_fn(accuracy, ["p", "q"], ["c", "d"], {"answer": ["a"]})


def one_score(prompts, completions):
    return [1.0]


@pytest.mark.parametrize(
    ("reward_fn", "message"),
    [
        (lambda p, c: 1 / 0, "Reward function '<lambda>': reward_fn raised ZeroDivisionError"),
        (accuracy, "Reward function 'accuracy': reward_fn raised TypeError"),  # no answer column given
        (one_score, "Reward function 'one_score': reward_fn returned 1 scores for 2 completions"),
        (lambda p, c: None, "Reward function '<lambda>': reward_fn must return a list of floats"),
    ],
)
def test_errors_name_the_failing_function(reward_fn, message):
    with pytest.raises(RewardFunctionError, match=message):
        call_reward_fn(reward_fn, ["p", "q"], ["c", "d"])


def test_weighted_rewards_sum_and_per_function_scores():
    def half(prompts, completions):
        return [0.5, -1.0]

    def ones(prompts, completions):
        return [1.0, 2.0]

    combined = WeightedRewards([ones, half], weights=[2.0, 0.5])
    scores, per_function = combined(["p", "q"], ["a", "b"])
    # 2 * 1 + 0.5 * 0.5 = 2.25; 2 * 2 + 0.5 * -1 = 3.5
    assert scores.dtype == torch.float32 and scores.tolist() == [2.25, 3.5]
    assert list(per_function) == ["ones", "half"]
    assert per_function["ones"].tolist() == [1.0, 2.0] and per_function["half"].tolist() == [0.5, -1.0]
    assert all(t.dtype == torch.float32 for t in per_function.values())

    # The weighted functions read the columns each one asks for.
    scores, per_function = WeightedRewards([accuracy, length], [1.0, -0.25])(
        ["2+2=", "1+1="], [" 4", "three"], {"answer": ["4", "2"]}
    )
    assert per_function["accuracy"].tolist() == [1.0, 0.0]
    assert scores.tolist() == [1.0 - 0.25 * 2, -0.25 * 5]


def test_one_function_of_weight_one_is_call_reward_fn_bit_for_bit():
    def awkward(prompts, completions):
        return [0.1, 1 / 3, 1e-30, -7.123456789]

    args = (["p"] * 4, ["c"] * 4)
    scores, per_function = WeightedRewards([awkward])(*args)
    expected = call_reward_fn(awkward, *args)
    assert torch.equal(scores, expected) and torch.equal(per_function["awkward"], expected)


def test_weighted_rewards_names_are_unique():
    class Scorer:
        def __call__(self, prompts, completions):
            return [0.0] * len(completions)

    def length_2(prompts, completions):
        return [0.0] * len(completions)

    combined = WeightedRewards([length, length, length_2, functools.partial(length), Scorer(), Scorer()])
    assert combined.names == ["length", "length_2", "length_2_2", "partial", "Scorer", "Scorer_2"]
    assert set(combined(["p"], ["c"])[1]) == set(combined.names)


def test_weighted_rewards_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"2 reward weight\(s\) for 3 reward function\(s\) \['length', 'accuracy', "
                                         r"'length_2'\]; give one weight per function"):
        WeightedRewards([length, accuracy, length], weights=[1.0, 2.0])
    for weight in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="weight of reward function 'accuracy' is .*finite number"):
            WeightedRewards([length, accuracy], weights=[1.0, weight])
    with pytest.raises(ValueError, match="at least one"):
        WeightedRewards([])


def test_a_failing_function_among_several_is_named():
    def broken(prompts, completions):
        return [float("nan")] * len(completions)

    with pytest.raises(RewardFunctionError, match="Reward function 'broken': reward_fn returned nan .*finite"):
        WeightedRewards([length, broken])(["p"], ["c"])


def test_load_reward_functions(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def a(prompts, completions):\n    return [1.0] * len(completions)\n\n"
                    "def b(prompts, completions, **kwargs):\n    return [2.0] * len(completions)\n")
    functions = load_reward_functions([f"{path}:a", f"{path}:b"])
    assert [f.__name__ for f in functions] == ["a", "b"]
    assert [f.__name__ for f in load_reward_functions(f"{path}:b")] == ["b"]
    with pytest.raises(ValueError, match="has no function 'c'"):
        load_reward_functions([f"{path}:a", f"{path}:c"])
    with pytest.raises(ValueError, match="at least one"):
        load_reward_functions([])


def test_check_reward_columns_names_a_parameter_the_data_lacks():
    def needs_answer(prompts, completions, answer, **kwargs):
        return [0.0] * len(completions)

    def optional_hint(prompts, completions, hint=None):
        return [0.0] * len(completions)

    def keyword_only(prompts, completions, *, level):
        return [0.0] * len(completions)

    check_reward_columns([needs_answer, optional_hint], ["answer"], "data.jsonl")  # a default may go unfilled
    check_reward_columns([len], [], "data.jsonl")  # no signature to read: nothing to check
    with pytest.raises(ValueError, match=r"'needs_answer' needs the column\(s\) \['answer'\].*data\.jsonl lacks; its "
                                         r"columns besides the prompt are \['solution'\]"):
        check_reward_columns([optional_hint, needs_answer], ["solution"], "data.jsonl")
    with pytest.raises(ValueError, match=r"'keyword_only' needs the column\(s\) \['level'\]"):
        check_reward_columns([keyword_only], [], "data.jsonl")
