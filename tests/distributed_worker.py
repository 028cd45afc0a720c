"""One process of a 2-process launch of test_distributed.py (started by `accelerate launch`, gloo on the CPU).

    distributed_worker.py PLAN_FILE

PLAN_FILE (JSON; the processes wait for it to appear) lists the steps that every process runs, in order:
`["update", CASE_FILE, OUT_FILE]` is one update case (below); `["ppo-lm", ARGUMENT, ...]` runs that `ppo-lm` command
(`ppo_lm.cli.main`), which must succeed unless it is the last step, meant to end the launch (a signal, a failure);
`["copy", RUN_DIR, COPY_DIR, NAME, ...]` copies a run's folder without the entries called NAME (the main process
copies, the others wait), so that a later step can resume the copy while the tests still read the run as it ended;
`["setenv", NAME, VALUE]` sets an environment variable for the steps after it (a reward function that reads one).
Each launch starts its processes and imports torch, transformers and peft anew (about 15 s on 2 CPU cores, most of
a small case's time): so the tests run everything that one accelerate config can run in one launch.

An update case: CASE_FILE (torch.save) holds the PPOConfig fields, the trainable weights to start from and a rollout
made in one process. Each process takes its half of the rollout's rows and runs one `PPOTrainer.update` on it; the
gradients are summed across the processes (all-reduced, or reduce-scattered when an FSDP launch shards the weights).
The main process writes to OUT_FILE the weights after the update (whole), the update's statistics, the rollout
statistics and how far whitening over both halves (or, for a critic-free estimator, its advantages of each half) is
from the whole batch's, and the trainer's checkpoint state to the folder OUT_FILE with the suffix `.state`. Where the
backend can undo a step, a second update then runs and is undone (`Backend.snapshot` and `restore`), and the weights
and optimizer state must be the first update's again.
"""

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState

from ppo_lm import PPOConfig, PPOTrainer
from ppo_lm.advantages import AdvantageInputs, masked_whiten
from ppo_lm.distributed import all_sum, full_tensor, full_tensors, gather_rows, process_state, shard, shard_like
from ppo_lm.rewards import shape_rewards


