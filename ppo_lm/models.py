"""The four roles of PPO on one base model, and the forward passes that read them.

- policy: the base causal LM plus a LoRA adapter named "policy" (or the whole model when `use_lora=False`);
- reference: the same base with the adapter disabled (no second copy), or a separately loaded model;
- value: a second LoRA adapter, "value", on the same base plus a scalar head (or a separate model); none at all when
  the advantage estimator needs no values (GRPO, RLOO, REINFORCE++);
- reward: a sequence-classification model, or a Python function (handled by the trainer).

Every forward pass takes a `SequenceBatch` (left-padded prompt, then response, then right padding) and passes
explicit position ids, so that padding changes nothing a real token sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ppo_lm.config import PPOConfig, TrainConfig
from ppo_lm.generation import SequenceBatch, backbone_of, position_ids_from_mask
from ppo_lm.losses import entropy_from_logits
from ppo_lm.packing import packed_attention, varlen_kernel_available

if TYPE_CHECKING:
    from accelerate import PartialState

logger = logging.getLogger(__name__)

POLICY_ADAPTER = "default"  # peft's default name: the policy adapter saves and loads like any peft adapter
VALUE_ADAPTER = "value"


def resolve_device(name: str, processes: PartialState | None = None) -> torch.device:
    """'auto' becomes this process's device in a multi-process run (its own GPU), else CUDA when available, else
    the CPU; anything else is passed to torch.device."""
    if processes is not None and processes.num_processes > 1 and name in ("auto", "cuda"):
        return processes.device if processes.device.type == "cuda" else torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' becomes bfloat16 on a GPU that supports it, else float32; 'bfloat16_if_native' becomes bfloat16 there
    and on a CPU that multiplies bfloat16 natively, else float32. Asking for bfloat16 on a CPU that would emulate it
    gets a warning: it is the user's choice, but a slow one."""
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if name == "bfloat16_if_native":
        return torch.bfloat16 if gpu_bf16 or (device.type == "cpu" and cpu_multiplies_bf16()) else torch.float32
    if name == "bfloat16":
        warn_if_bf16_is_emulated(device, "dtype: bfloat16")
    return getattr(torch, name)


def warn_if_bf16_is_emulated(device: torch.device, setting: str) -> None:
    """Warn that `setting` multiplies in bfloat16 on a CPU without bfloat16 instructions, where oneDNN emulates it:
    on a 2-core AVX2 EPYC a bfloat16 product ran at a hundredth of float32's rate (benchmarks/RESULTS.md)."""
    if device.type == "cpu" and not cpu_multiplies_bf16():
        logger.warning("%s on a CPU without AVX-512 BF16 or AMX: its bfloat16 products are emulated, many times "
                       "slower than float32. For speed set dtype: bfloat16_if_native (or auto) and mixed_precision: "
                       "auto, which pick float32 here.", setting)


def autocast_dtype(mixed_precision: str, device: torch.device, weights: torch.dtype) -> torch.dtype | None:
    """The dtype the transformer bodies' matrix products run in under `mixed_precision` ('auto', 'bf16', 'no'), or
    None when they run in the weights' own dtype. Only float32 weights are ever autocast."""
    if mixed_precision == "no" or weights != torch.float32:
        return None
    if mixed_precision == "bf16":
        warn_if_bf16_is_emulated(device, "mixed_precision: bf16")
        return torch.bfloat16
    if device.type == "cpu" and cpu_multiplies_bf16():
        return torch.bfloat16
    return None


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX-512 BF16 or AMX), which make bfloat16 products several
    times faster than float32 ones; without them oneDNN emulates bfloat16, slower than float32."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return cpu_has_amx() or (check is not None and check())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (matrix units that multiply bfloat16)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return check is not None and check()


FLOAT32_SDPA = "ppo_lm_sdpa_float32"
"""The attention implementation of an autocast body on a CPU: torch's sdpa on float32 operands."""


def float32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, with its operands in float32 and autocast off when a body runs under autocast.
    torch's CPU flash-attention kernel is slower in bfloat16 than in float32 at short lengths, with AMX tiles too:
    a forward and backward pass of 32 x 48 tokens took 2.1x float32's time on a 2-core EPYC with AVX-512 BF16 and
    3.5x on a 2-core Xeon with AMX; at 8 x 420 tokens 1.07x and 0.86x (`benchmarks/attention_dtype.py`), while the
    bodies' matrix products still gain from bfloat16. Outside autocast it is plain sdpa."""
    if not torch.is_autocast_enabled(query.device.type):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


AttentionInterface.register(FLOAT32_SDPA, float32_sdpa)
AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)  # the same boolean masks as sdpa


def autocast_bodies(models: Iterable[nn.Module | None], device: torch.device, dtype: torch.dtype | None,
                    store_frozen: bool = True) -> None:
    """Run the transformer body of each model under `torch.autocast(dtype)` (no-op for None): every path into a
    model (its forward, `generate`, a pass over the body alone) goes through the body. The output heads stay outside:
    the policy's logits, and so every logprob, ratio and KL, come from float32 products, and each body's float32
    residual stream reaches them as it is. A body shared by several roles is wrapped once. Its LoRA layers skip
    peft's cast of their input to the adapter's dtype, which autocast would undo. On a CPU, a body that uses sdpa
    attention runs it in float32 (`float32_sdpa`). With `store_frozen`, the frozen weights of the
    body's linear layers are stored in `dtype` (`store_frozen_linear_weights`)."""
    if dtype is None:
        return
    for model in models:
        body = None if model is None else backbone_of(model)
        if body is None or getattr(body, "autocast_dtype", None) is not None:
            continue
        body.forward = _autocast_forward(body.forward, device.type, dtype)
        body.autocast_dtype = dtype
        if store_frozen:
            store_frozen_linear_weights(body, dtype)
        config = getattr(body, "config", None)
        if device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa":
            # The config is the model's own (every module holds the same one); it is not saved with the model.
            config._attn_implementation = FLOAT32_SDPA
        for layer in body.modules():
            if isinstance(layer, BaseTunerLayer):
                # peft casts a bfloat16 input (an attention output, an MLP product) to its float32 adapter's dtype,
                # which autocast casts straight back for the adapter's product: the same numbers, two copies fewer.
                layer.cast_input_dtype_enabled = False


