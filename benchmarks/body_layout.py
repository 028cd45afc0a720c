"""The body's linear layers in either layout of a frozen weight: `F.linear`'s `[out, in]` (the forward multiplies by
its transpose, the backward pass's input gradient by the weight as it is) and `[in, out]` (the other way round).

    uv run python benchmarks/body_layout.py

For `ppo-lm bench`'s `small` body (hidden 512, MLP 1,024, 8 query and 4 key-value heads of 64) and each number of
rows (tokens of a micro-batch or a decoding step), the best alternated seconds (of 20 calls, per call) over
`--repeats` rounds of the forward product and of the input gradient's product in each layout, and the sum of the
two, with the rates. Prints one JSON line per shape. A frozen weight (LoRA's base layers) could be kept in either
layout; a trained one has its own gradient's product too, which this does not time.
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import best_alternated


def time_shape(out_features: int, in_features: int, rows: int, repeats: int) -> dict[str, float]:
    """One JSON line's figures for a `[out_features, in_features]` weight and `rows` input rows."""
    weight = torch.randn(out_features, in_features) * 0.02
    weight_in_out = weight.T.contiguous()
    inputs, grad = torch.randn(rows, in_features), torch.randn(rows, out_features)
    calls = 20  # products per timed run: each run takes milliseconds, not tens of microseconds

    def times(product):
        return lambda: [product() for _ in range(calls)]

    best = best_alternated({
        "forward_out_in": times(lambda: inputs @ weight.T),
        "forward_in_out": times(lambda: inputs @ weight_in_out),
        "backward_out_in": times(lambda: grad @ weight),
        "backward_in_out": times(lambda: grad @ weight_in_out.T),
    }, repeats)
    best = {name: seconds / calls for name, seconds in best.items()}
    flop = 2 * rows * in_features * out_features
    both_out_in = best["forward_out_in"] + best["backward_out_in"]
    both_in_out = best["forward_in_out"] + best["backward_in_out"]
    return {"out": out_features, "in": in_features, "rows": rows,
            **{f"{name}_ms": round(seconds * 1e3, 3) for name, seconds in best.items()},
            **{f"{name}_tflops": round(flop / seconds / 1e12, 3) for name, seconds in best.items()},
            "forward_speedup": round(best["forward_out_in"] / best["forward_in_out"], 2),
            "forward_and_backward_speedup": round(both_out_in / both_in_out, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1024x512,512x1024,512x512,256x512", help="out x in of each weight.")
    parser.add_argument("--rows", default="32,48,192,576,1024")
    parser.add_argument("--repeats", type=int, default=9)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    for shape in arguments.shapes.split(","):
        out_features, in_features = map(int, shape.split("x"))
        for rows in map(int, arguments.rows.split(",")):
            print(json.dumps(time_shape(out_features, in_features, rows, arguments.repeats)), flush=True)


if __name__ == "__main__":
    main()
