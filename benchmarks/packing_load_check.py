"""The margin of the load check that decides whether a body packs (`ppo_lm.models.packing_reproduces_forward`).

    python benchmarks/packing_load_check.py [--archs tiny small qwen3-0.6b]

The check runs two short rows padded and packed and accepts packing when the final hidden states at the response
positions differ by at most a fraction of their norm. For each shape (random weights) this prints, on that check's
two rows, the two distances the fraction must separate:
- `bfloat16_vs_float32`: the padded pass in bfloat16 against the same weights in float32 (the size of the rounding
  that a second bfloat16 attention kernel, as FlashAttention on a GPU, adds);
- `across_sequences`: a packed pass whose attention lets each token see the other sequence too (a kernel that
  ignores the sequence boundaries), against the padded pass, in float32.
Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.attention.varlen
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM

from ppo_lm.bench import qwen3_config
from ppo_lm.generation import backbone_of
from ppo_lm.models import packed_hidden_state_gap, packing_check_rows, response_hidden_states


def attention_across_sequences(query, key, value, *args, **kwargs):
    """One causal attention over the whole packed row (query `[tokens, heads, dim]`), blind to its sequences."""
    return F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (query, key, value)),
                                          is_causal=True).transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "small", "qwen3-0.6b"])
    arguments = parser.parse_args()
    batch = packing_check_rows(torch.device("cpu"))
    response = batch.response_mask.bool()
    torch.nn.attention.varlen.varlen_attn = attention_across_sequences
    for arch in arguments.archs:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(qwen3_config(arch)).eval()
        body = backbone_of(model)
        across = packed_hidden_state_gap(body)
        with torch.no_grad():
            padded = response_hidden_states(body, batch)[response].float()
            model.to(torch.bfloat16)
            bfloat16 = response_hidden_states(body, batch)[response].float()
        print(json.dumps({"arch": arch, "bfloat16_vs_float32": ((bfloat16 - padded).norm() / padded.norm()).item(),
                          "across_sequences": across}), flush=True)


if __name__ == "__main__":
    main()