def store_frozen_linear_weights(body: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of `body`'s linear layers in `dtype`, the dtype its autocast gives their
    products; returns how many tensors changed.

    Autocast casts a linear layer's float32 operands on every call and keeps a cast only of a trainable weight, and
    only until the autocast context ends: a frozen weight (a LoRA base, a reference or reward model) was cast again
    in every pass, generation's one per new token. Stored once in that dtype, the products get the same operands
    (the same rounding of the same float32 values) without the casts. The float32 tensors' memory goes back: freed,
    or, where they were views of the checkpoint file, their pages dropped (`drop_file_pages`). Trained weights stay
    float32, as their optimizer needs them."""
    replaced = []
    for layer in body.modules():
        if not isinstance(layer, nn.Linear):
            continue
        for name in ("weight", "bias"):
            tensor = getattr(layer, name)
            if tensor is not None and not tensor.requires_grad and tensor.dtype == torch.float32:
                setattr(layer, name, nn.Parameter(tensor.detach().to(dtype), requires_grad=False))
                replaced.append(tensor)
    kept = {t.untyped_storage().data_ptr() for t in [*body.parameters(), *body.buffers()]}
    drop_file_pages(t for t in replaced if t.untyped_storage().data_ptr() not in kept)  # not a tied weight's
    return len(replaced)


MADV_DONTNEED = 4
"""Linux's madvise advice that drops a range's pages (read back from the file on the next access)."""


def drop_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop from the process's memory the pages of `tensors` that lie in a private mapping of a file; returns the
    bytes dropped (0 off Linux). Only for tensors nothing reads or writes any more; a tensor on a device other than
    the CPU is left alone.

    transformers maps a safetensors checkpoint into memory, and the weights it loads as stored are views of that
    mapping: a page read once stays resident while any weight of the file still views it, so a float32 weight
    replaced by its bfloat16 copy would keep its memory. A dropped page of a file mapping is read from the file
    again if something reads it; anonymous memory is left alone."""
    maps = "/proc/self/maps"
    if not os.path.exists(maps):
        return 0
    regions = []
    with open(maps) as lines:
        for line in lines:
            fields = line.split(maxsplit=5)  # address range, permissions, offset, device, inode, path
            if len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                regions.append((start, end))
    page = os.sysconf("SC_PAGE_SIZE")
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for tensor in tensors:
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        in_file = any(start <= begin and end <= stop for start, stop in regions)
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or not in_file:
            continue
        first, last = -(-begin // page) * page, end // page * page  # the pages the tensor covers whole
        if last > first and madvise(first, last - first, MADV_DONTNEED) == 0:
            dropped += last - first
    return dropped


def _autocast_forward(forward: Callable, device_type: str, dtype: torch.dtype) -> Callable:
    """`forward` inside autocast. The context ends with the call: autocast keeps its float32 -> bfloat16 casts of
    trained weights until it exits, and they must not outlive an optimizer step."""

    @functools.wraps(forward)
    def run(*args: object, **kwargs: object) -> object:
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    return run


def compile_decoder_layers(bodies: Iterable[nn.Module]) -> None:
    """Run each decoder layer of each body (a transformers decoder with a `layers` list) through `torch.compile`,
    except when it is called with a key-value cache (generation, whose shapes change with every new token). A body
    shared by several roles is wrapped once.

    One compiled graph serves every layer of a body (their code is the same; the weights are the graph's inputs);
    a new graph is compiled for each adapter state (policy, value, disabled for the reference), gradient mode and,
    once shapes vary, for dynamic shapes. That is more than torch's default limit of 8 graphs per function, past
    which it would fall back to eager without an error, so the limit is raised."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for body in bodies:
        if getattr(body, "layers_compiled", False):
            continue
        layers = getattr(body, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"compile_layers: {type(body).__name__} has no `layers` list of decoder layers to "
                             "compile; set compile_layers: false.")
        for layer in layers:
            layer.forward = _compiled_outside_generation(layer.forward)
        body.layers_compiled = True


def _compiled_outside_generation(forward: Callable) -> Callable:
    """`forward` compiled, and as it is for a call with a key-value cache (transformers passes `use_cache=True` and
    the cache while generating; `cache` or `past_key_values` by version)."""
    compiled = torch.compile(forward)

    @functools.wraps(forward)
    def run(*args: object, **kwargs: object) -> object:
        generating = kwargs.get("use_cache") or any(
            kwargs.get(name) is not None for name in ("cache", "past_key_values", "past_key_value"))
        return (forward if generating else compiled)(*args, **kwargs)

    return run


Loaded = TypeVar("Loaded")


class ModelLoadError(ValueError):
    """A model or tokenizer named in the config cannot be loaded (no such directory, not on the hub, no network)."""


def load_pretrained(load: Callable[..., Loaded], name: str, field: str, **kwargs: object) -> Loaded:
    """`load(name, **kwargs)` (a `from_pretrained`), with a failure to find or fetch `name` turned into one line
    that names the config `field`, the value, what was tried and what to do (a ModelLoadError)."""
    try:
        return load(name, **kwargs)
    # OSError: transformers' and huggingface_hub's errors for missing files, repositories and networks; ValueError:
    # a folder that holds no model or tokenizer files, an unknown model type.
    except (OSError, ValueError) as error:
        raise ModelLoadError(cannot_load(field, name, error)) from error


def cannot_load(field: str, name: str, error: BaseException) -> str:
    """The one-line message of a model `name` that `from_pretrained` could not load."""
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)[:200]
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        tried = f"the local directory {os.path.abspath(path)} holds no loadable model or tokenizer ({reason})"
        fix = "point it at a directory written by save_pretrained (config.json, the weights, the tokenizer files)"
    elif name.startswith(("/", ".", "~")) or name.count("/") > 1:
        tried = f"no directory {os.path.abspath(path)} exists (relative paths start from {os.getcwd()})"
        fix = "correct the path"
    else:
        tried = f"it is no local directory, and the Hugging Face Hub did not provide it ({reason})"
        fix = ("check the name for a typo; for a gated model, accept its terms and log in (`hf auth login`); without "
               "hub access, download it on a machine that has it and give the local directory (`ppo-lm demo` needs "
               "no download)")
    return f"{field}={name!r} cannot be loaded: {tried}. To fix it: {fix}."


def load_tokenizer(name: str, field: str = "model_name") -> PreTrainedTokenizerBase:
    """Load a tokenizer (`field` names the config field in errors); without a pad token, EOS pads (safe here: masks
    are explicit, never read from ids)."""
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, field)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The tokenizer of {name!r} has no EOS token; PPO needs one to end responses.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def body_autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype `autocast_bodies` runs this model's body in, or None when the body is not autocast."""
    return getattr(backbone_of(model), "autocast_dtype", None)


def score_head_of(model: PreTrainedModel) -> nn.Module:
    """The scalar head of a sequence-classification model (`score` in decoder models)."""
    head = getattr(model, "score", None)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no `score` head; use a decoder sequence-classification model "
            "(e.g. LlamaForSequenceClassification, Qwen3ForSequenceClassification)."
        )
    return head


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpoints), by the method name of the
    installed transformers: `activation_checkpointing_enable`, or `gradient_checkpointing_enable` in older 5.x."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def lora_config(config: TrainConfig, modules_to_save: list[str] | None = None,
                target_modules: list[str] | None = None) -> LoraConfig:
    """The LoRA settings of a run's config; `modules_to_save` are trained in full beside it (e.g. a scalar head).
    `target_modules`: the adapted modules by their full names, instead of the config's choice of modules and
    layers."""
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules or config.lora_target_modules or "all-linear",
        layers_to_transform=None if target_modules else config.lora_layers,
        bias="none",
        modules_to_save=modules_to_save,
    )


