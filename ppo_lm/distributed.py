"""Data parallelism over the processes that `accelerate launch` (or torchrun) starts: the collectives and the batch
arithmetic every launch shares.

Every process starts from the same weights (the main process's are broadcast once, after loading). Each process
generates, scores and differentiates its own share of the batch. Numbers that decide something (advantage
whitening, the KL controller, early stopping on the approximate KL) and the logged means are computed over every
process's rows. Only the main process writes logs, reports and checkpoints.

How the weights themselves are held (replicated, FSDP2, DeepSpeed ZeRO) is the backend's business
(`ppo_lm/backend.py`); this module only sums, gathers and broadcasts, and makes sharded tensors whole or cuts whole
ones like them. With one process every function here is the plain local computation: no collective call is made.

When one process of a launch fails, the others would wait in their next collective until its timeout (30 minutes
by default). `end_failed_process` ends the failing process at once instead, with its error shown and recorded for
the launcher, so that torchrun's agent (under `accelerate launch`) stops the others within its monitor interval.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
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
    accumulation: int | None
    """Micro-batches per process per optimizer step: by `micro_batch_size`, or 1 for the whole minibatch; None when
    a token budget forms them (how many depends on the rows' lengths)."""
    micro_batch_tokens: int | str | None = None
    """The token budget (`PPOConfig.micro_batch_tokens`) when it forms the micro-batches."""

    def describe(self) -> str:
        """One line for the log."""
        each = (f"{self.accumulation} micro-batch(es) each" if self.accumulation is not None else
                f"each in micro-batches of at most micro_batch_tokens={self.micro_batch_tokens} padded tokens")
        return (f"batch {self.global_batch} = {self.per_process} per process x {self.processes} processes; "
                f"{self.mini_batches} minibatch(es) of {self.per_process_minibatch} rows per process, {each}")


def batch_layout(batch_size: int, processes: int, num_mini_batches: int, micro_batch_size: int | None,
                 group_size: int = 1, micro_batch_tokens: int | str | None = None) -> BatchLayout:
    """Check that `batch_size` rollouts split evenly over the processes, in whole groups of `group_size` responses to
    one prompt (a group stays on one process), and each process's share into minibatches. `micro_batch_size` wins
    over `micro_batch_tokens` ('auto' or a number: the trainer packs rows into passes by that budget).

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
    if micro_batch_size:
        return BatchLayout(batch_size, processes, per_process, num_mini_batches, minibatch,
                           math.ceil(minibatch / micro_batch_size))
    if micro_batch_tokens is not None:
        return BatchLayout(batch_size, processes, per_process, num_mini_batches, minibatch, None, micro_batch_tokens)
    return BatchLayout(batch_size, processes, per_process, num_mini_batches, minibatch, 1)


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


# --- one failing process ends the launch ----------------------------------------------------------------------------

FAILURE_KEY = "ppo_lm/first_failed_process"
"""The key, in the launch's rendezvous store, under which the first process to fail writes its index."""
STORE_TIMEOUT = timedelta(seconds=2)
"""How long to try to reach the rendezvous store when a process fails (it is not needed to end the launch)."""
STOP_WAIT_SECONDS = 5.0
"""How long a process that fails after another waits for the launcher's SIGTERM before it ends itself (the agent
looks at its processes every 0.1 s by default)."""


def _launch_store() -> torch.distributed.Store | None:
    """A client of the rendezvous store that torchrun's agent holds for the launch; None when the processes were
    started otherwise (their store may live in a process that has just failed) or it cannot be reached."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not address or not port:
        return None
    try:
        return torch.distributed.TCPStore(address, int(port), is_master=False, timeout=STORE_TIMEOUT,
                                          wait_for_workers=False)
    except (RuntimeError, ValueError):  # the agent is gone too
        return None


def _failure_key() -> str:
    # A launch that restarts its workers (--max_restarts) starts each attempt with a clean slate.
    return f"{FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def failed_process() -> int | None:
    """The index of the process of this launch that failed first, or None when none has (or nothing can tell).

    For code that runs while the launch is being torn down (a SIGTERM handler, say): a collective with a failed
    process cannot complete, so a checkpoint is not worth attempting then. (Note that a Python signal handler only
    runs between bytecodes: a process blocked in an NCCL collective whose peer has gone does not run it, and the
    agent kills it with SIGKILL 30 s after its SIGTERM; without a handler, SIGTERM ends it at once.)
    """
    store = _launch_store()
    if store is None:
        return None
    try:
        return int(store.get(_failure_key())) if store.check([_failure_key()]) else None
    except (RuntimeError, ValueError):
        return None


def _claim_first_failure(index: int) -> int | None:
    """Record `index` as the launch's first failed process unless another process came first; returns the first
    one's index (None when the store cannot be reached)."""
    store = _launch_store()
    if store is None:
        return None
    try:  # compare_set is atomic: of processes failing together, exactly one is first
        return int(store.compare_set(_failure_key(), "", str(index)))
    except (RuntimeError, ValueError):
        return None


def _flush_output() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def end_failed_process(error: BaseException, exit_code: int, traceback_text: str | None = None) -> None:
    """In a launch of several processes, end this one at once after `error`, so that the launch ends within
    seconds with its error shown; with one process (or before the processes have connected), return and do
    nothing.

    Call it from an `except` block. The first process to fail prints its error in one line that names the process,
    and exits with `exit_code`. Under torchrun (`accelerate launch`) it also writes the error, with its traceback,
    to the file the agent reads, so that the launcher's closing summary shows it as the root cause; elsewhere it
    prints `traceback_text` (when given) before that line. Its exit is what ends the launch: the agent sees it
    within its monitor interval (0.1 s) and sends SIGTERM to the other processes, wherever they are waiting (with
    NCCL, a process blocked in a collective whose peer has gone would otherwise wait until the collective times
    out). A process that fails after another, typically because a collective lost that peer, says so in one line
    and waits a few seconds for that SIGTERM, so that the agent names the process that failed first.

    The exit is `os._exit`: no atexit handler, finaliser or process-group destructor runs, because any of them may
    wait for the other processes (an NCCL communicator with collectives in flight, a tracker's thread), and what
    they would write is not needed: checkpoints are only published once complete, and metrics.jsonl is written a
    line at a time. Trackers (TensorBoard, W&B) may lose the events they had not yet flushed.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    index, count = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if count == 1:
        return
    first = _claim_first_failure(index)
    if first is None or first == index:
        summary = str(error) if traceback_text is None else f"{type(error).__name__}: {error}"
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun's closing summary shows the traceback
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(error)
            traceback_text = None
        # (from a new line: the main process's progress bar may be half-way along one)
        print(f"\n{traceback_text or ''}error (process {index} of {count}): {summary}", file=sys.stderr)
        _flush_output()
        os._exit(exit_code)
    own = (str(error).strip().splitlines() or [""])[0][:160]
    print(f"process {index} of {count} stops too: process {first} failed first, its error is above (here: "
          f"{type(error).__name__}: {own})", file=sys.stderr)
    _flush_output()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: let its SIGTERM end this process, at once
        with contextlib.suppress(ValueError):  # (only the main thread may set a handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(STOP_WAIT_SECONDS)
    os._exit(1)
