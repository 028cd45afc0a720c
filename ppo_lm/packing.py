"""Padding-free forward passes: a micro-batch's real tokens laid end to end in one row, each sequence attending only
to itself through variable-length FlashAttention.

A rollout's rows are left-padded prompts and right-padded responses; sorting them by prompt length
(`SequenceBatch.micro_batches`) trims most of the padding, but a GPU's default token budget holds a whole minibatch
in one pass, as wide as its longest row. Packed, the pass runs on the real tokens only: PyTorch's
`torch.nn.attention.varlen.varlen_attn` takes the sequences' boundaries (`cu_seq_lens`) and never builds a mask.
On an H200 (bfloat16, TL;DR-length prompts, 37 % of a padded batch's tokens are padding) a forward and backward
pass of 32 such rows through Qwen3-0.6B's shape took 0.67x the padded pass's time at 0.66x its peak memory
(benchmarks/RESULTS.md, session 42). On the CPU there is no such kernel, and a packed row through a dense
block-diagonal mask was slower than sorted micro-batches, so packing is a GPU path.

`pack_layout` is the pure part (where each real token and each response position goes); `models.forward_inputs`
runs a body on it with `PACKED_ATTENTION` as its attention implementation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface

PACKED_ATTENTION = "ppo_lm_varlen"
"""The attention implementation name under which transformers calls `varlen_attention`."""


def varlen_kernel_available() -> bool:
    """Whether this PyTorch has `torch.nn.attention.varlen.varlen_attn` (2.10 and later)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, *, cu_seq_lens_q: torch.Tensor, max_length_q: int,
                     **kwargs: object) -> tuple[torch.Tensor, None]:
    """Causal attention of each packed sequence to itself, for transformers' attention interface.

    `query`, `key`, `value`: `[1, heads, tokens, head_dim]` of one packed row (grouped key/value heads are repeated
    to the query's); `cu_seq_lens_q`: int32 offsets where each sequence starts, then the total; `max_length_q`: the
    longest sequence. Returns `[1, tokens, heads, head_dim]`, as transformers' other attentions do.
    """
    from torch.nn.attention.varlen import varlen_attn

    if query.shape[0] != 1 or attention_mask is not None or sliding_window is not None or dropout:
        raise ValueError("varlen_attention takes one packed row, without a mask, a sliding window or dropout.")
    groups = query.shape[1] // key.shape[1]
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key.repeat_interleave(groups, 1),
                                                           value.repeat_interleave(groups, 1)))
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                      **_causal_argument(varlen_attn))
    return out.unsqueeze(0), None


@functools.cache
def _causal_argument(varlen_attn: Callable) -> dict[str, object]:
    """How this `varlen_attn` is told to attend causally (read once per function, not in every layer's call):
    PyTorch 2.10 and 2.11 take `is_causal=True`; later versions a window that sees no later position."""
    if "is_causal" in inspect.signature(varlen_attn).parameters:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}


AttentionInterface.register(PACKED_ATTENTION, varlen_attention)


@dataclass(frozen=True)
class PackLayout:
    """Where a padded batch's tokens go in one packed row, `[1, tokens]`."""

    real: torch.Tensor
    """Boolean `[rows, width]`: the real tokens, taken row by row in this order (`padded[real]`)."""
    position_ids: torch.Tensor
    """`[1, tokens]`: each token's position within its own sequence (the padded batch's position ids)."""
    cu_seq_lens: torch.Tensor
    """int32 `[rows + 1]`: where each row's sequence starts in the packed row, then the number of tokens."""
    max_length: int
    """The longest sequence's tokens."""
    response_index: torch.Tensor
    """`[rows, response_width]`: the packed position that predicts each response token. Columns past a row's
    response (its right padding) repeat its last response column's: they are masked wherever they are read."""


def pack_layout(attention_mask: torch.Tensor, position_ids: torch.Tensor, prompt_width: int) -> PackLayout:
    """The packed row of a `[left pad | prompt | response | right pad]` batch (see `PackLayout`)."""
    real = attention_mask.bool()
    lengths = real.sum(-1)
    starts = lengths.cumsum(0) - lengths
    prompt_lengths = real[:, :prompt_width].sum(-1)
    response_lengths = lengths - prompt_lengths
    column = torch.arange(attention_mask.shape[1] - prompt_width, device=attention_mask.device)
    column = torch.minimum(column, (response_lengths - 1).clamp(min=0).unsqueeze(-1))
    return PackLayout(
        real=real,
        position_ids=position_ids[real].unsqueeze(0),
        cu_seq_lens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int(),
        max_length=int(lengths.max()),
        response_index=(starts + prompt_lengths - 1).unsqueeze(-1) + column,
    )


@contextlib.contextmanager
def packed_attention(body: nn.Module) -> Iterator[None]:
    """Inside, `body` (a transformers model) attends through `varlen_attention`."""
    config = body.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
