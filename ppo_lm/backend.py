"""How a launch holds and updates the trained weights: one backend object, chosen at start-up.

The trainers do the algorithm; a backend does what differs between launches, behind one small interface:
- `prepare(trained, frozen, make_optimizer, max_grad_norm)`: the processes start from the same weights, which are
  then placed (sharded, or handed to an engine), and the optimizer is built over the placed parameters;
- `gathered(*modules)`: whole weights, for passes without gradients (generation, logprobs, values, evaluation,
  checkpoints), which processes may run different numbers of;
- `accumulate(terms, guard)`: one micro-batch's loss terms (`LossTerm`), their forward passes and the gradients
  they add; `backward(loss)` for a loss computed by the caller. A loss is this process's share of the whole step's
  loss: gradients are summed over the processes, never averaged;
- `step(groups)`: reduce, clip, take the optimizer step; returns a `StepResult`: whether it stepped, and
  `grad_norm`, the norm of every trained gradient before clipping, under every backend;
- `discard_gradients()`, and `can_discard_gradients`: whether gradients it has already reduced can still be dropped;
- `snapshot()` and `restore(snapshot)`: a copy of this process's trained weights and optimizer state, and putting
  it back, so that a failed training step leaves no trace (`can_roll_back`: whether the backend can);
- `save_optimizer(directory)` and `load_trained_state(directory, named_trainable)`.

The three backends:
- `Backend` (replicated, like DDP; also a single process): every process keeps the whole model and optimizer; before
  each optimizer step one all-reduce adds up the gradients, so every process takes the same step.
- `FSDPBackend` (accelerate's distributed_type FSDP, version 2): torch's `fully_shard` splits every weight, gradient
  and optimizer moment over the processes; each decoder layer gathers its weights just before it runs and the
  backward pass reduce-scatters its gradients.
- `DeepSpeedBackend` (distributed_type DEEPSPEED, ZeRO stage 1 to 3): a DeepSpeed engine takes the trained models
  and the optimizer; it partitions the optimizer state (stage 1), the gradients (stage 2) and the weights (stage 3),
  reduces, clips and steps. ppo-lm still forms its micro-batches and losses.

What differs in their behaviour, by design:
- Clipping: the replicated and FSDP backends clip each group of parameters given to `step` on its own (PPO: the
  policy, the value model); the DeepSpeed engine clips every trained weight together.
- DeepSpeed keeps reduced gradients in internal buffers that its `zero_grad` does not clear, so it cannot drop a
  minibatch's gradients once computed (`can_discard_gradients` is False): a trainer that may need to drop them (the
  PPO `target_kl` check) decides from a pass without gradients first.
- DeepSpeed runs a micro-batch's loss terms in one forward pass of its engine and one backward pass for their sum
  (ZeRO-3 did not accumulate the value model's gradients right over two engine passes per micro-batch), so their
  graphs are held together and the backward pass runs outside the terms' contexts (untested with
  `gradient_checkpointing`, whose recomputation would then see the policy adapter active); the other backends run
  each term's forward and backward passes in turn, inside the term's context.
- DeepSpeed runs `ppo-lm train` only; SFT and reward training are refused under it (`stages`).
- DeepSpeed keeps its master weights and optimizer state inside the engine, where no public call copies them in
  memory, so it cannot roll a failed step back (`can_roll_back` is False): a failure ends the run, which resumes
  from its last checkpoint.

Only this module knows FSDP and DeepSpeed.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from accelerate import PartialState
from peft import PeftModel
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from transformers import PreTrainedModel

from ppo_lm.checkpoint import CheckpointError, load_state, load_trained, save_state
from ppo_lm.distributed import broadcast_parameters, full_tensors, shard_optimizer_state, sum_gradients
from ppo_lm.generation import backbone_of

T = TypeVar("T")

STAGES = ("train", "sft", "reward")
"""The stage commands a backend may run."""
DEEPSPEED_STATE = "deepspeed"
"""A checkpoint's folder of DeepSpeed's own files (the optimizer state, partitioned as the engine holds it)."""
DEEPSPEED_TAG = "state"


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient of a training step was not finite (NaN or infinite); no optimizer step used it."""


