"""The launch backends: which one a launch selects, what each refuses, and the replicated backend's step.

The multi-process behaviour of every backend (the same weights as one process, checkpoints, resume) is tested in
test_distributed.py; here are the single-process facts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ppo_lm.backend import (
    Backend,
    DeepSpeedBackend,
    FSDPBackend,
    adamw,
    deepspeed_settings,
    fsdp_sharding,
    select_backend,
)

FSDP_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
DEEPSPEED_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


def test_a_plain_launch_is_replicated_and_runs_every_stage():
    for stage in ("train", "sft", "reward"):
        backend = select_backend(stage)
        assert type(backend) is Backend and backend.can_discard_gradients
        assert backend.describe() == {"backend": "replicated", "sharded": False, "zero_stage": None}


def test_launches_select_their_backend(monkeypatch):
    for name, value in FSDP_LAUNCH.items():
        monkeypatch.setenv(name, value)
    assert isinstance(select_backend("sft"), FSDPBackend)
    for name in FSDP_LAUNCH:
        monkeypatch.delenv(name)
    for name, value in DEEPSPEED_LAUNCH.items():
        monkeypatch.setenv(name, value)
    backend = select_backend("train")
    assert isinstance(backend, DeepSpeedBackend) and not backend.can_discard_gradients
    assert backend.describe()["zero_stage"] == 3


def test_a_deepspeed_config_file_passes_its_zero_settings_on_without_auto_values(monkeypatch, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": "auto",
        "offload_optimizer": {"device": "none"}}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    settings = deepspeed_settings()
    assert settings.stage == 3 and settings.zero_optimization["reduce_bucket_size"] == 1000
    assert "stage3_prefetch_bucket_size" not in settings.zero_optimization  # left to DeepSpeed's default
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()  # models still load whole; the engine partitions them


def test_a_deepspeed_launch_reads_its_zero_stage_and_refuses_sft_and_reward_training(monkeypatch, tmp_path):
    from ppo_lm.config import SFTConfig
    from ppo_lm.sft_trainer import SFTTrainer

    assert deepspeed_settings() is None  # not a DeepSpeed launch
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for stage in (1, 2, 3):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
        assert deepspeed_settings().stage == stage
    with pytest.raises(ValueError, match="`ppo-lm reward` does not run under DeepSpeed.*fsdp.yaml"):
        select_backend("reward")
    with pytest.raises(ValueError, match="`ppo-lm sft` does not run under DeepSpeed.*fsdp.yaml"):
        SFTTrainer(SFTConfig(model_name=str(tmp_path / "no-model"), dataset=str(tmp_path / "rows.jsonl")))


@pytest.mark.parametrize("launch, variable, value, message", [
    (FSDP_LAUNCH, "FSDP_VERSION", "1", "fsdp_version: 2"),
    (FSDP_LAUNCH, "FSDP_ACTIVATION_CHECKPOINTING", "true", "gradient_checkpointing: true"),
    (FSDP_LAUNCH, "FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
    (DEEPSPEED_LAUNCH, "ACCELERATE_DEEPSPEED_ZERO_STAGE", "0", "stage 0.*multi_gpu.yaml"),
    (DEEPSPEED_LAUNCH, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu", "offload_optimizer"),
    (DEEPSPEED_LAUNCH, "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu", "offload_param"),
])
def test_launch_settings_ppo_lm_does_not_follow_are_refused_before_any_model_loads(monkeypatch, launch, variable,
                                                                                  value, message):
    for name, setting in {**launch, variable: value}.items():
        monkeypatch.setenv(name, setting)
    with pytest.raises(ValueError, match=message):
        select_backend("train")


def test_an_fsdp_launch_reads_its_resharding_from_the_accelerate_config(monkeypatch):
    assert fsdp_sharding() is None  # not an FSDP launch
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for value in (True, False):
        monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", str(value).lower())
        assert fsdp_sharding().reshard_after_forward is value


def _two_groups(max_grad_norm: float) -> tuple[Backend, nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    first, second = nn.Linear(3, 2), nn.Linear(2, 1)
    backend = Backend()
    backend.prepare({"first": first, "second": second}, [],
                    lambda: torch.optim.SGD([*first.parameters(), *second.parameters()], lr=1.0), max_grad_norm)
    return backend, first, second


def test_the_replicated_step_clips_each_group_and_reports_the_norm_of_all_gradients():
    backend, first, second = _two_groups(max_grad_norm=0.5)
    before = [p.detach().clone() for p in (*first.parameters(), *second.parameters())]
    backend.backward((first(torch.ones(1, 3)).sum() * 3) + second(torch.ones(1, 2)).sum() * 0.1)
    norms = [torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item() for module in (first, second)]
    grads = [p.grad.clone() for p in (*first.parameters(), *second.parameters())]
    stepped, grad_norm = backend.step([list(first.parameters()), list(second.parameters())])
    assert stepped and grad_norm == pytest.approx(math.hypot(*norms))
    # each group clipped to 0.5 on its own: SGD with lr 1 moved it by its clipped gradient
    for group, norm, (start, stop) in ((first, norms[0], (0, 2)), (second, norms[1], (2, 4))):
        scale = min(1.0, 0.5 / (norm + 1e-6))
        for parameter, old, grad in zip(group.parameters(), before[start:stop], grads[start:stop], strict=True):
            assert torch.allclose(old - parameter.detach(), grad * scale, atol=1e-6)
    assert all(p.grad is None for p in (*first.parameters(), *second.parameters()))


def test_discarded_gradients_take_no_step():
    backend, first, second = _two_groups(max_grad_norm=0.0)
    backend.backward(first(torch.ones(1, 3)).sum())
    backend.discard_gradients()
    assert all(p.grad is None for p in first.parameters())


def test_only_the_backend_module_knows_the_launches():
    package = Path(__file__).resolve().parents[1] / "ppo_lm"
    for name in ("ppo_trainer.py", "finetune.py", "sft_trainer.py", "reward_trainer.py", "models.py"):
        source = (package / name).read_text().lower()
        assert "deepspeed" not in source and "fsdp" not in source, name


def test_a_gradient_that_is_not_finite_takes_no_step_and_is_dropped():
    backend, first, second = _two_groups(max_grad_norm=1.0)
    before = [p.detach().clone() for p in (*first.parameters(), *second.parameters())]
    backend.backward(first(torch.ones(1, 3)).sum() + second(torch.ones(1, 2)).sum())
    first.weight.grad[0, 0] = float("inf")
    stepped, grad_norm = backend.step([list(first.parameters()), list(second.parameters())])
    assert not stepped and not math.isfinite(grad_norm)
    after = [p.detach() for p in (*first.parameters(), *second.parameters())]
    assert all(torch.equal(old, new) for old, new in zip(before, after, strict=True))
    assert all(p.grad is None for p in (*first.parameters(), *second.parameters()))


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh-copy", "reused-buffers"])
def test_a_snapshot_restores_the_weights_and_the_optimizer_state_bit_for_bit(reuse):
    torch.manual_seed(0)
    first, second = nn.Linear(3, 2), nn.Linear(2, 1)
    backend = Backend()
    backend.prepare({"first": first, "second": second}, [],
                    lambda: adamw([*first.parameters(), *second.parameters()], lr=0.1), 1.0)
    parameters = [*first.parameters(), *second.parameters()]

    def train_step():
        backend.backward(second(first(torch.randn(4, 3))).square().sum())
        assert backend.step([parameters]).stepped

    buffers = set()
    for taken_before in (0, 2, 1):  # no optimizer state yet (AdamW creates it at its first step), then some
        for _ in range(taken_before):
            train_step()
        weights = [p.detach().clone() for p in parameters]
        state = {p: {k: v.clone() for k, v in s.items()} for p, s in backend.optimizer.state.items()}
        saved = backend.snapshot(reuse=reuse)
        if state:
            buffers.add(tuple(t.data_ptr() for t in saved.weights))
        for _ in range(2):  # a snapshot stays valid after a restore
            train_step()
            backend.backward(first(torch.ones(1, 3)).sum())  # gradients a failed step left behind
            assert not all(torch.equal(p, w) for p, w in zip(parameters, weights, strict=True))
            backend.restore(saved)
            assert all(torch.equal(p, w) for p, w in zip(parameters, weights, strict=True))
            assert backend.optimizer.state.keys() == state.keys()
            for p, entry in backend.optimizer.state.items():
                assert entry.keys() == state[p].keys() and all(torch.equal(entry[k], state[p][k]) for k in entry)
                assert all(entry[k] is not saved.optimizer_state[p][k] for k in entry if torch.is_tensor(entry[k]))
            assert all(p.grad is None for p in parameters)
    assert len(buffers) == (1 if reuse else 2)  # reused: every copy went into the same tensors


def test_the_fused_adamw_takes_the_plain_adamw_steps():
    """`adamw` picks torch's fused kernel on the CPU; its weights and moments after several steps (two groups, weight
    decay, varied shapes) are the per-tensor loop's to float32 rounding."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3), (1,)]
    plain = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    fused = [nn.Parameter(p.detach().clone()) for p in plain]

    def groups(params):
        return [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}]

    reference = torch.optim.AdamW(groups(plain), weight_decay=0.1, foreach=False)
    fast = adamw(groups(fused), weight_decay=0.1)
    assert all(group["fused"] for group in fast.param_groups)
    for _ in range(5):
        for a, b in zip(plain, fused, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        reference.step()
        fast.step()
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fast.state[b][key], reference.state[a][key], rtol=1e-6, atol=1e-9)
        assert float(fast.state[b]["step"]) == float(reference.state[a]["step"]) == 5



def test_deepspeed_says_it_cannot_undo_a_step():
    assert Backend.can_roll_back and FSDPBackend.can_roll_back and not DeepSpeedBackend.can_roll_back
