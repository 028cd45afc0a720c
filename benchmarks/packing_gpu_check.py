"""Packed passes (`ppo_lm.packing`) against padded ones on a CUDA GPU, with the real variable-length FlashAttention:
how far apart their numbers are, and what each costs in `ppo-lm bench`.

    python benchmarks/packing_gpu_check.py OUT.jsonl

Prints and appends three kinds of JSON lines:
- `forward`: 32 TL;DR-length rows (responses of 1 to 16 tokens) through Qwen3-0.6B's shape with random weights, in
  bfloat16 and float16: the response positions' logprobs (fused head) padded and packed, each against the same
  weights' float32 padded pass, so packing's error sits next to the 16-bit padded path's own;
- `trainer`: one PPO rollout and update on `small` (random policy and reward model, batch 32, LoRA, bfloat16) with
  packed and with padded passes from one seed: the same samples, and the gaps between the rollouts' tensors and the
  updates' statistics;
- `bench`: `ppo-lm bench --arch qwen3-0.6b --use_lora true --prompt_lengths tldr` at its defaults (packing on) and
  with `--pack_sequences off`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM, set_seed

from ppo_lm.bench import BENCH_DEFAULTS, build_model_dirs, prompt_lengths, qwen3_config, synthetic_prompts
from ppo_lm.config import PPOConfig
from ppo_lm.generation import SequenceBatch
from ppo_lm.models import sequence_logprobs


def emit(out: Path, line: dict) -> None:
    print(json.dumps(line), flush=True)
    with out.open("a") as file:
        file.write(json.dumps(line) + "\n")


def rollout_batch(rows: int, vocab: int, device: torch.device) -> SequenceBatch:
    """Left-padded prompts of TL;DR lengths and right-padded responses of 1 to 16 tokens, random ids."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.tensor(prompt_lengths("tldr", rows, 0))
    responses = torch.randint(1, 17, (rows,), generator=generator)
    width = int(prompts.max())
    columns = torch.arange(width + 16)
    mask = (columns >= width - prompts.unsqueeze(-1)) & (columns < width + responses.unsqueeze(-1))
    ids = torch.randint(2, vocab, mask.shape, generator=generator) * mask
    return SequenceBatch(ids.to(device), mask.long().to(device), width)


def forward_gaps(out: Path, device: torch.device) -> None:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(qwen3_config("qwen3-0.6b")).to(device).eval()
    batch = rollout_batch(32, model.config.vocab_size, device)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        reference = sequence_logprobs(model, batch, 1.0, fused_head=True)[0][mask]
        for dtype in (torch.bfloat16, torch.float16):
            model.to(dtype)
            padded, packed = (sequence_logprobs(model, replace(batch, packed=p), 1.0, fused_head=True)[0][mask].float()
                              for p in (False, True))
            emit(out, {"check": "forward", "dtype": str(dtype).removeprefix("torch."), "positions": int(mask.sum()),
                       "max_abs_padded_vs_float32": (padded - reference).abs().max().item(),
                       "max_abs_packed_vs_float32": (packed - reference).abs().max().item(),
                       "max_abs_packed_vs_padded": (packed - padded).abs().max().item(),
                       "mean_abs_padded_vs_float32": (padded - reference).abs().mean().item(),
                       "mean_abs_packed_vs_float32": (packed - reference).abs().mean().item()})
            model.float()


def trainer_gaps(out: Path, directory: Path) -> None:
    from ppo_lm.ppo_trainer import PPOTrainer

    policy, reward = build_model_dirs("small", directory)
    config = PPOConfig(**{**BENCH_DEFAULTS, "model_name": policy, "reward_model_name": reward, "device": "cuda"})
    prompts = synthetic_prompts(prompt_lengths("tldr", config.items_per_step, 0))
    results = {}
    for packed in (True, False):
        set_seed(0)
        trainer = PPOTrainer(config)
        resolved = trainer.models.packed, trainer.models.packing_declined
        trainer.models.packed = packed
        rollout = trainer.make_rollout(prompts)
        stats = trainer.update(rollout)
        results[packed] = (rollout, stats, resolved)
    (fast, fast_stats, resolved), (plain, plain_stats, _) = results[True], results[False]
    mask = plain.batch.response_mask.bool()
    line = {"check": "trainer", "arch": "small", "auto_resolved_packed": resolved[0], "packing_declined": resolved[1],
            "same_samples": bool(torch.equal(fast.batch.input_ids, plain.batch.input_ids))}
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages"):
        a, b = getattr(fast, name), getattr(plain, name)
        if a is not None and b is not None:
            line[f"max_abs_{name}"] = (a[mask].float() - b[mask].float()).abs().max().item()
    for name in ("policy_loss", "value_loss", "approx_kl", "ratio_mean", "grad_norm"):
        line[name] = [fast_stats.get(name), plain_stats.get(name)]
    emit(out, line)


def bench(out: Path) -> None:
    command = [sys.executable, "-m", "ppo_lm", "bench", "--arch", "qwen3-0.6b", "--use_lora", "true",
               "--prompt_lengths", "tldr", "--steps", "3", "--warmup", "1"]
    for extra in ([], ["--pack_sequences", "off"]):
        done = subprocess.run(command + extra, capture_output=True, text=True, timeout=200)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        emit(out, {"check": "bench", "extra": extra, **(json.loads(lines[-1]) if lines else
                                                         {"error": done.stderr[-1500:]})})


def main() -> None:
    out = Path(sys.argv[1])
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(device), flush=True)
    forward_gaps(out, device)
    with tempfile.TemporaryDirectory() as directory:
        trainer_gaps(out, Path(directory))
    torch.cuda.empty_cache()
    bench(out)


if __name__ == "__main__":
    main()
