"""The reasoning demo's generated word problems: seeded, distinct, answered, and held out from training."""

import random

from ppo_lm.word_problems import INSTRUCTION, LARGEST, SMALLEST, train_and_held_out, word_problem, word_problem_rows


def test_a_problem_states_its_numbers_and_its_answer_is_their_sum():
    question, answer = word_problem(random.Random(3))
    numbers = [int(word) for word in question.split() if word.isdigit()]
    assert len(numbers) == 2 and all(SMALLEST <= n <= LARGEST for n in numbers)
    assert answer == sum(numbers) and question.endswith(INSTRUCTION)


def test_rows_are_seeded_distinct_conversations():
    rows = word_problem_rows(50, seed=7)
    assert rows == word_problem_rows(50, seed=7) and rows != word_problem_rows(50, seed=8)
    questions = [row["prompt"][0]["content"] for row in rows]
    assert len(set(questions)) == 50
    assert all(row["prompt"][0]["role"] == "user" and isinstance(row["answer"], int) for row in rows)


def test_held_out_problems_are_never_trained_on_and_the_same_for_every_run():
    train, held_out = train_and_held_out(300, 40, seed=0)
    assert len(train) == 300 and len(held_out) == 40
    asked = {row["prompt"][0]["content"] for row in train}
    assert not asked & {row["prompt"][0]["content"] for row in held_out}
    assert train_and_held_out(10, 40, seed=0)[1] == held_out
    other_train, other_held_out = train_and_held_out(300, 40, seed=1)
    assert other_held_out == held_out and other_train != train  # the seed changes only the training problems