@dataclass
class TrainedState:
    """A copy of one process's trained weights and optimizer state (`Backend.snapshot`)."""

    parameters: list[nn.Parameter]
    """The optimizer's parameters (this process's shards, when sharded), in its order."""
    weights: list[torch.Tensor]
    """A copy of each parameter's values."""
    optimizer_state: dict[nn.Parameter, dict[str, Any]]
    """A copy of the optimizer's per-parameter state (AdamW: its step and moments); parameters without state yet
    are absent."""


class StepResult(NamedTuple):
    """What `Backend.step` did."""

    stepped: bool
    """False when the gradients were not finite: they were dropped and no weight or optimizer state changed."""
    grad_norm: float
    """The norm of every trained gradient together, before clipping."""


@dataclass(frozen=True)
class LossTerm:
    """One term of a micro-batch's loss, for `Backend.accumulate`."""

    name: str
    """What it is, for errors ('policy loss')."""
    compute: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    """The forward pass: the term's objective (this process's share of the step's loss) and its statistics."""
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Entered around the term's forward pass, and its backward pass where the backend runs it on its own (a backward
    pass that recomputes activations must find the models as the forward pass did)."""


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").lower() in ("1", "true")


def _unique_trainable(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The trainable parameters of `modules`, each once (a tied or shared tensor appears once)."""
    found = {id(p): p for module in modules for p in module.parameters() if p.requires_grad}
    return list(found.values())


def _same_tensors(tensors: Sequence[torch.Tensor], others: Sequence[torch.Tensor]) -> bool:
    return len(tensors) == len(others) and all(a is b for a, b in zip(tensors, others, strict=True))


