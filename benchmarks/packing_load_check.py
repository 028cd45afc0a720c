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
from dataclasses import replace

import torch
import torch.nn.attention.varlen
import torch.nn.functional as F
from transformers import Qwen3ForCausalLM

from ppo_lm.bench import qwen3_config
from ppo_lm.generation import SequenceBatch
from ppo_lm.models import backbone_of, response_hidden_states


def attention_across_sequences(query, key, value, *args, **kwargs):
    """One causal attention over the whole packed row (query `[tokens, heads, dim]`), blind to its sequences."""
    return F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (query, key, value)),
                                          is_causal=True).transpose(0, 1)


def check_rows() -> SequenceBatch:
    """The load check's two rows: a left-padded prompt, and a response that ended early."""
    input_ids = torch.arange(2, 16).reshape(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 0] = attention_mask[0, -1] = 0
    return SequenceBatch(input_ids, attention_mask, prompt_width=4)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "small", "qwen3-0.6b"])
    arguments = parser.parse_args()
    batch = check_rows()
    response = batch.response_mask.bool()
    torch.nn.attention.varlen.varlen_attn = attention_across_sequences
    for arch in arguments.archs:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(qwen3_config(arch)).eval()
        body = backbone_of(model)
        with torch.no_grad():
            padded = response_hidden_states(body, batch)[response].float()
            across = response_hidden_states(body, replace(batch, packed=True))[response].float()
            model.to(torch.bfloat16)
            bfloat16 = response_hidden_states(body, batch)[response].float()
        print(json.dumps({"arch": arch, "bfloat16_vs_float32": relative(bfloat16, padded),
                          "across_sequences": relative(across, padded)}), flush=True)


if __name__ == "__main__":
    main()
