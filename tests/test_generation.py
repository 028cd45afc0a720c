"""generation.py: the response mask that ends at the stop token; micro-batches sized by rows or by tokens; the
inverse-CDF sampler and the warpers in front of it; the prompts' prefill in groups of similar length."""

from unittest import mock

import pytest
import torch
from conftest import tiny_qwen3_config
from transformers import DynamicCache, LogitsProcessorList, Qwen3ForCausalLM

from ppo_lm.generation import (
    AUTO_TOKENS_RANGE,
    CPU_PASS_TOKENS,
    SequenceBatch,
    auto_micro_batch_tokens,
    generate_responses,
    greedy_config,
    inverse_cdf_sample,
    mask_after_stop,
    packed_groups,
    prefill_groups,
    prefilled_cache,
    sampling_config,
    sampling_processors,
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


def test_packed_groups_pack_greedily_by_padded_size():
    # The oversize row (40 + 5) stands alone. Then 2 rows x (10 + 4) = 28 <= 30, a third would make 3 x 14 = 42;
    # 2 rows x (7 + 4) = 22, a third 3 x 11 = 33 > 30; the last row alone.
    assert packed_groups([40, 10, 8, 7, 3, 1], [5, 2, 4, 1, 4, 4], budget=30) == [1, 2, 2, 1]
    assert packed_groups([5, 5, 5], [1, 1, 1], budget=100) == [3]
    assert packed_groups([], [], budget=10) == []


def test_token_budget_groups_are_as_few_as_packing_gives_with_the_largest_as_small_as_can_be():
    # Four groups, as packing gives; then the rows after the oversize one as 12 | 2 x (8 + 4) = 24 | 2 x (3 + 4) = 14
    # rather than packing's 28 | 22 | 5: every split of those five rows into three groups has one of 24 or more.
    assert token_budget_groups([40, 10, 8, 7, 3, 1], [5, 2, 4, 1, 4, 4], budget=30) == [1, 1, 2, 2]
    assert token_budget_groups([5, 5, 5], [1, 1, 1], budget=100) == [3]
    assert token_budget_groups([], [], budget=10) == []
    assert token_budget_groups([32] * 32, [16] * 32, budget=1024) == [16, 16]  # not 21 and 11
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        prompts = sorted(torch.randint(1, 80, (30,), generator=generator).tolist(), reverse=True)
        responses = torch.randint(1, 9, (30,), generator=generator).tolist()
        packed, balanced = packed_groups(prompts, responses, 200), token_budget_groups(prompts, responses, 200)
        assert sum(balanced) == 30 and len(balanced) == len(packed)
        packed_sizes, balanced_sizes = (padded_sizes(groups, prompts, responses) for groups in (packed, balanced))
        assert max(balanced_sizes) <= max(packed_sizes) and all(size <= 200 for size in balanced_sizes)


def padded_sizes(groups: list[int], prompts: list[int], responses: list[int]) -> list[int]:
    """Each consecutive group's rows x (its longest prompt + its longest response)."""
    starts = [sum(groups[:i]) for i in range(len(groups))]
    return [n * (max(prompts[a:a + n]) + max(responses[a:a + n])) for a, n in zip(starts, groups, strict=True)]


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


def test_auto_budget_is_memory_over_bytes_per_token_capped_on_the_cpu_with_the_head_charged_on_responses():
    per_token = 17 * 8 * 512 * 4  # small_vocab in float32: 1 GiB would hold 3,855 tokens, the CPU stops at 1,024
    assert auto_micro_batch_tokens("cpu", None, 8, 512, 4096, 4) == (CPU_PASS_TOKENS, 1 + 4 * 4096 / per_token)
    per_token = 17 * 16 * 2048 * 4  # a model whose 1,024 tokens would hold over 1 GiB of activations: 1 GiB decides
    assert auto_micro_batch_tokens("cpu", None, 16, 2048, 4096, 4).tokens == 2**30 // per_token
    per_token = 17 * 28 * 1024 * 2  # qwen3-0.6b in bfloat16, 40 GiB free, logits through the model's own forward
    assert auto_micro_batch_tokens("cuda", 40 * 2**30, 28, 1024, 151936, 2, head_copies=3) == (
        10 * 2**30 // per_token, 1 + 3 * 4 * 151936 / per_token)
    assert auto_micro_batch_tokens("cuda", 2**20, 28, 1024, 151936, 2).tokens == AUTO_TOKENS_RANGE[0]
    assert auto_micro_batch_tokens("cuda", 2**50, 2, 64, 100, 4).tokens == AUTO_TOKENS_RANGE[1]
    # a larger model never gets a larger budget; a wider vocabulary makes each response position cost more
    assert auto_micro_batch_tokens("cpu", None, 16, 2048, 4096, 4) < auto_micro_batch_tokens("cpu", None, 8, 512,
                                                                                                4096, 4)
    assert (auto_micro_batch_tokens("cpu", None, 8, 512, 151936, 4).response_cost
            > auto_micro_batch_tokens("cpu", None, 8, 512, 4096, 4).response_cost)


def test_response_columns_can_count_for_more_than_one_token():
    # rows of 10 prompt + 4 response tokens: 14 tokens each, or 10 + 4 x 3 = 22 when a response column counts 3
    assert packed_groups([10] * 4, [4] * 4, budget=44) == [3, 1]
    assert packed_groups([10] * 4, [4] * 4, budget=44, response_cost=3.0) == [2, 2]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` (normalised here) over the entries expected at least 5 times
    (the rest pooled into one cell), and its degrees of freedom."""
    expected = probs / probs.sum() * counts.sum()
    large = expected >= 5
    observed = torch.cat([counts[large], counts[~large].sum(0, keepdim=True)])
    expected = torch.cat([expected[large], expected[~large].sum(0, keepdim=True)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return statistic, int(keep.sum()) - 1


def assert_fits(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """The counts fit the probabilities: chi-square within 5 standard deviations of its mean, and no draw where the
    probability is 0."""
    statistic, dof = chi_square(counts.double(), probs.double())
    assert statistic < dof + 5 * (2 * dof) ** 0.5, (statistic, dof)
    assert counts[probs == 0].sum() == 0


def test_inverse_cdf_sample_draws_each_index_with_its_probability():
    # One row of weights (not normalised: the sampler divides by the total), with zeros, tiny entries and entries
    # in several 256-wide blocks, over a vocabulary that is not a multiple of the block.
    torch.manual_seed(0)
    weights = torch.rand(700) ** 4 * 3
    weights[::7] = 0.0
    weights[650:] = 0.0  # a trailing run of zeros, as top-k leaves
    weights[300] = 40.0
    draws = torch.cat([inverse_cdf_sample(weights.expand(5000, -1)) for _ in range(8)]).squeeze(1)
    assert_fits(torch.bincount(draws, minlength=700), weights)


def test_inverse_cdf_sample_finds_the_block_and_index_a_uniform_falls_in():
    # The first index whose cumulative sum passes u x total, worked out in float64 here; u at the very ends must
    # skip the leading and trailing zeros.
    weights = torch.zeros(600)
    weights[3], weights[255], weights[256], weights[511], weights[598] = 1.0, 2.0, 3.0, 0.5, 1.5
    uniforms = torch.tensor([0.0, 0.1, 0.125, 0.4, 0.78, 0.95, 1.0 - 2**-53], dtype=torch.float64)[:, None]
    with mock.patch("torch.rand", return_value=uniforms):
        drawn = inverse_cdf_sample(weights.expand(len(uniforms), -1)).squeeze(1).tolist()
    sums = weights.double().cumsum(0)
    expected = [int((sums > u * sums[-1]).nonzero()[0]) for u in uniforms.squeeze(1)]
    assert drawn == expected == [3, 3, 255, 256, 511, 598, 598]


def test_inverse_cdf_sample_refuses_probabilities_that_are_not_finite():
    probs = torch.full((2, 10), 0.1)
    probs[1, 4] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        inverse_cdf_sample(probs)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 50, 0.95), (1.0, 0, 1.0), (1.3, 5, 1.0),
                                                             (1.0, 0, 0.8)])
def test_sampling_processors_warp_the_scores_as_transformers_sampling_does(temperature, top_k, top_p):
    # transformers' own sampled generation reports each step's raw logits and the scores its warpers made of them.
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(
        300, initializer_range=0.5, eos_token_id=299, pad_token_id=299)).eval()
    config = sampling_config(2, temperature, top_k, top_p, stop_token_id=299, pad_token_id=299)
    prompt = torch.randint(0, 299, (4, 6))
    out = model.generate(prompt, generation_config=config, output_scores=True, output_logits=True,
                         return_dict_in_generate=True)
    warpers = LogitsProcessorList(sampling_processors(config)[:-1])  # all but the sampler itself
    for raw, warped in zip(out.logits, out.scores, strict=True):
        torch.testing.assert_close(warpers(prompt, raw.clone()), warped, rtol=0, atol=0)


def test_sampled_responses_follow_the_models_warped_next_token_distribution():
    # A peaked tiny model of 300 tokens: 6,000 one-token samples of one prompt against its softmax after
    # temperature and top-k, which leaves zeros the sampler must never draw.
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(
        300, initializer_range=0.5, eos_token_id=299, pad_token_id=299)).eval()
    config = sampling_config(1, 0.8, 40, 1.0, stop_token_id=299, pad_token_id=299)
    prompt = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1] / 0.8
    probs = torch.where(logits >= logits.topk(40).values[-1], logits.softmax(-1), 0.0)
    rows = 6000
    batch = generate_responses(model, prompt.expand(rows, -1), torch.ones(rows, 4, dtype=torch.long), config,
                               stop_token_id=299, pad_token_id=299)
    assert batch.input_ids.shape == (rows, 5)
    assert_fits(torch.bincount(batch.input_ids[:, -1], minlength=300), probs)


def left_padded(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given token lengths, left-padded with token 1, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids, mask = torch.ones(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(2, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def test_prefill_groups_pack_prompts_of_similar_length_within_the_budget():
    ids, mask = left_padded([5, 17, 9, 1, 12, 17, 3], vocab=50)
    groups = prefill_groups(ids, mask, tokens=34)
    assert sorted(torch.cat(groups).tolist()) == list(range(7))  # every row once
    assert [g.tolist() for g in groups] == [[1, 5], [4, 2], [0, 6, 3]]  # longest first; 2 x 17, 2 x 12, 3 x 5
    assert prefill_groups(ids, mask, tokens=1000)[0].tolist() == [1, 5, 4, 2, 0, 6, 3]


def test_the_prompts_prefilled_in_groups_give_the_whole_batchs_cache_and_responses():
    """Prompts of 1 to 17 tokens read into the KV cache in groups of their own width: at every real position the
    keys and values are those of one pass over the whole padded batch (float32, 1e-5 absolute or 1e-4 relative;
    padding positions hold whatever the mask hides), and generate, greedy or sampled from the same seed, gives the
    same responses from them. The pieces run the body only: the output head has nothing to give the cache."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(300, initializer_range=0.5, eos_token_id=299, pad_token_id=1)).eval()
    ids, mask = left_padded([5, 17, 9, 1, 12, 17, 3], vocab=299)
    groups = prefill_groups(ids, mask, tokens=34)
    with torch.no_grad():
        whole = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                      position_ids=(mask[:, :-1].cumsum(-1) - 1).clamp(min=0), use_cache=True)
        whole_cache = whole["cache"] if "cache" in whole else whole["past_key_values"]
        with mock.patch.object(model.lm_head, "forward", wraps=model.lm_head.forward) as head:
            cache = prefilled_cache(model, ids, mask, groups)
        head.assert_not_called()  # the cache is all the prefill keeps: no logits
    real = mask[:, :-1].bool()
    for mine, theirs in zip(cache.layers, whole_cache.layers, strict=True):
        for name in ("keys", "values"):
            torch.testing.assert_close(getattr(mine, name).transpose(1, 2)[real],
                                       getattr(theirs, name).transpose(1, 2)[real], atol=1e-5, rtol=1e-4)
    for config in (greedy_config(6, 299, 1), sampling_config(6, 1.0, 0, 1.0, stop_token_id=299, pad_token_id=1)):
        batches = []
        for tokens in (None, 34):
            torch.manual_seed(1)
            with mock.patch("ppo_lm.generation.prefilled_cache", wraps=prefilled_cache) as prefill:
                batches.append(generate_responses(model, ids, mask, config, 299, 1, prefill_tokens=tokens))
            assert prefill.call_count == (tokens is not None)
        assert torch.equal(batches[0].input_ids, batches[1].input_ids)
        assert torch.equal(batches[0].attention_mask, batches[1].attention_mask)


@pytest.mark.parametrize("case", ["one group", "sliding window"])
def test_generate_prefills_by_itself_one_group_or_a_cache_that_is_not_plain_keys_and_values(case):
    """One group needs no pieces; a sliding-window cache keeps only its window, so the pieces could not be laid out
    as one cache: both go through `generate`'s own prefill."""
    torch.manual_seed(0)
    window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=0) if case == "sliding window" else {}
    model = Qwen3ForCausalLM(tiny_qwen3_config(300, eos_token_id=299, pad_token_id=1, **window)).eval()
    layers = DynamicCache(config=model.config).layers
    assert any(layer.is_sliding for layer in layers) == (case == "sliding window")
    ids, mask = left_padded([5, 17, 9, 1, 12, 17, 3], vocab=299)
    with mock.patch("ppo_lm.generation.prefilled_cache") as prefill:
        generate_responses(model, ids, mask, greedy_config(2, 299, 1), 299, 1,
                           prefill_tokens=1000 if case == "one group" else 34)
    prefill.assert_not_called()