def rollout_rows(rollout, index: torch.Tensor):
    """The rollout's rows in `index`, padding columns that none of them needs dropped (as the trainer does)."""
    batch = rollout.batch.select(index)
    width = batch.response_mask.shape[1]
    values = {}
    for field in dataclasses.fields(rollout):
        value = getattr(rollout, field.name)
        if field.name == "batch":
            value = batch
        elif field.name == "value_batch" and value is not None:  # the same rows, with the value body's cached prefix
            value = value.select(index)
        elif field.name == "completions":
            value = [value[i] for i in index.tolist()]
        elif field.name == "zero_variance" and value is not None:  # one per group: the groups of these rows
            value = value[torch.unique(index // (len(rollout.completions) // len(value)))]
        elif isinstance(value, torch.Tensor):
            value = value[index, :width] if value.dim() == 2 else value[index]
        values[field.name] = value
    return dataclasses.replace(rollout, **values)


def local_advantages(trainer: PPOTrainer, local) -> torch.Tensor:
    """The configured estimator's advantages of this process's rows, from their scores and KL."""
    cfg, mask = trainer.config, local.batch.response_mask
    kl = torch.zeros(mask.shape) if local.kl is None else local.kl
    rewards = shape_rewards(local.scores, kl, mask, local.kl_coef)
    inputs = AdvantageInputs(rewards, None, mask, local.scores, cfg.gamma, cfg.lam, cfg.num_generations,
                             cfg.scale_rewards, all_sum)
    advantages, _ = trainer.estimator(inputs)
    return advantages


def run_update_case(case_file: str, out_file: str) -> None:
    case = torch.load(case_file, weights_only=False)
    trainer = PPOTrainer(PPOConfig(**case["config"]), reward_fn=lambda prompts, completions: [0.0] * len(prompts))
    processes = PartialState()
    if trainer.backend.name != "deepspeed":
        with torch.no_grad():
            for name, tensor in trainer.models.named_trainable().items():
                tensor.copy_(shard_like(case["weights"][name], tensor))
    else:  # the engine holds its own copy of the weights: check that they start from the same
        with trainer.whole_weights():
            for name, tensor in trainer.models.named_trainable().items():
                assert torch.equal(tensor.detach(), case["weights"][name]), name
    rows = torch.tensor(shard(range(case["rollout"].raw_scores.shape[0]), processes.process_index,
                              processes.num_processes))
    local = rollout_rows(case["rollout"], rows)

    full = case["rollout"]
    if trainer.config.needs_value_model:  # whitening over both halves must equal whitening the whole batch
        whole = masked_whiten(full.returns - full.values, full.batch.response_mask)
        shared = masked_whiten(local.returns - local.values, local.batch.response_mask, all_sum=all_sum)
    else:  # the estimator on each half (whole groups; batch statistics summed over both) must give the whole's
        whole = full.advantages
        shared = local_advantages(trainer, local)
    width = shared.shape[1]
    whitening_error = gather_rows([(shared - whole[rows, :width]).abs().max().item()])
    update_stats = trainer.update(local)
    statistics = local.statistics()  # after the update, as a step takes them (its first pass may give old logprobs)

    def whole_weights() -> dict:
        with trainer.whole_weights():
            return {name: full_tensor(tensor.detach()).clone()
                    for name, tensor in trainer.models.named_trainable().items()}

    def whole_state() -> tuple[dict, dict]:  # (DeepSpeed's engine keeps the optimizer state its own way)
        optimizer = {key: {name: value.clone() for name, value in entry.items()}
                     for key, entry in full_tensors(trainer.optimizer.state_dict())["state"].items()}
        return whole_weights(), optimizer

    weights = whole_weights()
    undone = None
    if trainer.backend.can_roll_back:
        weights, optimizer = whole_state()
        before_second = trainer.backend.snapshot()
        trainer.update(local)
        trainer.backend.restore(before_second)
        weights_again, optimizer_again = whole_state()
        undone = (all(torch.equal(weights[name], weights_again[name]) for name in weights)
                  and optimizer.keys() == optimizer_again.keys()
                  and all(torch.equal(entry[name], optimizer_again[key][name])
                          for key, entry in optimizer.items() for name in entry))
    undone_everywhere = gather_rows([undone])
    # The checkpoint state after the update, written by the main process (every process takes part).
    state_dir = Path(out_file).with_suffix(".state")
    if processes.is_main_process:
        state_dir.mkdir()
    processes.wait_for_everyone()
    trainer.save_state(state_dir)
    if processes.is_main_process:
        torch.save({
            "weights": weights,
            "sharded": trainer.backend.describe()["sharded"],
            "update_stats": update_stats,
            "statistics": statistics,
            "whitening_error": whitening_error,
            "undone": undone_everywhere,
            "processes": processes.num_processes,
            "device": str(trainer.device),
        }, out_file)
    processes.wait_for_everyone()


def skip_deepspeeds_shared_memory_op() -> None:
    """Under a DeepSpeed launch, mark DeepSpeed's shared-memory all-reduce op (`deepspeed_shm_comm`) as unavailable,
    so that its CPU backend does not compile it. DeepSpeed builds that C++ op when it starts on a CPU (cached in
    ~/.cache/torch_extensions, per virtual environment) and uses it only for `inference_all_reduce`, which training
    never calls; the build took about 60 s of a fresh clone's suite (the ZeRO-2 update case: 99 s with an empty
    extensions folder, 37 s with the op already built). The all-reduces the tests check are gloo's either way."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # probed on first access
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def main(plan_file: str) -> None:
    from ppo_lm.cli import main as ppo_lm

    skip_deepspeeds_shared_memory_op()  # while the test prepares the plan
    for kind, *arguments in read_plan(Path(plan_file)):
        if kind == "update":
            run_update_case(*arguments)
        elif kind == "copy":
            copy_run(*arguments)
        elif kind == "setenv":
            os.environ[arguments[0]] = arguments[1]
        elif kind != "ppo-lm":
            raise ValueError(f"unknown step {kind!r} in {plan_file}")
        elif (status := ppo_lm(arguments)) != 0:
            sys.exit(f"ppo-lm {' '.join(arguments)} ended with status {status}")


def read_plan(plan_file: Path, timeout: float = 600) -> list[list[str]]:
    """The plan, once the test has written it: the test starts the launch first, and prepares the update cases
    while these processes import."""
    deadline = time.monotonic() + timeout
    while not plan_file.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no plan at {plan_file} after {timeout} s")
        time.sleep(0.1)
    return json.loads(plan_file.read_text())


def copy_run(run_dir: str, copy_dir: str, *left_out: str) -> None:
    processes = process_state()  # (the first PartialState of a launch sets it up: gloo on the CPU, as ppo-lm's)
    if processes.is_main_process:
        shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns(*left_out))
    processes.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
