"""Padding-free packed rows against length-sorted micro-batches: the seconds of one forward (and backward) pass.

    uv run python benchmarks/packed_vs_sorted.py --arch small_vocab --budget 3640 [--repeats 2]

The same 32 sequences of a PPO step (`ppo-lm bench`'s TL;DR-like prompts of 60 to 400 tokens, 16 response tokens
each) go through the random `--arch` policy four ways:
- `whole`: one left-padded batch, every row as wide as the longest (ppo-lm with `micro_batch_tokens: None`);
- `sorted`: rows sorted by prompt length, packed into micro-batches within `--budget` padded tokens, each trimmed to
  its own width (ppo-lm's default, `SequenceBatch.micro_batches`);
- `packed_rows`: the sequences laid end to end in rows of at most `--budget` real tokens, no padding, position ids
  restarting at each sequence; transformers turns those position ids into a block-diagonal causal mask;
- `packed_one`: every sequence in one row (forward only: its attention is one sequence of all the tokens).
Each pass reads the output head at the response positions only, as the update does, and the backward pass starts
from their summed log-probabilities. Prints one JSON line: the padded tokens, the summed log-probability each
way computes (the same up to rounding) and the best seconds of each way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from timing import seconds_per_call
from transformers import Qwen3ForCausalLM

from ppo_lm.bench import prompt_lengths, qwen3_config
from ppo_lm.generation import SequenceBatch

RESPONSE = 16


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
    positions = (ends.unsqueeze(-1) - RESPONSE + torch.arange(RESPONSE)).flatten(1)  # [rows, sequences * RESPONSE]
    rows = torch.arange(len(input_ids)).unsqueeze(-1)
    logits = model.lm_head(hidden[rows, positions - 1])
    return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[rows, positions].unsqueeze(-1)).sum()


def timed(run: Callable[[], float], repeats: int) -> float:
    """The best seconds of `repeats` calls, to the millisecond."""
    return round(seconds_per_call(run, repeats), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_vocab")
    parser.add_argument("--budget", type=int, default=3640, help="Tokens per micro-batch or packed row.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    torch.manual_seed(arguments.seed)
    model = Qwen3ForCausalLM(qwen3_config(arguments.arch)).eval()
    lengths = prompt_lengths("tldr", 32, arguments.seed)
    batch = padded_batch(lengths, model.config.vocab_size)
    end = torch.tensor([batch.input_ids.shape[1]])

    def whole(grad: bool) -> float:
        with torch.set_grad_enabled(grad):
            loss = response_logprob_sum(model, batch.input_ids, end.expand(len(lengths), 1),
                                        attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        if grad:
            loss.backward()
        return loss.item()

    groups = batch.micro_batches(torch.arange(len(lengths)), tokens=arguments.budget)

    def sorted_groups(grad: bool) -> float:
        total = 0.0
        for index in groups:
            micro = batch.select(index)
            with torch.set_grad_enabled(grad):
                loss = response_logprob_sum(model, micro.input_ids, torch.tensor([micro.input_ids.shape[1]]).expand(
                    len(index), 1), attention_mask=micro.attention_mask, position_ids=micro.position_ids)
            if grad:
                loss.backward()
            total += loss.item()
        return total

    # Packed rows: the real tokens of consecutive sequences, at most `budget` per row (each row its own pass).
    real = [batch.input_ids[row, batch.attention_mask[row].bool()] for row in range(len(lengths))]
    rows, row = [], []
    for sequence in real:
        if row and sum(len(s) for s in row) + len(sequence) > arguments.budget:
            rows.append(row)
            row = []
        row.append(sequence)
    rows.append(row)

    def packed(parts: list[list[torch.Tensor]], grad: bool) -> float:
        total = 0.0
        for part in parts:
            input_ids = torch.cat(part).unsqueeze(0)
            position_ids = torch.cat([torch.arange(len(s)) for s in part]).unsqueeze(0)
            ends = torch.tensor([len(s) for s in part]).cumsum(0).unsqueeze(0)
            with torch.set_grad_enabled(grad):
                loss = response_logprob_sum(model, input_ids, ends, position_ids=position_ids)
            if grad:
                loss.backward()
            total += loss.item()
        return total

    total = sum(len(s) for s in real)
    result = {
        "arch": arguments.arch, "budget": arguments.budget, "threads": torch.get_num_threads(), "real_tokens": total,
        "padded_tokens": {"whole": batch.input_ids.numel(),
                          "sorted": sum(batch.select(index).input_ids.numel() for index in groups),
                          "packed_rows": total, "packed_one": total},
        # the same numbers every way (a check that packing keeps the sequences apart)
        "logprob_sum": {"whole": whole(False), "sorted": sorted_groups(False), "packed_rows": packed(rows, False),
                        "packed_one": packed([real], False)},
        "passes": {"whole": 1, "sorted": len(groups), "packed_rows": len(rows), "packed_one": 1},
        "forward_s": {"whole": timed(lambda: whole(False), arguments.repeats),
                      "sorted": timed(lambda: sorted_groups(False), arguments.repeats),
                      "packed_rows": timed(lambda: packed(rows, False), arguments.repeats),
                      "packed_one": timed(lambda: packed([real], False), arguments.repeats)},
        "forward_backward_s": {"whole": timed(lambda: whole(True), arguments.repeats),
                               "sorted": timed(lambda: sorted_groups(True), arguments.repeats),
                               "packed_rows": timed(lambda: packed(rows, True), arguments.repeats)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