def _copied_entry(entry: dict[str, Any], into: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of one parameter's optimizer state, written into the tensors of `into` where they match in name,
    shape and dtype (no new allocation), else into new ones."""
    copied = {}
    for key, value in entry.items():
        if not torch.is_tensor(value):
            copied[key] = value
            continue
        target = (into or {}).get(key)
        fits = (torch.is_tensor(target) and target is not value and target.shape == value.shape
                and target.dtype == value.dtype and target.device == value.device)
        copied[key] = target.copy_(value) if fits else value.clone()
    return copied


def adamw(groups: Sequence[dict[str, Any]] | Sequence[nn.Parameter], **settings: Any) -> torch.optim.AdamW:
    """torch's AdamW over `groups`, with its fused kernel when every parameter is a floating-point tensor on the CPU
    or a GPU (a DTensor shard included). The fused kernel takes the same step in one pass over each tensor; torch
    defaults to it on no device, and its per-tensor loop is several times slower on the CPU
    (`benchmarks/per_weight_costs.py`).
    `test_the_fused_adamw_takes_the_plain_adamw_steps` holds it to the plain steps."""
    groups = list(groups)
    parameters = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(parameters) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
    return torch.optim.AdamW(groups, fused=fused or None, **settings)


class Backend:
    """Replicated weights (DDP-style), and the single-process case: see the module docstring."""

    name = "replicated"
    title = "replicated weights"
    stages: tuple[str, ...] = STAGES
    can_discard_gradients = True
    """Whether gradients already computed (and reduced) for a step can still be dropped without a trace."""
    can_roll_back = True
    """Whether `snapshot` and `restore` can undo a training step."""
    can_compile_layers = True
    """Whether the decoder layers may run compiled (`PPOConfig.compile_layers`): tested with whole weights only."""
    can_store_frozen_weights = True
    """Whether an autocast body may store its frozen linear weights in the autocast dtype beside its float32 trained
    ones (`models.store_frozen_linear_weights`): tested with whole weights only (a sharding backend gathers a
    layer's weights together)."""
    can_add_gradients_in_place = True
    """Whether the vocabulary-sized weights' backward passes may add into their `.grad` themselves
    (`models.add_vocabulary_gradients_in_place`): only where gradients are read from `.grad` at the step, as here;
    a sharding backend hooks autograd's own accumulation."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self.max_grad_norm = 0.0
        self._reused: TrainedState | None = None

    def describe(self) -> dict[str, Any]:
        """What the bench and the log say about the launch."""
        return {"backend": self.name, "sharded": False, "zero_stage": None}

    def load_device(self, device: torch.device) -> torch.device:
        """Where models load before `prepare` (a sharding backend keeps them on the CPU, then moves each shard)."""
        return device

    def prepare(self, trained: dict[str, nn.Module], frozen: Sequence[nn.Module | None],
                make_optimizer: Callable[[], torch.optim.Optimizer], max_grad_norm: float) -> torch.optim.Optimizer:
        """Give every process the main process's trained weights, place `trained` and `frozen` modules, and build
        the optimizer (with `make_optimizer`, over the placed parameters). `max_grad_norm` 0 turns clipping off."""
        broadcast_parameters(_unique_trainable(list(trained.values())))
        self._place(list(trained.values()), [module for module in frozen if module is not None])
        self.optimizer = make_optimizer()
        self.max_grad_norm = max_grad_norm
        return self.optimizer

    def _place(self, trained: list[nn.Module], frozen: list[nn.Module]) -> None:
        """Replicated: every process keeps its whole copy where it loaded."""

    def gathered(self, *modules: nn.Module | None) -> contextlib.AbstractContextManager:
        """Inside, `modules` hold their whole weights on every process and make no collective call in a forward
        pass. Replicated weights are always whole."""
        return contextlib.nullcontext()

    def whole_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """For `save_pretrained(state_dict=...)` inside `gathered`: the trained tensors by name when the model's own
        `state_dict()` would not give them whole; None when it does."""
        return None

    def gather_root_weights(self, model: nn.Module) -> None:
        """Before running a part of `model` directly rather than its forward (the value model on the policy's body,
        the reward model's body and head): make the weights its forward would have gathered available."""

    def accumulate(self, terms: Sequence[LossTerm], guard: Callable[[torch.Tensor, str], None]
                   ) -> dict[str, torch.Tensor]:
        """Add the gradients of a micro-batch's loss terms; return their statistics. `guard(objective, name)` sees
        each term's objective before its backward pass (the trainer notes a non-finite one). Here each term runs its
        forward and backward passes in turn, inside its context, so only one term's graph is held at a time."""
        stats: dict[str, torch.Tensor] = {}
        for term in terms:
            with term.context():
                objective, term_stats = term.compute()
                guard(objective, term.name)
                self.backward(objective)
            stats.update(term_stats)
        return stats

    def backward(self, loss: torch.Tensor) -> None:
        """Add the gradients of `loss`, this process's share of the step's loss, to the trained weights."""
        loss.backward()

    def discard_gradients(self) -> None:
        """Drop the gradients accumulated since the last step (see `can_discard_gradients`)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, groups: Sequence[Sequence[nn.Parameter]]) -> StepResult:
        """Sum the gradients over the processes, clip each group's norm to `max_grad_norm`, step, and clear the
        gradients; gradients that are not finite are dropped instead, with no step."""
        sum_gradients([p for group in groups for p in group])  # every process now holds the global gradients
        max_norm = self.max_grad_norm or float("inf")
        norms = [nn.utils.clip_grad_norm_(list(group), max_norm).item() for group in groups]
        grad_norm = math.sqrt(sum(norm * norm for norm in norms))
        stepped = math.isfinite(grad_norm)  # the same on every process: the gradients are the summed ones
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(stepped, grad_norm)

    def snapshot(self, reuse: bool = False) -> TrainedState:
        """A copy of this process's trained weights and optimizer state, taken before a training step so that
        `restore` can undo it. It costs one more copy of the trained tensors and of their optimizer state (with
        AdamW, three times the trained weights), where they live.

        `reuse` copies into the tensors of the previous snapshot taken with `reuse` (which is then gone) instead of
        new ones: the copy taken before every step costs no fresh allocation (several times faster on the CPU, where
        new pages are the cost). That copy stays allocated between steps; within a step it was there anyway."""
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        kept = self._reused if reuse else None
        with torch.no_grad():
            if kept is None or not _same_tensors(kept.parameters, parameters):
                weights = [p.detach().clone() for p in parameters]
            else:
                weights = kept.weights
                for copy, parameter in zip(weights, parameters, strict=True):
                    copy.copy_(parameter.detach())
            state = {p: _copied_entry(entry, kept.optimizer_state.get(p) if kept is not None else None)
                     for p, entry in self.optimizer.state.items()}
        snapshot = TrainedState(parameters, weights, state)
        if reuse:
            self._reused = snapshot
        return snapshot

    def restore(self, snapshot: TrainedState) -> None:
        """Put back the weights and optimizer state of `snapshot` and drop every gradient. Each process restores its
        own part. The snapshot's tensors are copied back, not handed over, so it stays valid."""
        state = self.optimizer.state
        with torch.no_grad():
            for parameter, weights in zip(snapshot.parameters, snapshot.weights, strict=True):
                parameter.copy_(weights)
            for parameter in [p for p in state if p not in snapshot.optimizer_state]:
                del state[parameter]  # its state was created by the step being undone
            for parameter, entry in snapshot.optimizer_state.items():
                state[parameter] = _copied_entry(entry, state.get(parameter))
        self.optimizer.zero_grad(set_to_none=True)

    def save_optimizer(self, directory: Path) -> None:
        """Write the optimizer state to `directory`. Every process calls it (making sharded state whole is
        collective); the main process writes `optimizer.safetensors`."""
        state = full_tensors(self.optimizer.state_dict())
        if PartialState().is_main_process:
            save_state(state, directory, "optimizer")

    def load_trained_state(self, directory: Path, named_trainable: dict[str, nn.Parameter]) -> None:
        """Load the trained weights (`save_trained`'s file) and the optimizer state that `save_optimizer` wrote.
        Every trained tensor must be there with its shape."""
        self._check_writer(directory)
        load_trained(named_trainable, directory)
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, load_state(directory, "optimizer")))

    def _check_writer(self, directory: Path) -> None:
        """A checkpoint written under DeepSpeed resumes only under DeepSpeed, and the other way round."""
        written_by_engine = (directory / DEEPSPEED_STATE).is_dir()
        if written_by_engine != isinstance(self, DeepSpeedBackend):
            written, launched = ("with", "without") if written_by_engine else ("without", "with")
            raise CheckpointError(
                f"{directory} was written by a run {written} DeepSpeed and this run is launched {launched} it: resume "
                "with the accelerate config that wrote it, or start a new run from its policy (`ppo-lm export`).")


# --- FSDP2 -------------------------------------------------------------------------------------------------------


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


def decoder_units(module: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (through a peft wrapper): FSDP's units. A module that is not a
    model (a scalar head) has none and is sharded as one unit."""
    if not isinstance(module, (PreTrainedModel, PeftModel)):
        return []
    body = backbone_of(module)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"Cannot shard {type(body).__name__}: FSDP units are its decoder layers, and it has no "
                         "`layers` list. Launch with configs/accelerate/multi_gpu.yaml (replicated) instead.")
    return list(layers)


class FSDPBackend(Backend):
    """Weights, gradients and optimizer state sharded over the processes with torch's FSDP2 (`fully_shard`).

    Each decoder layer is a unit whose weights are gathered just before it runs; a model itself holds the rest
    (embeddings, final norm, output head). Gradients are reduce-scattered as plain sums in the backward pass, so the
    step's all-reduce has nothing left to do. Passes without gradients run with the weights gathered."""

    name = "fsdp"
    title = "FSDP"
    can_compile_layers = False
    can_store_frozen_weights = False
    can_add_gradients_in_place = False

    def __init__(self, sharding: Sharding) -> None:
        super().__init__()
        self.sharding = sharding
        self._reshards_after_forward: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
        """Each unit's own `reshard_after_forward`, restored when `gathered` ends."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "sharded": True, "zero_stage": None}

    def load_device(self, device: torch.device) -> torch.device:
        """The CPU: sharding moves each unit's shard to this process's device, so a model larger than one GPU never
        sits whole on one."""
        return torch.device("cpu")

    def _place(self, trained: list[nn.Module], frozen: list[nn.Module]) -> None:
        """Shard every trained and frozen module (a reference model too), each decoder layer a unit."""
        for module in trained + frozen:
            self._shard(module, decoder_units(module))

    def _shard(self, root: nn.Module, units: Sequence[nn.Module]) -> None:
        """Shard `root` with FSDP2: each of `units` gathers its weights together just before it runs, and `root`
        holds the rest. Weights on the CPU move to this process's device unit by unit as they are sharded."""
        for unit in units:
            fully_shard(unit, reshard_after_forward=self.sharding.reshard_after_forward)
            self._reshards_after_forward[unit] = self.sharding.reshard_after_forward
        fully_shard(root, reshard_after_forward=False)  # its weights are the first used in the backward pass
        self._reshards_after_forward[root] = False
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # a plain sum: each process's loss is its share of the step's
                module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        # FSDP takes the first unit that runs a forward pass for the root. Generation (peft's `generate`) and the
        # value model call inner modules directly, so settle the root now. (torch has no public call for this.)
        root._get_fsdp_state()._lazy_init()

    @contextlib.contextmanager
    def gathered(self, *modules: nn.Module | None) -> Iterator[None]:
        """Each sharded module of `modules` holds its whole weights while inside (one whole copy per process)."""
        # each unit once, though a module may be part of another (the value body of the policy)
        units = list(dict.fromkeys(unit for module in modules if module is not None
                                   for unit in module.modules() if isinstance(unit, FSDPModule)))
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_forward(self._reshards_after_forward.get(unit, True), recurse=False)
                unit.reshard()

    def whole_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """A sharded model's trained parameters by name, whole (its own `state_dict()` would give its shards), copied
        to the CPU: what peft saves of an adapter model, and every weight in full fine-tuning. The copies are their
        own tensors: gathered weights are views into FSDP's all-gather buffers, which safetensors will not write."""
        if not isinstance(model, FSDPModule):
            return None
        return {name: parameter.detach().to("cpu", copy=True)
                for name, parameter in model.named_parameters() if parameter.requires_grad}

    def gather_root_weights(self, model: nn.Module) -> None:
        """Gather the model's own weights (those not in a unit: embeddings, final norm, heads); FSDP frees them
        again after the backward pass."""
        if isinstance(model, FSDPModule):
            model.unshard()


# --- DeepSpeed ZeRO ----------------------------------------------------------------------------------------------

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


class DeepSpeedBackend(Backend):
    """A DeepSpeed ZeRO engine holds the trained models and the optimizer: it reduces, clips and steps.

    ppo-lm forms the micro-batches and decides when a step ends (`managed_gradient_accumulation: false`). DeepSpeed's
    own mixed precision stays off: ppo-lm sets the models' dtype itself. Frozen models (a separate reference, the
    reward model) stay whole outside the engine."""

    name = "deepspeed"
    title = "DeepSpeed ZeRO"
    stages = ("train",)
    can_compile_layers = False
    can_store_frozen_weights = False
    can_add_gradients_in_place = False
    can_discard_gradients = False
    can_roll_back = False

    def snapshot(self, reuse: bool = False) -> TrainedState:
        raise NotImplementedError("DeepSpeed cannot roll a training step back (see `can_roll_back`).")

    def restore(self, snapshot: TrainedState) -> None:
        raise NotImplementedError("DeepSpeed cannot roll a training step back (see `can_roll_back`).")

    def __init__(self, settings: DeepSpeedSettings) -> None:
        super().__init__()
        self.settings = settings
        self.engine: Any = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "sharded": False, "zero_stage": self.settings.stage}

    def prepare(self, trained: dict[str, nn.Module], frozen: Sequence[nn.Module | None],
                make_optimizer: Callable[[], torch.optim.Optimizer], max_grad_norm: float) -> torch.optim.Optimizer:
        """Build the optimizer, then an engine over `trained` and it (which partitions its parameter groups). The
        engine clips the gradients of every trained weight together to `max_grad_norm` (0: no clipping)."""
        import deepspeed

        broadcast_parameters(_unique_trainable(list(trained.values())))
        self.optimizer = make_optimizer()
        self.max_grad_norm = max_grad_norm
        config = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: ppo-lm forms its micro-batches itself
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": float(max_grad_norm),
            "zero_optimization": dict(self.settings.zero_optimization),
            "zero_allow_untested_optimizer": True,  # torch's AdamW, with a learning rate per role
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**62,  # ppo-lm logs its own metrics
        }
        self.engine, *_ = deepspeed.initialize(model=EngineModules(trained), optimizer=self.optimizer, config=config)
        return self.optimizer

    def gathered(self, *modules: nn.Module | None) -> contextlib.AbstractContextManager:
        """Under ZeRO-3, every trained model holds its whole weights while inside (DeepSpeed's generation with
        gathered weights); ZeRO-1/2 weights are whole already."""
        if self.settings.stage < 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    def accumulate(self, terms: Sequence[LossTerm], guard: Callable[[torch.Tensor, str], None]
                   ) -> dict[str, torch.Tensor]:
        """Every term in one forward pass of the engine (ZeRO counts its gradient accumulation by them), then one
        backward pass for their sum, outside the terms' contexts."""

        def forward_all() -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
            results = []
            for term in terms:
                with term.context():
                    results.append(term.compute())
            return results

        results = self.engine(forward_all)
        for term, (objective, _) in zip(terms, results, strict=True):
            guard(objective, term.name)
        self.backward(sum(objective for objective, _ in results))
        return {name: value for _, term_stats in results for name, value in term_stats.items()}

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed averages the gradients over the processes; the loss is this process's share of the step's loss,
        so it is scaled by the process count to get their sum."""
        self.engine.backward(loss * PartialState().num_processes, scale_wrt_gas=False)

    def discard_gradients(self) -> None:
        """Clears what `zero_grad` clears; gradients the engine has already reduced into its buffers stay."""
        self.engine.zero_grad()

    def step(self, groups: Sequence[Sequence[nn.Parameter]]) -> StepResult:
        """The engine's step: reduce, clip every trained gradient together, step. `groups` are the engine's already.
        Whether it stepped is the engine's word (without fp16 loss scaling it always steps)."""
        self.engine.step()
        return StepResult(bool(self.engine.was_step_applied()), float(self.engine.get_global_grad_norm()))

    def save_optimizer(self, directory: Path) -> None:
        """Every process writes its partition of the optimizer state (DeepSpeed's own files, under `deepspeed/`)."""
        self.engine.save_checkpoint(str(directory / DEEPSPEED_STATE), tag=DEEPSPEED_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_trained_state(self, directory: Path, named_trainable: dict[str, nn.Parameter]) -> None:
        """The engine's checkpoint holds the trained weights and the partitioned optimizer state."""
        self._check_writer(directory)
        path, _ = self.engine.load_checkpoint(str(directory / DEEPSPEED_STATE), tag=DEEPSPEED_TAG,
                                              load_module_strict=False, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no state to load in {directory / DEEPSPEED_STATE}.")


def select_backend(stage: str) -> Backend:
    """The backend the launch asks for (its accelerate config, read from the environment), for the stage command
    `stage` ('train', 'sft' or 'reward'). Call it before any model loads: a launch ppo-lm cannot follow stops here
    with a clear error."""
    if (deepspeed := deepspeed_settings()) is not None:
        backend: Backend = DeepSpeedBackend(deepspeed)
    elif (sharding := fsdp_sharding()) is not None:
        backend = FSDPBackend(sharding)
    else:
        backend = Backend()
    if stage not in backend.stages:
        raise ValueError(f"`ppo-lm {stage}` does not run under {backend.title} (it runs "
                         f"{', '.join(f'ppo-lm {name}' for name in backend.stages)}): launch it with "
                         "configs/accelerate/fsdp.yaml to shard the model (like ZeRO-3), or with multi_gpu.yaml to "
                         "replicate it.")
    return backend