class LoraUpProjection(nn.Linear):
    """A LoRA adapter's up-projection B (rank -> out) that can add its scaled product to the base layer's output in
    one `addmm`. Called as `B(down, base_output, scaling)`, it returns `base_output + scaling * down @ B^T` (in
    `down`'s dtype) without the `[tokens, out]` product, its scaled copy and the sum that peft makes of them; called
    with `down` alone, it is the plain linear layer peft's own paths (merging, mixed batches) expect. Being the
    module itself, its hooks (ZeRO-3 gathering its weight) run around the fused call too."""

    def forward(self, down: torch.Tensor, base_output: torch.Tensor | None = None,  # type: ignore[override]
                scaling: float = 1.0) -> torch.Tensor:
        if base_output is None:
            return super().forward(down)
        out = torch.addmm(base_output.flatten(0, -2), down.flatten(0, -2), self.weight.t(), alpha=scaling)
        return out.view(*base_output.shape[:-1], self.out_features)


class FusedLoraLinear(LoraLinear):
    """peft's LoRA linear layer whose single active adapter adds its up-projection to the base output in one
    `addmm` (`LoraUpProjection`): the same sum, rounded once instead of three times, with the scale folded into the
    product's backward too. Any other case (adapters off or merged, several active, a LoRA variant such as DoRA, a
    bias on B, extra arguments) runs peft's own forward."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        active = [name for name in self.active_adapters if name in self.lora_A]
        if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
                or active[0] in self.lora_variant or not isinstance(self.lora_B[active[0]], LoraUpProjection)
                or self.lora_B[active[0]].bias is not None):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        result = self.base_layer(x)
        result_dtype = result.dtype
        down = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
        if not torch.is_autocast_enabled(down.device.type):
            # peft's sum promotes a bfloat16 base output to a float32 adapter's dtype, then casts back: the same here.
            result = result.to(down.dtype)
        return self.lora_B[name](down, result, self.scaling[name]).to(result_dtype)


def fuse_lora_layers(model: nn.Module) -> int:
    """Turn `model`'s peft LoRA linear layers into `FusedLoraLinear` (their up-projections into `LoraUpProjection`),
    in place: same parameters, state dict and adapters, fewer passes over the layer's output. Returns how many layers
    changed."""
    changed = 0
    for layer in model.modules():
        if type(layer) is LoraLinear:
            layer.__class__ = FusedLoraLinear
            changed += 1
        if isinstance(layer, FusedLoraLinear):
            for up in layer.lora_B.values():
                if type(up) is nn.Linear:
                    up.__class__ = LoraUpProjection
    return changed


def top_layers_start(model: nn.Module, layers: int) -> int:
    """The index of the lowest of `model`'s top `layers` decoder layers; a clear error when it has fewer."""
    count = len(backbone_of(model).layers)
    if layers > count:
        raise ValueError(f"value_layers is {layers}, but {type(model).__name__} has {count} decoder layers; set "
                         f"value_layers to at most {count}, or None to train every layer.")
    return count - layers


def top_layer_linear_names(model: nn.Module, layers: int, target_modules: list[str] | None) -> list[str]:
    """Full names of the linear layers inside `model`'s top `layers` decoder layers (only those whose own name is in
    `target_modules`, when given): where a LoRA adapter on those layers only goes."""
    decoder = backbone_of(model)
    inside = {id(module) for layer in decoder.layers[top_layers_start(model, layers):] for module in layer.modules()
              if isinstance(module, nn.Linear)}
    names = [name for name, module in model.named_modules() if id(module) in inside
             and (target_modules is None or name.rsplit(".", 1)[-1] in target_modules)]
    if not names:
        raise ValueError(f"value_layers: no linear layer named in lora_target_modules ({target_modules}) in the top "
                         f"{layers} decoder layers of {type(model).__name__}.")
    return names


def freeze_below_top_layers(model: nn.Module, layers: int) -> None:
    """Freeze the embeddings and every decoder layer of `model`'s body below its top `layers`: they then compute the
    same hidden states in every pass."""
    decoder = backbone_of(model)
    start = top_layers_start(model, layers)
    for module in [decoder.get_input_embeddings(), *decoder.layers[:start]]:
        module.requires_grad_(False)


def init_scalar_head(head: nn.Linear) -> None:
    """Initialise a scalar head as the N+ implementation details do: normal with std 1/sqrt(hidden+1), bias 0."""
    nn.init.normal_(head.weight, std=1.0 / (head.in_features + 1) ** 0.5)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


