"""Data parallelism over the processes that `accelerate launch` (or torchrun) starts: the collectives and the batch
arithmetic every launch shares.

Every process starts from the same weights (the main process's are broadcast once, after loading). Each process
generates, scores and differentiates its own share of the batch. Numbers that decide something (advantage
whitening, the KL controller, early stopping on the approximate KL) and the logged means are computed over every
process's rows. Only the main process writes logs, reports and checkpoints.

How the weights themselves are held (replicated, FSDP2, DeepSpeed ZeRO) is the backend's business
(`ppo_lm/backend.py`); this module only sums, gathers and broadcasts, and makes sharded tensors whole or cuts whole
ones like them. With one process every function here is the plain local computation: no collective call is made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, broadcast_object_list, gather_object, reduce
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")


def process_state() -> PartialState:
    """accelerate's view of this run's processes: one process unless started by `accelerate launch` or torchrun.

    Without CUDA the processes talk over gloo on the CPU.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded tensor (every process must call this, in the same order); `tensor` itself
    when it is not sharded."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(state: Any) -> Any:
    """`state` (nested dicts and lists, e.g. an optimizer's state_dict) with every sharded tensor made whole."""
    if isinstance(state, dict):
        return {key: full_tensors(value) for key, value in state.items()}
    if isinstance(state, list):
        return [full_tensors(value) for value in state]
    return full_tensor(state) if isinstance(state, torch.Tensor) else state


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) cut the way `like` is sharded: this process's shard as a DTensor; `value` itself
    when `like` is not sharded. Every process holds the whole `value`, so nothing is communicated."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state_dict of whole tensors (as `full_tensors` saved it) cut like the optimizer's parameters,
    ready for `optimizer.load_state_dict`."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    per_parameter = {
        index: {name: shard_like(value, parameters[int(index)])
                if isinstance(value, torch.Tensor) and value.shape == parameters[int(index)].shape else value
                for name, value in moments.items()}
        for index, moments in state["state"].items()
    }
    return {**state, "state": per_parameter}


@dataclass(frozen=True)
class BatchLayout:
    """How one PPO step's rollouts split over processes, minibatches and micro-batches.

    global batch = per-process batch x processes, and each process's minibatch runs as `accumulation` micro-batches
    (gradient accumulation) before the all-reduce and the optimizer step.
    """

    global_batch: int
    """Rollouts per PPO step over all processes (`batch_size`)."""
    processes: int
    """Processes sharing the step."""
    per_process: int
    """Rollouts each process generates and trains on."""
    mini_batches: int
    """Optimizer steps per PPO epoch (`num_mini_batches`)."""
    per_process_minibatch: int
    """Rows of a minibatch on one process."""
    accumulation: int
    """Micro-batches per process per optimizer step (1 without `micro_batch_size`)."""

    def describe(self) -> str:
        """One line for the log."""
        return (f"batch {self.global_batch} = {self.per_process} per process x {self.processes} processes; "
                f"{self.mini_batches} minibatch(es) of {self.per_process_minibatch} rows per process, "
                f"{self.accumulation} micro-batch(es) each")


def batch_layout(batch_size: int, processes: int, num_mini_batches: int, micro_batch_size: int | None,
                 group_size: int = 1) -> BatchLayout:
    """Check that `batch_size` rollouts split evenly over the processes, in whole groups of `group_size` responses to
    one prompt (a group stays on one process), and each process's share into minibatches.

    Raises ValueError, before any model loads, for a combination that does not divide, naming what to change.
    """
    prompts = batch_size // group_size
    if group_size > 1 and prompts % processes:
        raise ValueError(
            f"batch_size={batch_size} responses in groups of num_generations={group_size} are {prompts} prompts per "
            f"step, which do not split over {processes} processes (a prompt's group stays on one process). Make "
            f"batch_size a multiple of processes x num_generations = {processes * group_size}."
        )
    if batch_size % processes:
        raise ValueError(
            f"batch_size={batch_size} does not split over {processes} processes: the global batch must be a multiple "
            f"of the process count. Use batch_size={processes * max(1, batch_size // processes)} or launch "
            f"{_divisors_hint(batch_size)} processes."
        )
    per_process = batch_size // processes
    if per_process % num_mini_batches:
        raise ValueError(
            f"Each of the {processes} processes gets {per_process} rollouts (batch_size={batch_size}), which do not "
            f"split into num_mini_batches={num_mini_batches} equal minibatches. Make batch_size a multiple of "
            f"processes x num_mini_batches = {processes * num_mini_batches}."
        )
    minibatch = per_process // num_mini_batches
    accumulation = math.ceil(minibatch / micro_batch_size) if micro_batch_size else 1
    return BatchLayout(batch_size, processes, per_process, num_mini_batches, minibatch, accumulation)


def _divisors_hint(n: int) -> str:
    return " or ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d > 1) or "1"


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Process `index`'s contiguous share of `items` when split `count` ways (sizes differ by at most one)."""
    start, end = index * len(items) // count, (index + 1) * len(items) // count
    return list(items[start:end])


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (every process gets it); `tensor` itself with one process."""
    return reduce(tensor, "sum") if PartialState().num_processes > 1 else tensor


def gather_rows(values: Sequence[T]) -> list[T]:
    """Every process's list, concatenated in process order (lists may differ in length); `values` with one."""
    return gather_object(list(values)) if PartialState().num_processes > 1 else list(values)


def mean_over_processes(stats: dict[str, float]) -> dict[str, float]:
    """The mean of each statistic over the processes (every process must pass the same keys)."""
    count = PartialState().num_processes
    if count == 1 or not stats:
        return stats
    names = sorted(stats)
    summed = all_sum(torch.tensor([float(stats[name]) for name in names], dtype=torch.float64,
                                  device=PartialState().device))
    return {name: value / count for name, value in zip(names, summed.tolist(), strict=True)}


BUCKET_ELEMENTS = 2**25
"""Tensors travel in flat float32 buckets of at most this many elements (128 MiB): few collective calls for many
small LoRA tensors, and no full extra copy of a fully fine-tuned model's gradients."""


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` in order, grouped so that each group holds at most `BUCKET_ELEMENTS` (or one larger tensor)."""
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.numel() > BUCKET_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.numel()
    return [group for group in groups if group]


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over the processes (all-reduce of flat buckets).

    A parameter without a gradient counts as a zero gradient (another process may have one). No-op with one process,
    and for sharded parameters: FSDP reduced their gradients in the backward pass.
    """
    if PartialState().num_processes == 1:
        return
    # a shared tensor is reduced once
    parameters = [p for p in {id(p): p for p in parameters}.values() if not isinstance(p, DTensor)]
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    for grads in _buckets([parameter.grad for parameter in parameters]):
        flat = all_sum(torch.cat([grad.reshape(-1).float() for grad in grads]))
        for grad, chunk in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
            grad.copy_(chunk.view_as(grad))


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Copy the main process's values into every process's `parameters` (flat buckets). No-op with one process."""
    if PartialState().num_processes == 1:
        return
    with torch.no_grad():
        for group in _buckets(list(parameters)):
            flat = torch.cat([p.detach().reshape(-1).float() for p in group])
            flat = broadcast(flat.to(PartialState().device), from_process=0)  # NCCL needs it on the GPU
            for parameter, chunk in zip(group, flat.split([p.numel() for p in group]), strict=True):
                parameter.copy_(chunk.view_as(parameter))


def from_main_process(value: Any) -> Any:
    """The main process's `value` on every process (a picklable object)."""
    if PartialState().num_processes == 1:
        return value
    holder = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]
