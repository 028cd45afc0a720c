"""Padding-free packed rows against length-sorted micro-batches: the seconds of one forward (and backward) pass.

    uv run python benchmarks/packed_vs_sorted.py --arch small_vocab --budget 3640 [--repeats 2]
    python benchmarks/packed_vs_sorted.py --device cuda --dtype bfloat16 --arch qwen3-0.6b --budget auto \
        --attention sdpa,varlen,flex_attention --batch 32 --repeats 5

The same `--batch` sequences of a PPO step (`ppo-lm bench`'s TL;DR-like prompts of 60 to 400 tokens, 16 response
tokens each) go through the random `--arch` policy these ways:
- `whole`: one left-padded batch, every row as wide as the longest (ppo-lm with `micro_batch_tokens: None`);
- `sorted`: rows sorted by prompt length, packed into micro-batches within `--budget` padded tokens, each trimmed to
  its own width (ppo-lm's default, `SequenceBatch.micro_batches`; `auto` is the budget ppo-lm's default picks on
  the device, the output head's share left out);
- `packed_rows:ATTN`: the sequences laid end to end in rows of at most `--budget` real tokens, no padding, position
  ids restarting at each sequence, attention by ATTN (one of `--attention`): `sdpa` and `flex_attention` are
  transformers' own, which turn those position ids into a block-diagonal causal mask (a dense one for `sdpa`, a
  block-sparse one for `flex_attention`); `varlen` is ppo-lm's packed attention (`ppo_lm.packing.varlen_attention`:
  PyTorch's variable-length FlashAttention, a GPU and 16-bit weights only), each sequence attending to itself;
- `packed_one:ATTN`: every sequence in one row.
Each pass reads the output head at the response positions only, as the update does, and the backward pass starts
from their summed log-probabilities. Prints one JSON line: the padded tokens, the summed log-probability each
way computes (the same up to rounding: the check that packing keeps the sequences apart), the best seconds of each
way and, on a GPU, the peak memory of each way's forward and backward pass.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable

import torch
from timing import seconds_per_call
from transformers import Qwen3ForCausalLM

from ppo_lm.bench import prompt_lengths, qwen3_config
from ppo_lm.generation import SequenceBatch, auto_micro_batch_tokens
from ppo_lm.packing import PACKED_ATTENTION

RESPONSE = 16
DENSE_MASK_TOKENS = 16384
"""`packed_one:sdpa` runs only up to this many tokens: its dense mask and attention grow with their square."""


def padded_batch(lengths: list[int], vocab: int) -> SequenceBatch:
    """Left-padded prompts and right-aligned responses of `RESPONSE` tokens, random token ids."""
    width = max(lengths)
    columns = torch.arange(width + RESPONSE)
    mask = (columns >= width - torch.tensor(lengths).unsqueeze(-1)).long()
    return SequenceBatch(torch.randint(2, vocab, mask.shape) * mask, mask, width)


def response_logprob_sum(model: Qwen3ForCausalLM, input_ids: torch.Tensor, ends: torch.Tensor,
                         **inputs: torch.Tensor) -> torch.Tensor:
    """The summed log-probability of the tokens at the `RESPONSE` positions before each of `ends` (flat column
    indices into `input_ids`' rows, `[rows, sequences]`), with the head run on those positions only."""
    # No cache: transformers reads packed position ids as separate sequences only without one (else one long row
    # would attend across its sequences).
    hidden = model.model(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
    positions = (ends.unsqueeze(-1) - RESPONSE + torch.arange(RESPONSE, device=ends.device)).flatten(1)
    rows = torch.arange(len(input_ids), device=ends.device).unsqueeze(-1)
    logits = model.lm_head(hidden[rows, positions - 1])
    return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[rows, positions].unsqueeze(-1)).sum()


def pack_rows(sequences: list[torch.Tensor], budget: int | None) -> list[list[torch.Tensor]]:
    """`sequences` in order, laid into rows of at most `budget` tokens (one row when `budget` is None)."""
    rows, row = [], []
    for sequence in sequences:
        if row and budget is not None and sum(len(s) for s in row) + len(sequence) > budget:
            rows.append(row)
            row = []
        row.append(sequence)
    return [*rows, row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vocab")
    parser.add_argument("--budget", default="3640", help="Tokens per micro-batch or packed row, or 'auto'.")
    parser.add_argument("--batch", type=int, default=32, help="Sequences in the minibatch.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", default="sdpa", help="Comma-separated attentions of the packed ways.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    device, dtype = torch.device(arguments.device), getattr(torch, arguments.dtype)
    cuda = device.type == "cuda"
    torch.manual_seed(arguments.seed)
    model = Qwen3ForCausalLM(qwen3_config(arguments.arch, attn_implementation="sdpa")).to(device, dtype).eval()
    config = model.config
    if arguments.budget == "auto":
        free = torch.cuda.mem_get_info(device)[0] if cuda else None
        budget = auto_micro_batch_tokens(device.type, free, config.num_hidden_layers, config.hidden_size,
                                         config.vocab_size, dtype.itemsize).tokens
    else:
        budget = int(arguments.budget)
    lengths = prompt_lengths("tldr", arguments.batch, arguments.seed)
    batch = padded_batch(lengths, config.vocab_size)
    groups = batch.micro_batches(torch.arange(len(lengths)), tokens=budget)

    def on_device(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(device) for name, tensor in tensors.items()}

    def padded_pass(micro: SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        width = micro.input_ids.shape[1]
        return torch.tensor([width], device=device).expand(len(micro.input_ids), 1), on_device(dict(
            input_ids=micro.input_ids, attention_mask=micro.attention_mask, position_ids=micro.position_ids))

    real = [batch.input_ids[row, batch.attention_mask[row].bool()] for row in range(len(lengths))]

    def packed_pass(part: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sizes = torch.tensor([len(s) for s in part])
        return sizes.cumsum(0).unsqueeze(0).to(device), on_device(dict(
            input_ids=torch.cat(part).unsqueeze(0), position_ids=torch.cat([torch.arange(n) for n in sizes]
                                                                           ).unsqueeze(0)))

    def run_passes(passes: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], attention: str,
                   grad: bool) -> Callable[[], float]:
        varlen = attention == "varlen"

        def run() -> float:
            config._attn_implementation = PACKED_ATTENTION if varlen else attention
            total = 0.0
            for ends, inputs in passes:
                starts = torch.cat([ends.new_zeros(1), ends[0]]).int()
                sequences = {"cu_seq_lens_q": starts, "max_length_q": int(starts.diff().max())} if varlen else {}
                with torch.set_grad_enabled(grad):
                    loss = response_logprob_sum(model, ends=ends, **inputs, **sequences)
                if grad:
                    loss.backward()
                total += loss.item()  # waits for the device's queued work, so the clock reads it
            return total
        return run

    ways: dict[str, tuple[list, str]] = {
        "whole": ([padded_pass(batch)], "sdpa"),
        "sorted": ([padded_pass(batch.select(index)) for index in groups], "sdpa"),
    }
    rows = pack_rows(real, budget)
    for attention in arguments.attention.split(","):
        ways[f"packed_rows:{attention}"] = ([packed_pass(row) for row in rows], attention)
        ways[f"packed_one:{attention}"] = ([packed_pass(real)], attention)
    total = sum(len(s) for s in real)
    result = {
        "arch": arguments.arch, "device": str(device), "dtype": arguments.dtype, "budget": budget,
        "batch": arguments.batch, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "real_tokens": total,
        "padded_tokens": {"whole": batch.input_ids.numel(),
                          "sorted": sum(batch.select(index).input_ids.numel() for index in groups),
                          "packed": total},
        "passes": {name: len(passes) for name, (passes, _) in ways.items()},
        "logprob_sum": {}, "forward_s": {}, "forward_backward_s": {}, "peak_gib": {}, "errors": {},
    }
    def report(*_: object) -> None:
        reference = result["logprob_sum"].get("whole")
        result["logprob_relative_gap"] = {name: abs(value - reference) / abs(reference)
                                          for name, value in result["logprob_sum"].items()} if reference else {}
        print(json.dumps(result))

    def stop(*_: object) -> None:  # `timeout` ends a long run: print the ways measured so far
        result["errors"]["stopped"] = "SIGTERM before every way ran"
        report()
        sys.exit(124)

    signal.signal(signal.SIGTERM, stop)
    for name, (passes, attention) in ways.items():
        if name == "packed_one:sdpa" and total > DENSE_MASK_TOKENS:
            continue
        try:
            result["logprob_sum"][name] = run_passes(passes, attention, False)()  # also the warm-up (compiles)
            result["forward_s"][name] = round(seconds_per_call(run_passes(passes, attention, False),
                                                               arguments.repeats), 4)
            if name.startswith("packed_one") and not cuda:
                continue  # one row's attention over every token: slow on the CPU and never a candidate there
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            backward = run_passes(passes, attention, True)
            result["forward_backward_s"][name] = round(seconds_per_call(backward, arguments.repeats, warmup=1), 4)
            model.zero_grad(set_to_none=True)
            if cuda:
                result["peak_gib"][name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        except Exception as error:  # one attention missing on this device must not lose the other ways' figures
            result["errors"][name] = f"{type(error).__name__}: {str(error)[:300]}"
    report()


if __name__ == "__main__":
    main()
