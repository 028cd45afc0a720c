"""Stage 1 of a PPO step: prompts in, sampled responses out, as one batch of tensors.

A `SequenceBatch` is `[left padding | prompt | response | right padding]` in every row. The prompt block has the
same width in all rows, so response token `t` of every row sits in column `prompt_width + t`, and the masks say
which tokens are real. Masks are always explicit: the pad token may equal EOS without confusing anything.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerationMixin

from ppo_lm.packing import PackLayout, pack_layout

logger = logging.getLogger(__name__)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class SequenceBatch:
    """Prompts and responses of a rollout as tensors: `[left pad | prompt | response | right pad]` per row."""

    input_ids: torch.Tensor
    """Token ids, `[batch, prompt_width + response_width]`; padding holds the pad token."""
    attention_mask: torch.Tensor
    """1 on real prompt tokens and on valid response tokens (up to and including the first EOS), else 0."""
    prompt_width: int
    """Width of the (left-padded) prompt block; responses start at this column."""
    prefix_hidden: torch.Tensor | None = None
    """Hidden states entering decoder layer `prefix_layers`, `[batch, length, hidden]`: the output of the frozen
    bottom layers that every role shares, computed once per rollout. None: forward passes start from the tokens."""
    prefix_layers: int = 0
    """How many bottom decoder layers `prefix_hidden` has already been through."""
    packed: bool = False
    """Whether forward passes over it lay its rows' real tokens end to end in one row (`ppo_lm.packing`)."""

    @property
    def responses(self) -> torch.Tensor:
        """Response token ids, `[batch, response_width]`."""
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_mask(self) -> torch.Tensor:
        """1 on valid response tokens, `[batch, response_width]`; a prefix of each row."""
        return self.attention_mask[:, self.prompt_width :]

    @property
    def position_ids(self) -> torch.Tensor:
        """Position of each token among the real tokens of its row."""
        return position_ids_from_mask(self.attention_mask)

    @functools.cached_property
    def pack_layout(self) -> PackLayout:
        """Where its tokens and response positions go in one packed row (`ppo_lm.packing.pack_layout`)."""
        return pack_layout(self.attention_mask, self.position_ids, self.prompt_width)

    def micro_batches(self, index: torch.Tensor, size: int | None = None, tokens: int | None = None,
                      min_groups: int = 1, response_cost: float = 1.0) -> list[torch.Tensor]:
        """Split the rows in `index` into groups of similar prompt length, one forward/backward pass each.

        `size` (rows per group) wins over `tokens` (a budget of padded tokens per group: rows x the group's own
        width once `select` has trimmed its padding, each response column counting `response_cost` tokens, see
        `token_budget_groups`). Neither: one group. With a token
        budget, a group with the most rows is halved until there are at least `min_groups` groups (so that every
        process of a sharded launch runs the same number of passes). Rows sorted by prompt length share their
        padding: a group of short prompts is trimmed to its own width.
        """
        if size is not None:
            if size >= len(index):
                return [index]
            return list(self._by_prompt_length(index)[0].split(size))
        if tokens is None:
            return [index]
        ordered, prompt_lengths = self._by_prompt_length(index)
        response_lengths = self.attention_mask[ordered, self.prompt_width :].sum(-1)
        sizes = token_budget_groups(prompt_lengths.tolist(), response_lengths.tolist(), tokens, response_cost)
        return list(ordered.split(split_to_count(sizes, min_groups)))

    def _by_prompt_length(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `index` from the longest prompt to the shortest (ties keep their order), and those lengths."""
        prompt_lengths = self.attention_mask[index, : self.prompt_width].sum(-1)
        order = torch.argsort(prompt_lengths, descending=True, stable=True)
        return index[order], prompt_lengths[order]

    def select(self, index: torch.Tensor) -> SequenceBatch:
        """The rows in `index`, without the padding columns that none of them needs."""
        input_ids, attention_mask = self.input_ids[index], self.attention_mask[index]
        prompt_columns = attention_mask[:, : self.prompt_width].any(0)
        left = int(prompt_columns.int().argmax())
        right = self.prompt_width + int(attention_mask[:, self.prompt_width :].any(0).sum())
        hidden = None if self.prefix_hidden is None else self.prefix_hidden[index][:, left:right]
        return SequenceBatch(input_ids[:, left:right], attention_mask[:, left:right], self.prompt_width - left,
                             hidden, self.prefix_layers, self.packed)


def token_budget_groups(prompt_lengths: Sequence[int], response_lengths: Sequence[int], budget: int,
                        response_cost: float = 1.0) -> list[int]:
    """Sizes of consecutive groups of rows whose padded size stays within `budget` tokens: as few groups as the
    budget allows, and of those groupings the one whose largest group is smallest.

    Rows come in the order given (sorted by prompt length, longest first, by the caller). A group's padded size is
    its rows x (its longest prompt + `response_cost` x its longest response): the width `SequenceBatch.select`
    leaves, since prompts end and responses start in one column, with each response column counted as
    `response_cost` tokens (more than 1 where the output head's memory at those positions is charged too). The
    number of passes sets the time; the largest pass sets the peak memory, so 32 rows of 48 tokens under a budget
    of 1,024 make passes of 16 and 16 rows rather than 21 and 11. `packed_groups` packs greedily; the smallest
    budget that packs into as few groups as `budget` does is found by bisection (a greedy packing's count only
    grows as its budget shrinks). A row wider than the budget alone gets a group of its own.
    """
    count = len(packed_groups(prompt_lengths, response_lengths, budget, response_cost))
    low, high = 0, budget
    while low < high:
        middle = (low + high) // 2
        if len(packed_groups(prompt_lengths, response_lengths, middle, response_cost)) <= count:
            high = middle
        else:
            low = middle + 1
    return packed_groups(prompt_lengths, response_lengths, high, response_cost)


def packed_groups(prompt_lengths: Sequence[int], response_lengths: Sequence[int], budget: int,
                  response_cost: float = 1.0) -> list[int]:
    """Sizes of consecutive groups of rows packed greedily within `budget` padded tokens (sized as in
    `token_budget_groups`): each row joins the current group while that keeps the group within the budget, else it
    starts the next one; a row wider than the budget alone gets a group of its own. This gives the fewest groups
    any split into consecutive groups can. The loop is over rows (a few hundred at most), never over tokens."""
    sizes: list[int] = []
    rows = widest_prompt = widest_response = 0
    for prompt, response in zip(prompt_lengths, response_lengths, strict=True):
        wider_prompt, wider_response = max(widest_prompt, prompt), max(widest_response, response)
        if rows and (rows + 1) * (wider_prompt + response_cost * wider_response) > budget:
            sizes.append(rows)
            rows, wider_prompt, wider_response = 0, prompt, response
        rows, widest_prompt, widest_response = rows + 1, wider_prompt, wider_response
    if rows:
        sizes.append(rows)
    return sizes


CPU_ACTIVATION_BYTES = 2**30
"""On the CPU, the most activations a pass may hold (1 GiB), for models too large for `CPU_PASS_TOKENS`."""
CPU_PASS_TOKENS = 1024
"""On the CPU, the tokens a pass holds at most (fewer when `CPU_ACTIVATION_BYTES` says so). Beyond a thousand rows a
CPU's matrix products gain little, so a larger pass mostly costs memory and padding. Measured on `small_vocab`
(2-core AVX2, float32, benchmarks/RESULTS.md) against the 3,855 tokens that 1 GiB of activations gave: with
TL;DR-length prompts the step took 0.97x (LoRA) and 0.92x (full fine-tuning) the time at 0.53x and 0.61x the peak
memory; with 32-token prompts, 1.02x and 1.03x the time at 0.85x and 0.93x the memory. 512 tokens saved more memory
(0.65x with 32-token prompts, LoRA) but cost 9 to 13 % of the time with short prompts (smaller products)."""
CUDA_FREE_FRACTION = 0.25
"""On a GPU, the share of the memory left free after the models load that one pass's activations may take: the rest
holds the rollout's tensors, the logits' float32 copies, the allocator's slack and the other role's pass."""
AUTO_TOKENS_RANGE = (256, 65536)
"""The automatic budget is clamped to this range of tokens."""


class TokenBudget(NamedTuple):
    """What sizes token-budget micro-batches: padded tokens per pass, and what a response position counts for."""

    tokens: int
    response_cost: float = 1.0
    """Tokens a response column counts for (`token_budget_groups`): 1 for a budget the user set."""


def auto_micro_batch_tokens(device_type: str, free_bytes: int | None, num_layers: int, hidden_size: int,
                            vocab_size: int, dtype_bytes: int, head_copies: int = 1,
                            autocast_bytes: int = 0) -> TokenBudget:
    """The token budget of a micro-batch that `micro_batch_tokens: auto` picks: memory / bytes per token, with each
    response position also charged the output head's memory there.

    Bytes per token: the activations a decoder layer keeps for the backward pass, about 17 values per hidden unit
    (34 bytes at 2 bytes a value, Korthikanti et al., 2022), over every layer, each value `dtype_bytes` plus
    `autocast_bytes`: a body autocast from float32 keeps most values twice, as they are and as the lower-precision
    copy its products were given (on `small_vocab` with TL;DR-length prompts, bfloat16 autocast on the CPU, the peak
    grew about 0.5 MiB a token of budget: 133 bytes per hidden unit and layer). The output head runs on response
    positions only, where it holds `head_copies` float32 rows of logits each (one through
    `models.head_token_logprobs`, about three through a model's own forward pass and `cross_entropy`): a response
    position costs `1 + head bytes / token bytes` tokens. Memory: on "cuda", a quarter of `free_bytes` (what the GPU
    has free once the models are loaded), for as many tokens as fit; elsewhere 1 GiB, for at most `CPU_PASS_TOKENS`
    tokens. The tokens are clamped to `AUTO_TOKENS_RANGE`. A pure function of its numbers, so the rule can be tested
    without a device.
    """
    per_token = 17 * num_layers * hidden_size * (dtype_bytes + autocast_bytes)
    if device_type == "cuda" and free_bytes:
        tokens = CUDA_FREE_FRACTION * free_bytes // per_token
    else:
        tokens = min(CPU_PASS_TOKENS, CPU_ACTIVATION_BYTES // per_token)
    low, high = AUTO_TOKENS_RANGE
    return TokenBudget(int(min(high, max(low, tokens))), 1 + head_copies * 4 * vocab_size / per_token)


def split_to_count(sizes: Sequence[int], count: int) -> list[int]:
    """`sizes` of consecutive groups, the group with the most rows halved (first such group, larger half first)
    until there are at least `count` groups. Halving keeps every group within the budget it was packed to.

    Raises ValueError when there are fewer rows than `count`.
    """
    sizes = list(sizes)
    if sum(sizes) < count:
        raise ValueError(f"{sum(sizes)} rows cannot make {count} groups.")
    while len(sizes) < count:
        largest = max(range(len(sizes)), key=sizes.__getitem__)
        half = sizes[largest] // 2
        sizes[largest : largest + 1] = [sizes[largest] - half, half]
    return sizes


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise and left-pad prompts to `(input_ids, attention_mask)`.

    Raises ValueError for an empty list or a prompt with no tokens, TypeError for a prompt that is not a string.
    A prompt longer than `max_prompt_tokens` keeps its last `max_prompt_tokens` tokens (the end of a prompt is
    what the response continues) and a warning says how many prompts were cut.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}, not a string: {prompt!r:.80}")
    token_lists = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for i, tokens in enumerate(token_lists):
        if len(tokens) == 0:
            raise ValueError(f"prompts[{i}] has no tokens ({prompts[i]!r}); every prompt needs some text.")
    too_long = [i for i, tokens in enumerate(token_lists) if len(tokens) > max_prompt_tokens]
    if too_long:
        logger.warning(
            "%d prompt(s) longer than %d tokens (the model's context minus max_new_tokens) keep only their last "
            "%d tokens; first cut: prompts[%d].", len(too_long), max_prompt_tokens, max_prompt_tokens, too_long[0]
        )
        token_lists = [tokens[-max_prompt_tokens:] for tokens in token_lists]
    rows = [torch.tensor(tokens, dtype=torch.long) for tokens in token_lists]
    input_ids = torch.nn.utils.rnn.pad_sequence(
        rows, batch_first=True, padding_value=tokenizer.pad_token_id, padding_side="left"
    )
    attention_mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones_like(row) for row in rows], batch_first=True, padding_value=0, padding_side="left"
    )
    return input_ids, attention_mask


def mask_after_stop(responses: torch.Tensor, stop_token_id: int) -> torch.Tensor:
    """1 on each response token up to and including the first stop token, 0 after it (and on nothing before)."""
    is_stop = (responses == stop_token_id).long()
    stops_before = is_stop.cumsum(-1) - is_stop
    return (stops_before == 0).long()


def greedy_config(max_new_tokens: int, stop_token_id: int, pad_token_id: int) -> GenerationConfig:
    """A fresh generation config for greedy decoding (the most likely token at each step)."""
    return GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_token_id, pad_token_id=pad_token_id
    )


def sampling_config(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop_token_id: int, pad_token_id: int
) -> GenerationConfig:
    """A fresh generation config: only these settings shape sampling, never a model's own defaults."""
    return GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=stop_token_id,
        pad_token_id=pad_token_id,
    )


def inverse_cdf_sample(probs: torch.Tensor, block: int = 256) -> torch.Tensor:
    """One index per row of `probs` (`[rows, vocab]`, non-negative, a positive finite total), drawn with
    probability proportional to its entry, as `[rows, 1]`: one uniform per row, found among the cumulative sums.

    `torch.multinomial`, which transformers samples with, draws an exponential variate for every entry instead: on
    a 2-core EPYC that took 94 ms of each decode step for 32 rows of a 151,936-token vocabulary. The sums run in
    float32 within blocks of `block` entries and in float64 across blocks, so that no small probability is lost to
    rounding against a running total near 1: an entry's chance is off by at most the float32 rounding of its
    block's partial sum. An entry of probability 0 is never drawn.
    """
    rows, vocab = probs.shape
    within = F.pad(probs, (0, -vocab % block)).view(rows, -1, block).cumsum_(-1)  # [rows, blocks, block], in the copy
    block_ends = within[:, :, -1].double().cumsum(-1)  # [rows, blocks]
    total = block_ends[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("cannot sample: a row of next-token probabilities is not finite or sums to 0 (the policy's "
                         "logits hold NaN or inf; lower learning_rate, or check the model's weights).")
    target = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * total
    chosen_block = _first_above(block_ends, target)
    offset = target - F.pad(block_ends, (1, 0)).gather(1, chosen_block)  # mass before the target, in its block
    sums = within.gather(1, chosen_block[:, :, None].expand(-1, -1, block)).squeeze(1).double()  # [rows, block]
    return chosen_block * block + _first_above(sums, offset)


def _first_above(sums: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative sum exceeds `target`, or, where rounding puts the target at or past
    the row's total, the last index with a positive entry (the first that reaches the total)."""
    last_positive = torch.searchsorted(sums, sums[:, -1:].contiguous(), right=False)
    return torch.minimum(torch.searchsorted(sums, target, right=True), last_positive)


class InverseCDFSampling(LogitsProcessor):
    """The last logits processor of sampled generation under transformers' greedy decoding: it draws each row's
    next token from `softmax(scores)` with `inverse_cdf_sample`, then leaves every score but that token's at -inf,
    so that greedy decoding picks it. The scores are overwritten in place: `generate` passes its own float32 copy of
    the logits, and one vocabulary-sized tensor less per decode step is less memory to fault in and free."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = inverse_cdf_sample(scores.softmax(-1))
        return scores.fill_(float("-inf")).scatter_(1, tokens, 0.0)


def sampling_processors(config: GenerationConfig) -> LogitsProcessorList:
    """What a sampling `config` (`sampling_config`) does to the next-token scores, as transformers' `generate`
    would apply it (temperature, then top-k, then top-p, each only when it changes something), followed by
    `InverseCDFSampling`: with these processors, greedy decoding samples from the distribution `config` describes."""
    processors = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        processors.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=config.top_p))
    processors.append(InverseCDFSampling())
    return processors


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body (no output head) of a causal LM or classifier, through a peft wrapper if any."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.base_model


def prefill_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: int) -> list[torch.Tensor]:
    """Rows of left-padded prompts in groups of similar length whose padded size stays within `tokens` (longest
    prompts first, as `SequenceBatch.micro_batches` groups a rollout's rows)."""
    prompts = SequenceBatch(prompt_ids, prompt_mask, prompt_width=prompt_ids.shape[1])
    return prompts.micro_batches(torch.arange(len(prompt_ids), device=prompt_ids.device), tokens=tokens)


def _is_plain_dynamic_cache(model: torch.nn.Module) -> bool:
    """Whether the model's decoding cache is a list of plain key/value layers (no sliding window, no linear state)."""
    try:
        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
    except (AttributeError, TypeError, ValueError):
        return False


CACHE_ARGUMENT = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
                  else "past_key_values")
"""What `generate` calls a cache passed in: `past_key_values` until a transformers 5 release renamed it `cache`."""


def prefilled_cache(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, groups: list[torch.Tensor]
) -> DynamicCache:
    """The KV cache of every left-padded prompt but its last token, filled one group of rows at a time.

    Each group runs at its own width (its longest prompt), so short prompts carry none of the long ones' padding,
    and at a size the matrix products run well at; the keys and values are then laid out at the batch's width
    (zeros in the padding, which the attention mask hides) for `generate` to take the last prompt token and
    decode from. A row's keys and values depend only on its own tokens, so this is the whole batch's prefill,
    computed in pieces.
    """
    rows, width = prompt_ids.shape[0], prompt_ids.shape[1] - 1
    body = backbone_of(model)  # the cache only: no output head (151,936 x hidden for Qwen3) over the last positions
    before_last = SequenceBatch(prompt_ids[:, :width], prompt_mask[:, :width], prompt_width=width)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    for index in groups:
        group = before_last.select(index)  # trimmed to the group's own width: its longest prompt's
        if not bool(group.attention_mask.any()):
            continue  # prompts of one token: nothing before their last token
        left = width - group.prompt_width
        output = body(input_ids=group.input_ids, attention_mask=group.attention_mask,
                      position_ids=group.position_ids, use_cache=True)
        cache = output["cache"] if "cache" in output else output["past_key_values"]
        for layer_index, layer in enumerate(cache.layers):
            if len(keys) <= layer_index:
                shape = (rows, layer.keys.shape[1], width, layer.keys.shape[-1])
                keys.append(layer.keys.new_zeros(shape))
                values.append(layer.values.new_zeros((*shape[:3], layer.values.shape[-1])))
            keys[layer_index][index, :, left:] = layer.keys
            values[layer_index][index, :, left:] = layer.values
    return DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))


def generate_responses(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generation_config: GenerationConfig,
    stop_token_id: int,
    pad_token_id: int,
    prefill_tokens: int | None = None,
) -> SequenceBatch:
    """Sample one response per left-padded prompt with the KV cache, cut after the first stop token. A sampling
    config draws its tokens by `sampling_processors` under greedy decoding: the same distribution as transformers'
    own sampling, without its exponential variate per vocabulary entry.

    `prefill_tokens`: when the prompts' padded size is over it, the prompts are read into the cache in groups of
    similar length within it (`prefilled_cache`) rather than in one pass over the whole padded batch; only for a
    model with a plain key/value cache (`generate`'s own prefill otherwise).
    """
    processors = None
    if generation_config.do_sample:
        processors = sampling_processors(generation_config)
        generation_config = greedy_config(generation_config.max_new_tokens, stop_token_id, pad_token_id)
    with torch.no_grad():
        cache = {}
        if prefill_tokens is not None and prompt_ids.shape[1] > 1 and _is_plain_dynamic_cache(model):
            groups = prefill_groups(prompt_ids, prompt_mask, prefill_tokens)
            if len(groups) > 1:
                cache[CACHE_ARGUMENT] = prefilled_cache(model, prompt_ids, prompt_mask, groups)
        sequences = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config,
            logits_processor=processors, **cache,
        )
    width = prompt_ids.shape[1]
    responses = sequences[:, width:]
    response_mask = mask_after_stop(responses, stop_token_id)
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return SequenceBatch(
        input_ids=torch.cat([prompt_ids, responses], dim=1),
        attention_mask=torch.cat([prompt_mask.long(), response_mask], dim=1),
        prompt_width=width,
    )