@dataclass
class RoleModels:
    """The policy, reference, value and reward models of one PPO run, and how to switch between them."""

    policy: nn.Module
    """Causal LM being trained (a PeftModel with the policy adapter 'default' and, when shared, 'value')."""
    reference: nn.Module | None
    """Separate frozen reference, or None: the policy with its adapter disabled."""
    value_backbone: nn.Module | None
    """Transformer body that computes the value model's hidden states; None without a value model."""
    value_head: nn.Module | None
    """Linear map from a hidden state to a scalar value; None without a value model."""
    value_adapter_on_policy: bool
    """True when the value model is the 'value' adapter on the policy's base (switching adapters is needed)."""
    value_on_policy_body: bool
    """True when the value body is the policy's own body: through the 'value' adapter, or as it is
    (`shared_value_trunk`, where the value model is only a head)."""
    reward_model: nn.Module | None
    """Frozen sequence-classification reward model, or None when a reward function scores."""
    checkpointed: list[nn.Module]
    """Models with gradient checkpointing, put in training mode (their dropout zeroed) for gradient passes."""
    fused_head: bool = False
    """Whether the policy's and the reference's logprobs come through `head_token_logprobs` (their logits are their
    head on their body's last hidden state, checked at load)."""
    packed: bool = False
    """Whether the rollout's and the update's passes run packed rows (`PPOConfig.pack_sequences`, resolved at load by
    `resolve_packing`)."""
    packing_declined: str | None = None
    """Why `pack_sequences: auto` left the passes padded, in words; None when they are packed or packing is off."""

    def held(self) -> list[nn.Module]:
        """The models a launch backend holds (places, gathers): every role but the reward model."""
        return [m for m in (self.policy, self.reference, self.value_backbone, self.value_head) if m is not None]

    @property
    def value_root(self) -> nn.Module:
        """The model whose forward pass the value body is part of: the policy when the value model is its adapter
        or a head on its body, else the value body itself. The value pass calls the body directly, not this model's
        forward."""
        return self.policy if self.value_on_policy_body else self.value_backbone

    @contextlib.contextmanager
    def gradient_mode(self) -> Iterator[None]:
        """Inside: the models with gradient checkpointing are in training mode, which turns it on."""
        for model in self.checkpointed:
            model.train()
        try:
            yield
        finally:
            for model in self.checkpointed:
                model.eval()

    def policy_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the policy (its adapter, or all weights in full fine-tuning)."""
        if self.value_adapter_on_policy:
            return [p for n, p in self.policy.named_parameters() if f".{POLICY_ADAPTER}." in n]
        return [p for p in self.policy.parameters() if p.requires_grad]

    def value_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the value model (its adapter or backbone, and its head); none without one."""
        if self.value_head is None:
            return []
        if self.value_adapter_on_policy:
            body = [p for n, p in self.policy.named_parameters() if f".{VALUE_ADAPTER}." in n]
        elif self.value_on_policy_body:  # the shared trunk's weights are the policy's
            body = []
        else:
            body = [p for p in self.value_backbone.parameters() if p.requires_grad]
        head = [p for p in self.value_head.parameters() if id(p) not in {id(q) for q in body}]
        return body + head

    def trained_modules(self) -> dict[str, nn.Module]:
        """The models that hold trained weights, by role, each once: what the launch backend prepares."""
        modules = {"policy": self.policy}
        if self.value_head is not None:
            modules["value_head"] = self.value_head
            if not self.value_on_policy_body:
                modules["value_backbone"] = self.value_backbone
        return modules

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Every trained tensor by a stable name: `policy.*`, and with a value model `value.*` and `value_head.*`."""
        policy_ids = {id(p) for p in self.policy_parameters()}
        named = {f"policy.{n}": p for n, p in self.policy.named_parameters() if id(p) in policy_ids}
        if self.value_head is None:
            return named
        value_ids = {id(p) for p in self.value_parameters()}
        value_body = self.policy if self.value_on_policy_body else self.value_backbone
        named.update({f"value.{n}": p for n, p in value_body.named_parameters() if id(p) in value_ids})
        named.update({f"value_head.{n}": p for n, p in self.value_head.named_parameters()})
        return named

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """Yield the model that computes reference logprobs."""
        if self.reference is not None:
            yield self.reference
            return
        # The tuner's own switch rather than `PeftModel.disable_adapter`, which first reads every layer's status: a
        # walk that costs more than the switch (benchmarks/adapter_switch.py).
        tuner = self.policy.base_model
        tuner.disable_adapter_layers()
        try:
            yield self.policy
        finally:
            tuner.enable_adapter_layers()
            self.keep_adapters_trainable()

    @contextlib.contextmanager
    def value_mode(self) -> Iterator[None]:
        """Make the value adapter the active one while inside; the policy adapter is active again after."""
        if not self.value_adapter_on_policy:
            yield
            return
        self.policy.set_adapter(VALUE_ADAPTER)
        self.keep_adapters_trainable()
        try:
            yield
        finally:
            self.policy.set_adapter(POLICY_ADAPTER)
            self.keep_adapters_trainable()

    def keep_adapters_trainable(self) -> None:
        """Turn requires_grad back on for both adapters after peft switched adapters (it turns off the inactive
        one's). An inactive adapter takes no part in a forward pass, so it gets no gradient either way; but a sharding
        backend copies requires_grad only when it gathers a layer, so it must not change between passes."""
        for adapter in self._adapter_weights:
            adapter.requires_grad_(True)

    @functools.cached_property
    def _adapter_weights(self) -> list[nn.Module | nn.Parameter]:
        """The policy's LoRA weights of both adapters, when the value adapter is on it (else none), found once: the
        modules stay the same objects when a sharding backend swaps their parameters."""
        if not self.value_adapter_on_policy:
            return []
        return [weights[name] for layer in self.policy.modules() if isinstance(layer, BaseTunerLayer)
                for attribute in layer.adapter_layer_names for name in (POLICY_ADAPTER, VALUE_ADAPTER)
                if name in (weights := getattr(layer, attribute))]


def load_role_models(config: PPOConfig, device: torch.device, dtype: torch.dtype,
                     load_device: torch.device | None = None, store_frozen: bool = True,
                     gradients_in_place: bool = True) -> RoleModels:
    """Build the roles from the config: one base with LoRA adapters unless separate models are named, and no value
    model when the advantage estimator needs none (`PPOConfig.needs_value_model`).

    The reward model goes to `device`; the others to `load_device` (default `device`), where the launch backend
    wants them before it places them (a sharding backend keeps them on the CPU). `store_frozen`: autocast bodies
    store their frozen linear weights in the autocast dtype (`store_frozen_linear_weights`). `gradients_in_place`:
    the trained models' vocabulary-sized weights add their gradients in place
    (`add_vocabulary_gradients_in_place`)."""
    base = load_pretrained(AutoModelForCausalLM.from_pretrained, config.model_name, "model_name", dtype=dtype)
    hidden_size = base.config.hidden_size

    reference = None
    if config.ref_model_name is not None or not config.use_lora:
        reference = _freeze(load_pretrained(AutoModelForCausalLM.from_pretrained,
                                            config.ref_model_name or config.model_name,
                                            "ref_model_name" if config.ref_model_name else "model_name", dtype=dtype))

    with_values = config.needs_value_model
    value_adapter_on_policy = (with_values and config.use_lora and config.value_model_name is None
                               and not config.shared_value_trunk)
    value_on_policy_body = value_adapter_on_policy or config.value_head_on_policy
    if config.use_lora:
        value_lora = value_lora_config(config, base)  # module names from the base, before peft wraps them
        policy = get_peft_model(base, lora_config(config), adapter_name=POLICY_ADAPTER)
        if value_adapter_on_policy:
            policy.add_adapter(VALUE_ADAPTER, value_lora)
        policy.set_adapter(POLICY_ADAPTER)
    else:
        policy = base

    # Whether logprobs may come through `head_token_logprobs`; a separately loaded reference may be of another
    # architecture.
    fused_head = all(fused_head_reproduces_logprobs(model) for model in (policy, reference) if model is not None)
    if not fused_head:
        logger.info("%s does not compute its logits as its output head on its body's last hidden state: logprobs "
                    "come from its own forward pass, with its whole logits in memory.", type(base).__name__)
    value_backbone = value_head = None
    if not with_values:
        pass
    elif config.value_model_name is not None:
        # A separate value model, e.g. the reward model: its classifier head starts the value head.
        value_model = load_pretrained(AutoModelForSequenceClassification.from_pretrained, config.value_model_name,
                                      "value_model_name", num_labels=1, dtype=dtype)
        value_head = score_head_of(value_model)
        if config.use_lora:
            value_model = get_peft_model(value_model, value_lora_config(config, value_model),
                                         adapter_name=VALUE_ADAPTER)
            value_head.requires_grad_(True)
        elif config.value_layers is not None:
            freeze_below_top_layers(value_model, config.value_layers)
        value_backbone = backbone_of(value_model)
    elif value_on_policy_body:
        if config.value_head_on_policy and not head_reads_last_hidden_state(policy):
            raise ValueError(f"shared_value_trunk: {type(base).__name__} does not compute its logits as its output "
                             "head on its body's last hidden state, which the shared trunk relies on; set "
                             "shared_value_trunk: false.")
        value_backbone = backbone_of(policy)
        value_head = nn.Linear(hidden_size, 1)
    else:
        value_backbone = load_pretrained(AutoModel.from_pretrained, config.model_name, "model_name", dtype=dtype)
        if config.value_layers is not None:
            freeze_below_top_layers(value_backbone, config.value_layers)
        value_head = nn.Linear(hidden_size, 1)
    if isinstance(value_head, nn.Linear) and config.value_model_name is None:
        init_scalar_head(value_head)
    if value_head is not None:
        value_head = value_head.to(torch.float32)

    reward_model = None
    if config.reward_model_name is not None:
        reward_model = _freeze(load_pretrained(AutoModelForSequenceClassification.from_pretrained,
                                               config.reward_model_name, "reward_model_name", num_labels=1,
                                               dtype=dtype))
        reward_model.to(device)

    # Dropout off everywhere: PPO's ratio and the KL are only meaningful between deterministic forward passes.
    trained = [policy] if value_backbone is None or value_on_policy_body else [policy, value_backbone]
    for module in (policy, value_backbone, value_head, reference):
        if module is not None:
            module.eval()
            module.to(load_device or device)
    if config.gradient_checkpointing:
        # transformers checkpoints only in training mode: zero every dropout so that mode changes nothing else.
        for model in trained:
            enable_activation_checkpointing(model)
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
    bodies = {id(body): body for body in map(backbone_of, filter(None, (policy, reference, value_backbone)))}
    packed, packing_declined = resolve_packing(config.pack_sequences, list(bodies.values()), device, dtype,
                                               config.compile_layers)
    models = RoleModels(policy, reference, value_backbone, value_head, value_adapter_on_policy, value_on_policy_body,
                        reward_model, trained if config.gradient_checkpointing else [], fused_head, packed,
                        packing_declined)
    models.keep_adapters_trainable()  # set_adapter turned the value adapter's requires_grad off
    for model in (policy, value_backbone):
        if model is not None:
            fuse_lora_layers(model)
            if gradients_in_place:
                add_vocabulary_gradients_in_place(model)
    autocast_bodies([policy, reference, value_backbone, reward_model], device,
                    autocast_dtype(config.mixed_precision, device, dtype), store_frozen)
    if config.compile_layers:
        compile_decoder_layers(backbone_of(model) for model in (policy, reference, value_backbone) if model is not None)
    return models


def value_lora_config(config: PPOConfig, model: nn.Module) -> LoraConfig:
    """The value adapter's LoRA settings for `model`: the policy's, on its top `value_layers` decoder layers only when
    that is set."""
    if config.value_layers is None:
        return lora_config(config)
    return lora_config(config, target_modules=top_layer_linear_names(model, config.value_layers,
                                                                     config.lora_target_modules))


def value_frozen_layers(config: PPOConfig, models: RoleModels, below: int) -> int:
    """How many bottom decoder layers of the value body compute the same hidden states in every value pass of a PPO
    step (those below its top `value_layers`), when that is more than the `below` layers every role shares; else 0.

    Used only if starting the value body from their output was checked to give the same values as a whole pass."""
    if not (config.cache_frozen_layers and config.value_layers is not None and models.value_backbone is not None):
        return 0
    start = top_layers_start(models.value_backbone, config.value_layers)
    if start <= below:
        return 0
    with models.value_mode():
        if not _prefix_reproduces_forward(models.value_backbone, start, response_hidden_states):
            logger.warning("value_layers: starting the value body from its layer %d's input does not reproduce a "
                           "whole pass; every value pass runs every layer.", start)
            return 0
    return start


def shared_frozen_layers(config: PPOConfig, models: RoleModels) -> int:
    """How many bottom decoder layers compute the same hidden states in every pass of a PPO step, 0 if none.

    Those are the layers below the lowest LoRA layer, when the reference is the policy with its adapters off and the
    value model (if any) an adapter or a head on it. The count is used only if starting a pass from their output was
    checked to give the same logprobs as a whole forward pass (an architecture that rescales `inputs_embeds` would
    not).
    """
    if not (config.cache_frozen_layers and config.lora_layers and models.reference is None
            and (models.value_on_policy_body or models.value_head is None)):
        return 0
    decoder = backbone_of(models.policy)
    if not (isinstance(getattr(decoder, "layers", None), nn.ModuleList) and hasattr(decoder, "norm")):
        logger.info("cache_frozen_layers: %s has no `layers` and `norm` to split; every pass runs every layer.",
                    type(decoder).__name__)
        return 0
    layers = min(config.lora_layers)
    if layers and not _prefix_reproduces_forward(models.policy, layers):
        logger.warning("cache_frozen_layers: starting %s from its layer %d's input does not reproduce a whole "
                       "forward pass; every pass runs every layer.", type(decoder).__name__, layers)
        return 0
    return layers


def _prefix_reproduces_forward(model: nn.Module, layers: int,
                               read: Callable[[nn.Module, SequenceBatch], torch.Tensor] | None = None) -> bool:
    """Whether what `read` gives (default: the logprobs) from the cached output of the bottom `layers` matches a whole
    pass, on two short rows."""
    read = read or (lambda model, batch: sequence_logprobs(model, batch, temperature=1.0)[0])
    device = next(model.parameters()).device
    input_ids = torch.arange(2, 14, device=device).reshape(2, 6)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 0] = 0
    batch = SequenceBatch(input_ids, attention_mask, prompt_width=3)
    with torch.no_grad():
        whole = read(model, batch)
        cached = replace(batch, prefix_hidden=prefix_hidden_states(model, batch, layers, None), prefix_layers=layers)
        split = read(model, cached)
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return torch.allclose(whole, split, atol=tolerance, rtol=0)


@contextlib.contextmanager
def decoder_layers(decoder: nn.Module, start: int, stop: int | None = None) -> Iterator[None]:
    """Inside, `decoder` runs only its `layers[start:stop]`, and no final norm when `stop` leaves layers out.

    Given the hidden states that enter layer `start` as `inputs_embeds`, it computes what the whole decoder does.
    """
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(list(layers)[start:stop])
    if stop is not None:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def prefix_hidden_states(
    model: nn.Module, batch: SequenceBatch, layers: int, micro_batch_size: int | None
) -> torch.Tensor:
    """Hidden states entering decoder layer `layers` at every position, `[batch, length, hidden]`, without gradients,
    `micro_batch_size` rows at a time (None: all); from the batch's own cached prefix when it has one."""
    decoder = backbone_of(model)
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    start = 0 if batch.prefix_hidden is None else batch.prefix_layers

    def inputs(part: torch.Tensor) -> dict[str, torch.Tensor]:
        if batch.prefix_hidden is None:
            return {"input_ids": batch.input_ids[part]}
        return {"inputs_embeds": batch.prefix_hidden[part]}

    with torch.no_grad(), decoder_layers(decoder, start, layers):
        return torch.cat([
            decoder(**inputs(part), attention_mask=batch.attention_mask[part],
                    position_ids=position_ids_from_mask(batch.attention_mask[part]), use_cache=False).last_hidden_state
            for part in rows.split(micro_batch_size or len(rows))
        ])


@contextlib.contextmanager
def forward_inputs(model: nn.Module, batch: SequenceBatch) -> Iterator[dict[str, torch.Tensor]]:
    """What a forward pass over `batch` starts from: its token ids, or the cached output of its frozen bottom layers
    (which are then skipped while inside), with its attention mask and position ids; for a packed batch, its real
    tokens in one row with what `varlen_attention` reads (and the model attends through it while inside)."""
    start = ({"input_ids": batch.input_ids} if batch.prefix_hidden is None
             else {"inputs_embeds": batch.prefix_hidden})
    with contextlib.ExitStack() as stack:
        if batch.prefix_hidden is not None:
            stack.enter_context(decoder_layers(backbone_of(model), batch.prefix_layers))
        if not batch.packed:
            yield {**start, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
            return
        layout = batch.pack_layout
        stack.enter_context(packed_attention(backbone_of(model)))
        yield {**{name: value[layout.real].unsqueeze(0) for name, value in start.items()},
               "position_ids": layout.position_ids, "cu_seq_lens_q": layout.cu_seq_lens,
               "max_length_q": layout.max_length}


def response_logits(model: nn.Module, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """Logits divided by the temperature at each position that predicts a response token, `[batch, response, vocab]`
    (float32). Only those positions go through the output head."""
    if batch.packed:  # the head reads the packed row at each response position, as a flat list of positions
        keep = batch.pack_layout.response_index
    else:
        keep = torch.arange(batch.prompt_width - 1, batch.input_ids.shape[1] - 1, device=batch.input_ids.device)
    with forward_inputs(model, batch) as inputs:
        logits = model(**inputs, logits_to_keep=keep.flatten(), use_cache=False).logits.float()
    return _divided(logits.view(*batch.responses.shape, -1), temperature)


def _divided(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by the temperature; x / 1.0 is x exactly, so the default temperature skips a pass over
    `[rows, response, vocab]` floats."""
    return logits if temperature == 1.0 else logits / temperature


def _logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool, entropy_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens' logprobs and, with `with_entropy`, each position's entropy (differentiable with `entropy_grad`)."""
    entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) if with_entropy else None
    return token_logprobs(logits, tokens), entropy


class HeadTokenLogprobs(torch.autograd.Function):
    """log softmax(head(hidden) / temperature)[token] at each position, holding one `[vocab, positions]` float32
    tensor between the forward and backward passes instead of the three that the plain path makes (the head's
    logits, `cross_entropy`'s saved log-softmax and its backward's gradient: about 0.24 GiB each for 400 positions
    of a 151,936-token vocabulary).

    The logits are laid out vocabulary-major, `weight @ hidden.T`: the same sums as `F.linear`, but on the CPU's
    BLAS the product with the few dozen positions as its narrow right side ran 1.1x to 1.7x faster than with them as
    its narrow left side (benchmarks/RESULTS.md, session 35), and the softmax's reductions run down the columns.
    Forward: the logits, shifted by their column maximum and exponentiated in place. That is all the backward pass
    needs (the softmax is it over its column sum), so nothing else is kept. Backward: the gradient of the logits,
    `grad x (onehot - softmax) / temperature`, is written into the same tensor and goes back through the head's
    product. With `with_entropy`, the second output is each position's entropy (not differentiable), from the
    shifted logits before they are overwritten; otherwise it is empty. The plain path (`response_logits`, then
    `token_logprobs`) gives the same numbers to float32 rounding; a test holds them together. One backward pass
    only: it overwrites what it saved. A weight marked by `add_vocabulary_gradients_in_place` gets its gradient
    added into its `.grad` by the product itself (`addmm_`) once that exists.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, tokens: torch.Tensor, temperature: float, with_entropy: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        product = weight @ hidden.T if bias is None else torch.addmm(bias[:, None], weight, hidden.T)
        logits = product.float()  # [vocab, positions], our own tensor: changed in place
        if temperature != 1.0:
            logits.div_(temperature)
        chosen = logits.gather(0, tokens[None]).squeeze(0)
        top = logits.amax(0, keepdim=True)
        shifted = logits.sub_(top)
        entropy = _entropy_then_exp_(shifted) if with_entropy else shifted.new_empty(0)
        exp_shifted = shifted if with_entropy else shifted.exp_()
        total = exp_shifted.sum(0)
        ctx.save_for_backward(hidden, weight, tokens, exp_shifted, total)
        ctx.temperature, ctx.has_bias, ctx.used = temperature, bias is not None, False
        ctx.mark_non_differentiable(entropy)
        return chosen - top.squeeze(0) - total.log(), entropy

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("HeadTokenLogprobs runs one backward pass only (its saved tensor becomes the gradient).")
        ctx.used = True
        hidden, weight, tokens, exp_shifted, total = ctx.saved_tensors
        scale = grad / ctx.temperature  # d logprob / d logits = (onehot - softmax) / temperature
        grad_logits = exp_shifted.mul_((-scale / total)[None])  # [vocab, positions]
        grad_logits.scatter_add_(0, tokens[None], scale[None])
        grad_logits = grad_logits.to(weight.dtype)
        grad_hidden = grad_logits.T @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1] and adds_gradient_in_place(weight):
            weight.grad.addmm_(grad_logits, hidden)
        elif ctx.needs_input_grad[1]:
            grad_weight = grad_logits @ hidden
        grad_bias = grad_logits.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


GRADIENT_IN_PLACE = "_ppo_lm_gradient_in_place"
"""The attribute that marks a parameter whose gradient `HeadTokenLogprobs` and `EmbeddingLookup` add into its
`.grad` themselves (`add_vocabulary_gradients_in_place`)."""


def add_vocabulary_gradients_in_place(model: nn.Module) -> int:
    """Let the backward passes of `model`'s trained input embeddings and output head add their weight's gradient
    into the weight's existing `.grad`, rather than hand autograd a new vocabulary-sized tensor to add; returns how
    many weights it marked.

    Autograd adds each gradient into `.grad` from a fresh tensor of the weight's shape: for a 151,936 x 512 head or
    embedding that is 0.29 GiB allocated, page-faulted in, written and added per micro-batch and per use, where the
    embedding's rows touched are a few hundred (an `index_add_`) and the head's product can write into `.grad` itself
    (an `addmm_`). The first micro-batch after the gradients are cleared still goes through autograd (there is no
    `.grad` yet). The sums are the same, added in another order: float32 rounding apart, the same gradients. Only
    for whole weights whose accumulation nothing else hooks (`Backend.can_add_gradients_in_place`)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    marked = []
    plain_embedding = (isinstance(embedding, nn.Embedding) and embedding.max_norm is None
                       and not embedding.scale_grad_by_freq and not embedding.sparse)
    if plain_embedding and embedding.weight.requires_grad:
        embedding.forward = functools.partial(_embedding_lookup, embedding)
        marked.append(embedding.weight)
    if isinstance(head, nn.Linear) and head.weight.requires_grad:
        marked.append(head.weight)  # a tied head's weight is the embedding's
    for weight in marked:
        setattr(weight, GRADIENT_IN_PLACE, True)
    return len({id(weight) for weight in marked})


def adds_gradient_in_place(weight: torch.Tensor) -> bool:
    """Whether a backward pass now adds `weight`'s gradient into its `.grad` itself: it is marked
    (`add_vocabulary_gradients_in_place`) and on the CPU, its `.grad` exists as a plain tensor of its dtype, and the
    backward pass builds no graph of its own. On the CPU fresh pages are the cost this saves; a GPU's caching
    allocator reuses its memory, and its `index_add_` adds repeated rows in no fixed order (autograd's embedding
    gradient there is deterministic), so a GPU keeps autograd's way."""
    grad = weight.grad
    return (getattr(weight, GRADIENT_IN_PLACE, False) and weight.device.type == "cpu" and grad is not None
            and grad.layout == torch.strided and grad.dtype == weight.dtype and grad.is_contiguous()
            and not torch.is_grad_enabled())


def _embedding_lookup(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and embedding.weight.requires_grad:
        return EmbeddingLookup.apply(ids, embedding.weight, embedding.padding_idx)
    return F.embedding(ids, embedding.weight, embedding.padding_idx)


class EmbeddingLookup(torch.autograd.Function):
    """`F.embedding`'s rows, whose backward pass adds the rows' gradients into the weight's `.grad` with one
    `index_add_` once that exists (`adds_gradient_in_place`), instead of a dense vocabulary-sized gradient for
    autograd to add. The padding row gets no gradient either way, as in `nn.Embedding`."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, ids: torch.Tensor, weight: torch.Tensor,
                padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ids, weight = ctx.saved_tensors
        padding_idx = -1 if ctx.padding_idx is None else ctx.padding_idx
        if not adds_gradient_in_place(weight):
            return None, torch.ops.aten.embedding_dense_backward(grad, ids, weight.shape[0], padding_idx, False), None
        rows, values = ids.flatten(), grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        if ctx.padding_idx is not None:
            kept = rows != padding_idx
            rows, values = rows[kept], values[kept]
        weight.grad.index_add_(0, rows, values)
        return None, None, None


def _entropy_then_exp_(shifted: torch.Tensor, chunk_elements: int = 2**23) -> torch.Tensor:
    """Each column's entropy from vocabulary-major logits shifted by their column maximum (`[vocab, positions]`),
    `log Z - sum(exp(s) s) / Z` with `Z = sum(exp(s))`; `shifted` is left holding `exp(s)`. A block of the
    vocabulary at a time (about `chunk_elements` values), so that the exponentials need no second
    `[vocab, positions]` tensor."""
    vocab, positions = shifted.shape
    total, weighted = shifted.new_zeros(positions), shifted.new_zeros(positions)
    step = max(1, chunk_elements // positions)
    for start in range(0, vocab, step):
        part = shifted[start : start + step]
        exp_part = part.exp()
        total += exp_part.sum(0)
        weighted += torch.linalg.vecdot(exp_part, part, dim=0)
        part.copy_(exp_part)
    return total.log() - weighted / total


def head_token_logprobs(model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens' logprobs (`[batch, response]`) from the body's hidden states at the positions that predict them
    (`[batch, response, hidden]`), through the model's output head by `HeadTokenLogprobs`; with `with_entropy`,
    also each position's entropy (no gradient).

    It runs as the head module's forward, so that a launch backend that gathers each module's weights around its
    forward (ZeRO-3) gathers the head's here too.
    """
    head = model.get_output_embeddings()

    def forward(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return HeadTokenLogprobs.apply(states, head.weight, head.bias, tokens.flatten(), temperature, with_entropy)

    with _forward_replaced(head, forward):
        logprobs, entropy = head(hidden.flatten(0, 1))
    return logprobs.view_as(tokens), entropy.view_as(tokens) if with_entropy else None


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Inside, calling `module` runs `forward`, with the module's hooks around it as around its own."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position, `[batch, response]`: PyTorch's fused cross-entropy, whose
    backward is one pass over the logits (about 1.6x faster than a gather minus logsumexp over a 151k vocabulary on
    this project's CPU, the same values to float32 rounding)."""
    return -F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view_as(tokens)


def sequence_logprobs(
    model: nn.Module,
    batch: SequenceBatch,
    temperature: float,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    fused_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each response token under `model` (logits divided by the temperature), `[batch, response]`.

    With `with_entropy`, also the entropy of the model's next-token distribution at each response position
    (differentiable only with `entropy_grad`). `fused_head`: through `head_token_logprobs` (the same numbers in a
    third of the memory), for a model where that was checked to match its own forward pass
    (`fused_head_reproduces_logprobs`) and no entropy gradient; otherwise the model's own forward pass.
    """
    if fused_head and not entropy_grad:
        return head_token_logprobs(model, response_hidden_states(backbone_of(model), batch), batch.responses,
                                   temperature, with_entropy)
    return _logprobs_and_entropy(response_logits(model, batch, temperature), batch.responses, with_entropy,
                                 entropy_grad)


def last_hidden_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the transformer body, `[batch, length, hidden]`, for any padding side."""
    return backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


def sequence_values(backbone: nn.Module, head: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Value of the state before each response token (read where that token is predicted), `[batch, response]`."""
    hidden = response_hidden_states(backbone, batch)
    return head(hidden.to(head.weight.dtype)).squeeze(-1)


def response_hidden_states(backbone: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """The body's final hidden states at each position that predicts a response token, `[batch, response, hidden]`."""
    with forward_inputs(backbone, batch) as inputs:
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return hidden[0, batch.pack_layout.response_index] if batch.packed else hidden[:, batch.prompt_width - 1:-1]


def policy_logprobs_and_values(
    model: nn.Module,
    value_head: nn.Module,
    batch: SequenceBatch,
    temperature: float,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    fused_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`sequence_logprobs` and `sequence_values` of a shared value trunk from one pass of the policy's body: the
    output head and the value head read the same final hidden states. Returns (logprobs, entropy or None, values),
    each `[batch, response]`. `fused_head` as in `sequence_logprobs`."""
    hidden = response_hidden_states(backbone_of(model), batch)
    if fused_head and not entropy_grad:
        logprobs, entropy = head_token_logprobs(model, hidden, batch.responses, temperature, with_entropy)
    else:
        logits = _divided(model.get_output_embeddings()(hidden).float(), temperature)
        logprobs, entropy = _logprobs_and_entropy(logits, batch.responses, with_entropy, entropy_grad)
    return logprobs, entropy, value_head(hidden.to(value_head.weight.dtype)).squeeze(-1)


def resolve_packing(setting: str, bodies: list[nn.Module], device: torch.device, dtype: torch.dtype,
                    compile_layers: bool) -> tuple[bool, str | None]:
    """Whether passes run packed rows, for `PPOConfig.pack_sequences` (`setting`), the run's `device` and `dtype`
    and the bodies that run them, and why not when they run padded ('off' and compiled layers need no reason).
    'on' raises a ValueError saying what is missing; 'auto' logs it."""
    if setting == "off" or (setting == "auto" and compile_layers):
        return False, None
    missing = packing_obstacle(bodies, device, dtype)
    if missing is None:
        logger.info("pack_sequences: passes run each micro-batch's real tokens as one packed row.")
        return True, None
    if setting == "on":
        raise ValueError(f"pack_sequences: on, but {missing}; set pack_sequences: auto (packs where it can) or off.")
    logger.info("pack_sequences: auto runs padded passes: %s.", missing)
    return False, missing


def packing_obstacle(bodies: list[nn.Module], device: torch.device, dtype: torch.dtype) -> str | None:
    """What keeps `bodies` from running packed rows on `device` in `dtype`, in words; None when nothing does."""
    if device.type != "cuda":
        return f"the run is on {device.type}, and variable-length FlashAttention runs on a CUDA GPU only"
    if not all(placed_on(body, device) for body in bodies):
        return ("a sharding launch places the models after loading, and packing is checked on whole models on "
                "the GPU (replicated launches only)")
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the weights are {str(dtype).removeprefix('torch.')}, and FlashAttention needs bfloat16 or float16"
    if not varlen_kernel_available():
        return f"PyTorch {torch.__version__} has no torch.nn.attention.varlen (2.10 and later do)"
    failing = [type(body).__name__ for body in bodies if not packing_reproduces_forward(body)]
    if failing:
        return f"{', '.join(failing)}'s packed pass does not give its padded pass's hidden states"
    return None


def placed_on(body: nn.Module, device: torch.device) -> bool:
    """Whether every parameter of `body` is on `device`. A device named without an index ("cuda") is the current one
    of its type, as where tensors sent to it land ("cuda:0"): `torch.device("cuda") != torch.device("cuda:0")`."""
    if any(parameter.device.type != device.type for parameter in body.parameters()):
        return False  # checked first: a tensor made on `device` below needs that kind of device to exist
    placed = torch.empty(0, device=device).device
    return all(parameter.device == placed for parameter in body.parameters())


def packing_reproduces_forward(body: nn.Module) -> bool:
    """Whether `body`'s packed pass gives its padded pass's final hidden states at the response positions, on two
    rows of different lengths, to 10 % of their norm. A body whose attention cannot take a packed row (it does not
    pass transformers' attention arguments on) fails. The margin: bfloat16's own rounding moves these hidden states
    0.6 % to 1.6 % from float32's (`tiny` to Qwen3-0.6B's shape), and another attention kernel adds rounding of that
    size; attention across the two sequences misses by 56 % to 107 % (benchmarks/packing_load_check.py)."""
    try:
        gap = packed_hidden_state_gap(body)
    except (TypeError, ValueError, RuntimeError) as error:
        logger.info("A packed pass of %s failed: %s", type(body).__name__, error)
        return False
    return gap <= 0.1


def packing_check_rows(device: torch.device) -> SequenceBatch:
    """The load check's two rows of different lengths: a left-padded prompt, and a response that ended early."""
    input_ids = torch.arange(2, 16, device=device).reshape(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 0] = attention_mask[0, -1] = 0
    return SequenceBatch(input_ids, attention_mask, prompt_width=4)


def packed_hidden_state_gap(body: nn.Module) -> float:
    """The distance between `body`'s packed and padded final hidden states at the response positions of
    `packing_check_rows`, relative to the padded ones' norm."""
    batch = packing_check_rows(next(body.parameters()).device)
    response = batch.response_mask.bool()
    with torch.no_grad():
        padded = response_hidden_states(body, batch)[response].float()
        packed = response_hidden_states(body, replace(batch, packed=True))[response].float()
    return ((packed - padded).norm() / padded.norm()).item()


def head_reads_last_hidden_state(model: nn.Module) -> bool:
    """Whether the model's logits are its output head applied to its body's last hidden state (what a shared value
    trunk computes them as), checked on two short rows; a model that rescales or caps its logits fails."""
    head = nn.utils.skip_init(nn.Linear, model.config.hidden_size, 1, device=next(model.parameters()).device)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)  # skip_init: building the probe draws no random numbers
    return _gives_own_logprobs(model, lambda batch: policy_logprobs_and_values(model, head, batch, 1.0)[0])


def fused_head_reproduces_logprobs(model: nn.Module) -> bool:
    """Whether `head_token_logprobs` gives the logprobs of the model's own forward pass (its logits are a linear
    head with a `weight` on its body's last hidden state), checked on two short rows."""
    if not isinstance(getattr(model.get_output_embeddings(), "weight", None), torch.Tensor):
        return False
    return _gives_own_logprobs(model, lambda batch: sequence_logprobs(model, batch, 1.0, fused_head=True)[0])


def _gives_own_logprobs(model: nn.Module, logprobs_of: Callable[[SequenceBatch], torch.Tensor]) -> bool:
    """Whether `logprobs_of(batch)` matches the model's own forward pass on two short rows (to 1e-4 with float32
    weights, 5e-2 otherwise)."""
    device = next(model.parameters()).device
    input_ids = torch.arange(2, 14, device=device).reshape(2, 6)
    batch = SequenceBatch(input_ids, torch.ones_like(input_ids), prompt_width=3)
    with torch.no_grad():
        whole, _ = sequence_logprobs(model, batch, temperature=1.0)
        other = logprobs_of(batch)
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return torch.allclose(whole, other, atol=tolerance, rtol=0)


def encode_for_reward(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], ended: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompt + completion texts for a reward model with its own tokenizer: left-padded ids and mask (as a
    `SequenceBatch` of prompts alone, so that its micro-batches trim their padding).

    The tokenizer's EOS follows each text whose response ended (`ended`, `[batch]` bools), as it follows every
    completion that `ppo-lm reward` trains on (`finetune.encode_completions`), so `sequence_scores` reads an ended
    response at its EOS, where the model learned to score. A response cut off at `max_new_tokens` gets no EOS.
    """
    token_lists = tokenizer(texts)["input_ids"]
    rows = [torch.tensor(ids + [tokenizer.eos_token_id] if stop else ids, dtype=torch.long)
            for ids, stop in zip(token_lists, ended.tolist(), strict=True)]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id,
                                                padding_side="left")
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(row) for row in rows], batch_first=True,
                                                     padding_side="left")
    return input_ids, attention_mask


def sequence_scores(
    reward_model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Reward model score of each sequence, read at its last real token (the rightmost 1 of the mask), `[batch]`.

    A reward model normalised by `ppo-lm reward` carries `score_offset` in its config: it is subtracted here.
    """
    hidden = last_hidden_states(backbone_of(reward_model), input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(-1)
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = score_head_of(reward_model)
    return head(last_hidden).squeeze(-1).float() - getattr(reward_model.config, "score_offset", 0.0)
