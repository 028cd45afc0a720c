"""What a LoRA linear layer costs on top of its base product: peft's forward (`base(x) + B(A(x)) * scaling`) against
`models.FusedLoraLinear` (the up-projection added to the base output in one `addmm`), forward and backward,
alternated in one process, at the linear shapes of `ppo-lm bench --arch small` (hidden 512, MLP 1024) over 1,536
tokens (32 sequences of 48), rank 16.

    uv run python benchmarks/lora_up_projection.py

Prints, per (tokens, in, out), the best time of the base product alone, of peft's layer and of the fused one over
`--repeats` alternated rounds, and the largest difference between the two layers' outputs and gradients.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from timing import best_alternated
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppo_lm.models import fuse_lora_layers  # noqa: E402


class OneLayer(nn.Module):
    """A model of one linear layer, for peft to put its adapter on."""

    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.proj = nn.Linear(features_in, features_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def forward_backward(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward and backward pass; the output and the gradients of the input and the adapter."""
    for tensor in (x, *model.parameters()):
        tensor.grad = None
    out = model(x)
    out.backward(grad)
    return (out.detach(), x.grad, *(p.grad for p in model.parameters() if p.requires_grad))


def time_shape(features_in: int, features_out: int, tokens: int, rank: int, repeats: int) -> str:
    """One line: the best alternated times of the base product, peft's layer and the fused one at this shape, and
    the largest difference between the two layers' outputs and gradients."""
    peft_layer = get_peft_model(OneLayer(features_in, features_out),
                                LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    nn.init.normal_(peft_layer.base_model.model.proj.lora_B["default"].weight, std=0.01)  # peft starts B at 0
    fused_layer = copy.deepcopy(peft_layer)
    assert fuse_lora_layers(fused_layer) == 1
    base = peft_layer.base_model.model.proj.base_layer
    x = torch.randn(tokens, features_in, requires_grad=True)
    grad = torch.randn(tokens, features_out)
    difference = max((a - b).abs().max().item() for a, b in zip(
        forward_backward(peft_layer, x, grad), forward_backward(fused_layer, x, grad), strict=True))
    best = best_alternated({"base product": lambda: base(x).backward(grad),
                            "peft": lambda: forward_backward(peft_layer, x, grad),
                            "fused": lambda: forward_backward(fused_layer, x, grad)}, repeats)
    return (f"[{tokens}, {features_in}] -> {features_out}, forward and backward: "
            + ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in best.items())
            + f"; largest difference {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    for features_in, features_out in ((512, 1024), (1024, 512), (512, 512)):
        print(time_shape(features_in, features_out, arguments.tokens, arguments.rank, arguments.repeats))


if __name__ == "__main__":
    main()
