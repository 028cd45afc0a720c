"""The CPU attention kernel's cost in float32 and in bfloat16, whole and as two halves of its queries: why the
bfloat16 bodies run attention in float32 on a CPU, with AMX tiles or without (`models.float32_sdpa`), and why a
long causal pass is not split.

    uv run python benchmarks/attention_dtype.py --repeats 30

For `small`'s attention shape (8 query heads, 4 key-value heads of 64 dimensions) and short, middling and
TL;DR-length sequences, times a forward and backward pass of transformers' sdpa attention in a padded batch (a
causal boolean mask, as every pass of a `SequenceBatch` has) with float32 and with bfloat16 operands; in float32 as
two calls (the first half of the queries against the first half of the keys, all that a causal mask lets them see;
the second half against all keys); and in float32 with no mask, sdpa's causal flag instead (no mask to read, and
the kernel may leave out the blocks above the diagonal: what a layout that needs no mask could gain). Prints one
JSON line per shape: the median milliseconds of each, the ratios to float32 sdpa, and whether the CPU has AVX-512
BF16 and AMX tiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from timing import seconds_per_call
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def split_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, None]:
    """sdpa under a causal mask as two calls, the first half of the queries against the keys they can see."""
    half = query.shape[2] // 2
    first, _ = sdpa_attention_forward(module, query[:, :, :half], key[:, :, :half], value[:, :, :half],
                                      mask[..., :half, :half], **kwargs)
    second, _ = sdpa_attention_forward(module, query[:, :, half:], key, value, mask[..., half:, :], **kwargs)
    return torch.cat([first, second], dim=1), None


def causal_flag_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, None]:
    """sdpa with no mask and `is_causal`: the causal part of `mask` without the padding part."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def attention_ms(attention: Callable, rows: int, length: int, dtype: torch.dtype, repeats: int) -> float:
    """Median milliseconds of one forward and backward pass of causal, masked grouped-query `attention`."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(rows, 8, length, 64, generator=generator).to(dtype).requires_grad_()
    key = torch.randn(rows, 4, length, 64, generator=generator).to(dtype).requires_grad_()
    value = torch.randn(rows, 4, length, 64, generator=generator).to(dtype).requires_grad_()
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(rows, 1, length, length)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True

    def run() -> None:
        output, _ = attention(module, query, key, value, mask, scaling=0.125)
        output.sum().backward()

    return 1000 * seconds_per_call(run, repeats, statistics.median, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32x48,16x200,12x280,10x340,8x420",
                        help="ROWSxLENGTH,... (sequences x tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    arguments = parser.parse_args()
    for shape in arguments.shapes.split(","):
        rows, length = (int(part) for part in shape.split("x"))
        float32 = attention_ms(sdpa_attention_forward, rows, length, torch.float32, arguments.repeats)
        bfloat16 = attention_ms(sdpa_attention_forward, rows, length, torch.bfloat16, arguments.repeats)
        split = attention_ms(split_sdpa, rows, length, torch.float32, arguments.repeats)
        causal_flag = attention_ms(causal_flag_sdpa, rows, length, torch.float32, arguments.repeats)
        print(json.dumps({
            "rows": rows, "length": length, "float32_ms": round(float32, 2), "bfloat16_ms": round(bfloat16, 2),
            "split_float32_ms": round(split, 2), "bfloat16_over_float32": round(bfloat16 / float32, 2),
            "split_over_float32": round(split / float32, 2), "causal_flag_float32_ms": round(causal_flag, 2),
            "causal_flag_over_float32": round(causal_flag / float32, 2),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
            "threads": torch.get_num_threads(),
        }))


if __name__ == "__main__":
    main()
