"""The attention kernel's cost in float32 and in bfloat16 on this CPU, the choice behind `models.float32_sdpa`.

    uv run python benchmarks/attention_dtype.py

For `small`'s attention shape (8 query heads, 4 key-value heads of 64 dimensions) and a short and a TL;DR-length
sequence, times a forward and backward pass of torch's `scaled_dot_product_attention` as transformers' sdpa calls
it in a padded batch (an explicit boolean mask), with float32 and with bfloat16 operands, and prints one JSON line
per shape: the median milliseconds of each and their ratio, and whether the CPU has AVX-512 BF16 and AMX tiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F


def attention_ms(rows: int, length: int, dtype: torch.dtype, repeats: int) -> float:
    """Median milliseconds of one forward and backward pass of causal, masked grouped-query attention."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(rows, 8, length, 64, generator=generator).to(dtype).requires_grad_()
    key = torch.randn(rows, 4, length, 64, generator=generator).to(dtype).requires_grad_()
    value = torch.randn(rows, 4, length, 64, generator=generator).to(dtype).requires_grad_()
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(rows, 1, length, length)

    def run() -> None:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
        output.sum().backward()

    for _ in range(2):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return 1000 * statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32x48,8x420", help="ROWSxLENGTH,... (sequences x tokens)")
    parser.add_argument("--repeats", type=int, default=10)
    arguments = parser.parse_args()
    for shape in arguments.shapes.split(","):
        rows, length = (int(part) for part in shape.split("x"))
        float32 = attention_ms(rows, length, torch.float32, arguments.repeats)
        bfloat16 = attention_ms(rows, length, torch.bfloat16, arguments.repeats)
        print(json.dumps({
            "rows": rows, "length": length, "float32_ms": round(float32, 2), "bfloat16_ms": round(bfloat16, 2),
            "bfloat16_over_float32": round(bfloat16 / float32, 2),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
            "threads": torch.get_num_threads(),
        }))


if __name__ == "__main__":
    main()
