"""generation.py: the response mask that ends at the stop token; micro-batches sized by rows or by tokens."""

import pytest
import torch

from ppo_lm.generation import (
    AUTO_TOKENS_RANGE,
    SequenceBatch,
    auto_micro_batch_tokens,
    mask_after_stop,
    split_to_count,
    token_budget_groups,
)


def test_mask_after_stop_keeps_the_stop_token_and_nothing_after():
    responses = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8], [9, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(mask_after_stop(responses, stop_token_id=9), expected)


def make_batch(prompt_lengths: list[int], response_lengths: list[int]) -> SequenceBatch:
    """Rows `[left pad | prompt | response | right pad]` with the given real lengths (token ids are the row number)."""
    prompt_width, response_width = max(prompt_lengths), max(response_lengths)
    columns = torch.arange(prompt_width + response_width)
    prompts = torch.tensor(prompt_lengths).unsqueeze(-1)
    responses = torch.tensor(response_lengths).unsqueeze(-1)
    mask = ((columns >= prompt_width - prompts) & (columns < prompt_width + responses)).long()
    input_ids = torch.arange(len(prompt_lengths)).unsqueeze(-1).expand_as(mask).clone()
    return SequenceBatch(input_ids, mask, prompt_width)


def test_token_budget_groups_pack_greedily_by_padded_size():
    # The oversize row (40 + 5) stands alone. Then 2 rows x (10 + 4) = 28 <= 30, a third would make 3 x 14 = 42;
    # 2 rows x (7 + 4) = 22, a third 3 x 11 = 33 > 30; the last row alone.
    assert token_budget_groups([40, 10, 8, 7, 3, 1], [5, 2, 4, 1, 4, 4], budget=30) == [1, 2, 2, 1]
    assert token_budget_groups([5, 5, 5], [1, 1, 1], budget=100) == [3]
    assert token_budget_groups([], [], budget=10) == []


def test_micro_batches_by_tokens_cover_every_row_once_sorted_within_budget():
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 60, (40,), generator=generator).tolist() + [90]  # 90 + a response > the budget
    responses = torch.randint(1, 9, (41,), generator=generator).tolist()
    batch, budget = make_batch(prompts, responses), 96
    index = torch.cat([torch.randperm(40, generator=generator)[:32], torch.tensor([40])])  # a shuffled minibatch
    groups = batch.micro_batches(index, tokens=budget)
    assert sorted(torch.cat(groups).tolist()) == sorted(index.tolist())  # every row of the minibatch, once
    lengths = [prompts[row] for row in torch.cat(groups).tolist()]
    assert lengths == sorted(lengths, reverse=True)  # longest prompt first, through the groups
    for group in groups:
        micro = batch.select(group)
        assert micro.input_ids.numel() <= budget or len(group) == 1
    assert groups[0].tolist() == [40]  # the oversize row, alone
    assert len(groups) > 3


def test_micro_batch_size_wins_and_no_sizing_is_one_group():
    batch = make_batch([5, 3, 9, 1], [2, 2, 2, 2])
    index = torch.arange(4)
    assert [g.tolist() for g in batch.micro_batches(index, size=2, tokens=1)] == [[2, 0], [1, 3]]
    assert [g.tolist() for g in batch.micro_batches(index)] == [[0, 1, 2, 3]]


def test_min_groups_halves_the_largest_groups():
    assert split_to_count([4, 1], 3) == [2, 2, 1]
    assert split_to_count([3, 3], 4) == [2, 1, 2, 1]
    assert split_to_count([2, 1], 1) == [2, 1]
    with pytest.raises(ValueError):
        split_to_count([1, 1], 3)
    batch = make_batch([5, 3, 9, 1], [2, 2, 2, 2])
    groups = batch.micro_batches(torch.arange(4), tokens=1000, min_groups=3)
    assert [g.tolist() for g in groups] == [[2], [0], [1, 3]]


def test_auto_budget_is_memory_over_bytes_per_token_with_the_head_charged_on_response_positions():
    per_token = 17 * 8 * 512 * 4  # small_vocab in float32
    assert auto_micro_batch_tokens("cpu", None, 8, 512, 4096, 4) == (2**30 // per_token, 1 + 4 * 4096 / per_token)
    per_token = 17 * 28 * 1024 * 2  # qwen3-0.6b in bfloat16, 40 GiB free, logits through the model's own forward
    assert auto_micro_batch_tokens("cuda", 40 * 2**30, 28, 1024, 151936, 2, head_copies=3) == (
        10 * 2**30 // per_token, 1 + 3 * 4 * 151936 / per_token)
    assert auto_micro_batch_tokens("cuda", 2**20, 28, 1024, 151936, 2).tokens == AUTO_TOKENS_RANGE[0]
    assert auto_micro_batch_tokens("cuda", 2**50, 2, 64, 100, 4).tokens == AUTO_TOKENS_RANGE[1]
    # a larger model never gets a larger budget; a wider vocabulary makes each response position cost more
    assert auto_micro_batch_tokens("cpu", None, 16, 512, 4096, 4) < auto_micro_batch_tokens("cpu", None, 8, 512,
                                                                                               4096, 4)
    assert (auto_micro_batch_tokens("cpu", None, 8, 512, 151936, 4).response_cost
            > auto_micro_batch_tokens("cpu", None, 8, 512, 4096, 4).response_cost)


def test_response_columns_can_count_for_more_than_one_token():
    # rows of 10 prompt + 4 response tokens: 14 tokens each, or 10 + 4 x 3 = 22 when a response column counts 3
    assert token_budget_groups([10] * 4, [4] * 4, budget=44) == [3, 1]
    assert token_budget_groups([10] * 4, [4] * 4, budget=44, response_cost=3.0) == [2, 2]
