"""Data parallelism over the processes that `accelerate launch` (or torchrun) starts, replicated or sharded.

Every process starts from the same weights (the main process's are broadcast once, after loading). Each process
generates, scores and differentiates its own share of the batch. Numbers that decide something (advantage
whitening, the KL controller, early stopping on the approximate KL) and the logged means are computed over every
process's rows. Only the main process writes logs, reports and checkpoints.

Three ways to hold the weights:
- replicated (an accelerate config of distributed_type MULTI_GPU, like DDP): every process keeps the whole model and
  optimizer; before every optimizer step one all-reduce adds up the gradients (`sum_gradients`), so every process
  takes the same step and the copies never drift apart.
- sharded (distributed_type FSDP, version 2): torch's `fully_shard` splits every weight, gradient and optimizer
  moment over the processes; each layer gathers its weights just before it runs and the backward pass
  reduce-scatters its gradients. Passes without gradients (generation, logprobs, values, evaluation) run with the
  weights gathered (`gathered`), so that processes may run different numbers of them.
- DeepSpeed ZeRO (distributed_type DEEPSPEED, stage 1 to 3): a DeepSpeed engine takes the trained models and the
  optimizer; it partitions the optimizer state (stage 1), the gradients (stage 2) and the weights (stage 3), reduces
  the gradients, clips them and steps (`start_deepspeed`). ppo-lm still forms its micro-batches and losses.

With one process every function here is the plain local computation: no collective call is made.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, broadcast_object_list, gather_object, reduce
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").lower() in ("1", "true")


def process_state() -> PartialState:
    """accelerate's view of this run's processes: one process unless started by `accelerate launch` or torchrun.

    Without CUDA the processes talk over gloo on the CPU. An FSDP or DeepSpeed config that asks for what ppo-lm does
    not do stops here with a clear error (`fsdp_sharding`, `deepspeed_settings`).
    """
    deepspeed_settings()  # a DeepSpeed config ppo-lm cannot follow stops here, before any model loads
    fsdp_sharding()  # an FSDP config ppo-lm cannot follow stops here, before any model loads
    return PartialState(cpu=not torch.cuda.is_available())


@dataclass(frozen=True)
class Sharding:
    """How an FSDP launch spreads the weights over the processes (read from its accelerate config)."""

    reshard_after_forward: bool
    """Free each layer's gathered weights after its forward pass and gather them again for the backward pass
    (least memory, like ZeRO-3), rather than keep them until the backward pass (less communication, like ZeRO-2)."""


def fsdp_sharding() -> Sharding | None:
    """The sharding an `accelerate launch` with an FSDP config asks for, or None when the run is not sharded.

    Raises ValueError for settings ppo-lm does not follow: FSDP version 1 (ppo-lm uses torch's FSDP2,
    `fully_shard`), FSDP's own activation checkpointing (use the run's `gradient_checkpointing`) and parameter
    offloading to the CPU.
    """
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise ValueError(f"This torch ({torch.__version__}) has an FSDP2 without `set_force_sum_reduction_for_comms`, "
                         "which ppo-lm's sharding needs: upgrade torch (tested with 2.15), or launch replicated "
                         "with configs/accelerate/multi_gpu.yaml.")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables that `accelerate launch` sets
    version = getattr(plugin, "fsdp_version", 1)  # accelerate versions without FSDP2 have no such field
    if version != 2:
        raise ValueError(f"This FSDP launch asks for fsdp_version {version}; ppo-lm shards with FSDP2 (torch's "
                         "fully_shard). Set `fsdp_version: 2` in the accelerate config (see "
                         "configs/accelerate/fsdp.yaml), with an accelerate version that knows it.")
    if plugin.activation_checkpointing:
        raise ValueError("This FSDP launch sets fsdp_activation_checkpointing; ppo-lm checkpoints activations "
                         "itself: set it to false and set `gradient_checkpointing: true` in the ppo-lm config.")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError("This FSDP launch sets fsdp_offload_params, which ppo-lm does not support: set it to false "
                         "(sharding over more GPUs, micro_batch_size and gradient_checkpointing lower the memory).")
    return Sharding(reshard_after_forward=bool(plugin.reshard_after_forward))


_RESHARDS_AFTER_FORWARD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Each FSDP unit's own `reshard_after_forward`, restored when `gathered` ends."""


def shard_units(units: Sequence[nn.Module], root: nn.Module, sharding: Sharding,
                gradient_divide_factor: float = 1.0) -> None:
    """Shard `root`'s weights with FSDP2: each module of `units` (e.g. the decoder layers) becomes a unit whose
    weights are gathered together just before it runs, and `root` holds the rest. Weights on the CPU move to this
    process's device unit by unit as they are sharded.

    Gradients are reduce-scattered as sums divided by `gradient_divide_factor`: 1 (a plain sum) where each process's
    loss is already weighted by its share of the global batch, as in PPO; the process count for a mean.
    """
    for unit in units:
        fully_shard(unit, reshard_after_forward=sharding.reshard_after_forward)
        _RESHARDS_AFTER_FORWARD[unit] = sharding.reshard_after_forward
    fully_shard(root, reshard_after_forward=False)  # its weights are the first used in the backward pass
    _RESHARDS_AFTER_FORWARD[root] = False
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(float(gradient_divide_factor))
            module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum
    # FSDP takes the first unit that runs a forward pass for the root. Generation (peft's `generate`) and the value
    # model call inner modules directly, so settle the root now. (torch has no public call for this.)
    root._get_fsdp_state()._lazy_init()


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` was sharded by `shard_units` (its weights are DTensors)."""
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """Inside, each sharded model of `models` holds its whole weights on every process and its forward passes make
    no collective call, so processes may run different numbers of them (generation lengths differ). Memory: one
    whole copy of the model per process while inside. Nothing happens for a model that is not sharded.
    """
    units = list(dict.fromkeys(  # once each, though a model may be a part of another (the value body of the policy)
        module for model in models if model is not None for module in model.modules() if isinstance(module, FSDPModule)
    ))
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(_RESHARDS_AFTER_FORWARD.get(unit, True), recurse=False)
            unit.reshard()


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """For `save_pretrained(state_dict=...)` inside `gathered`: a sharded model's trained parameters by name, whole
    (its own `state_dict()` would give its shards), copied to the CPU; None for a model that is not sharded (its
    state_dict is whole).

    Trained parameters are what peft saves of an adapter model (adapters, modules_to_save), and every weight in full
    fine-tuning. The copies are their own tensors: gathered weights are views into FSDP's all-gather buffers, which
    safetensors will not write."""
    if not is_sharded(model):
        return None
    return {name: parameter.detach().to("cpu", copy=True)
            for name, parameter in model.named_parameters() if parameter.requires_grad}


def gather_own_weights(model: nn.Module) -> None:
    """Gather a sharded model's own weights (those not in one of its units: embeddings, final norm, heads) before a
    forward pass that calls its inner modules directly instead of the model, whose forward would have gathered them.
    FSDP frees them again after the backward pass. Nothing happens for a model that is not sharded."""
    if is_sharded(model):
        model.unshard()


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


# --- DeepSpeed ZeRO ---------------------------------------------------------------------------------------------

DEEPSPEED_MIN_VERSION = "0.19.4"
"""The first DeepSpeed with `managed_gradient_accumulation: false`, which lets ppo-lm decide when a step ends."""


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a DeepSpeed launch asks for (read from its accelerate config)."""

    zero_optimization: dict[str, Any]
    """The `zero_optimization` section of the DeepSpeed config: `stage` and any tuning keys (bucket sizes, ...)."""

    @property
    def stage(self) -> int:
        """The ZeRO stage: 1 partitions the optimizer state, 2 also the gradients, 3 also the weights."""
        return int(self.zero_optimization["stage"])


def deepspeed_settings() -> DeepSpeedSettings | None:
    """The ZeRO settings an `accelerate launch` with a DeepSpeed config asks for, or None for another launch.

    They come from accelerate's `DeepSpeedPlugin` (the `deepspeed_config` of the accelerate config, or the DeepSpeed
    JSON file it names). ppo-lm builds the rest of DeepSpeed's config itself (batch sizes, clipping, precision).
    Raises ValueError for what ppo-lm does not follow: ZeRO stage 0, offloading to the CPU or NVMe, and a DeepSpeed
    older than `DEEPSPEED_MIN_VERSION` or not installed.
    """
    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    try:
        import deepspeed
    except ImportError as error:
        raise ValueError("This run was launched with a DeepSpeed config, but DeepSpeed is not installed: "
                         "`pip install 'ppo-lm[deepspeed]'`, or launch with configs/accelerate/fsdp.yaml.") from error
    from accelerate.utils import DeepSpeedPlugin
    from packaging.version import Version

    if Version(deepspeed.__version__) < Version(DEEPSPEED_MIN_VERSION):
        raise ValueError(f"DeepSpeed {deepspeed.__version__} is too old for ppo-lm, which needs "
                         f"{DEEPSPEED_MIN_VERSION} or newer (`pip install -U 'ppo-lm[deepspeed]'`).")
    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables that `accelerate launch` sets
    zero = {key: value for key, value in plugin.deepspeed_config["zero_optimization"].items() if value != "auto"}
    # accelerate registers its config with transformers, which would then load every model partitioned (ZeRO-3):
    # ppo-lm loads whole models and lets the engine partition the trained ones.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    del plugin
    unset_hf_deepspeed_config()
    for part in ("offload_optimizer", "offload_param"):
        if str((zero.pop(part, None) or {}).get("device", "none")).lower() != "none":
            raise ValueError(f"This DeepSpeed launch sets {part}, which ppo-lm does not support: set its device "
                             "to none (more GPUs, a higher ZeRO stage, micro_batch_size and gradient_checkpointing "
                             "lower the memory per GPU).")
    settings = DeepSpeedSettings(zero)
    if settings.stage not in (1, 2, 3):
        raise ValueError(f"This DeepSpeed launch asks for ZeRO stage {settings.stage}; ppo-lm drives stages 1, 2 and "
                         "3. To replicate the model with plain data parallelism, launch with "
                         "configs/accelerate/multi_gpu.yaml.")
    return settings


class EngineModules(nn.ModuleDict):
    """The trained models, as the one module a DeepSpeed engine takes. Its forward pass runs a function of them:
    `engine(compute)` brackets any computation the way DeepSpeed needs a forward pass bracketed (ZeRO counts its
    gradient accumulation by forward passes)."""

    def forward(self, compute: Callable[[], T]) -> T:
        """Return `compute()`, run as the engine's forward pass."""
        return compute()


def start_deepspeed(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, settings: DeepSpeedSettings,
                    max_grad_norm: float) -> Any:
    """A DeepSpeed engine over `modules` (the trained models) and `optimizer` (whose parameter groups it partitions).

    ppo-lm forms the micro-batches and decides when a step ends (`managed_gradient_accumulation: false`): call
    `engine(compute)` for each micro-batch's forward pass, `engine.backward(loss)` and, once per optimizer step,
    `engine.step()`. The engine clips the gradients of every trained weight together to `max_grad_norm` (0: no
    clipping). DeepSpeed's own mixed precision stays off: ppo-lm sets the models' dtype itself.
    """
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: ppo-lm forms its micro-batches itself
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": dict(settings.zero_optimization),
        "zero_allow_untested_optimizer": True,  # torch's AdamW, with a learning rate per role
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # ppo-lm logs its own metrics
    }
    engine, *_ = deepspeed.initialize(model=EngineModules(modules), optimizer=optimizer, config=config)
    return engine


def deepspeed_gathered(engine: Any | None) -> contextlib.AbstractContextManager:
    """Inside, the models of a ZeRO-3 `engine` hold their whole weights on every process and their forward passes
    make no collective call (DeepSpeed's generation with gathered weights), so that processes may run different
    numbers of them. Nothing happens without an engine, or under ZeRO-1/2 (whose weights are whole)."""
    if engine is None or engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)


def deepspeed_backward(engine: Any, loss: torch.Tensor) -> None:
    """Backpropagate `loss`, a share of the whole step's loss over every process, through `engine`.

    DeepSpeed averages the gradients over the processes; ppo-lm's losses already carry each process's share, so
    the loss is scaled by the process count to get their sum, as `sum_gradients` does."""
    engine.backward(loss * PartialState().num_processes, scale_wrt_gas=False)


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


def batch_layout(batch_size: int, processes: int, num_mini_batches: int, micro_batch_size: int | None) -> BatchLayout:
    """Check that `batch_size` rollouts split evenly over the processes and each process's share into minibatches.

    Raises ValueError, before any model loads, for a combination that does not divide, naming what to change.
    """
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


def sum_gradients(parameters: Iterable[torch.nn.Parameter], scale: float = 1.0) -> None:
    """Replace each gradient by `scale` x its sum over the processes (all-reduce of flat buckets).

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
        if scale != 1.0:
            flat *= scale
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
