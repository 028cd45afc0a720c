"""Packed, padding-free passes (`ppo_lm.packing`): the layout, the attention wrapper and the trainer's numbers.

PyTorch's variable-length FlashAttention runs on a GPU only; here `varlen_attn` is replaced by `reference_varlen_attn`,
an independent reference (each sequence through plain causal SDPA on its own), so that what the CPU checks is
everything around the kernel: the packing, the arguments the kernel gets and the unpacking of its output.
"""

import dataclasses

import pytest
import torch
import torch.nn.attention.varlen
import torch.nn.functional as F
from conftest import length_reward, tiny_config
from test_ppo_trainer import assert_same_float32_steps, two_ppo_steps

from ppo_lm import PPOConfig, PPOTrainer
from ppo_lm.generation import SequenceBatch, backbone_of, position_ids_from_mask
from ppo_lm.models import (
    packing_reproduces_forward,
    placed_on,
    resolve_packing,
    response_hidden_states,
    sequence_logprobs,
)
from ppo_lm.packing import pack_layout, varlen_attention

CALLS = []


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          is_causal=False, **unused):
    """`varlen_attn`'s result computed sequence by sequence with plain causal SDPA (query `[tokens, heads, dim]`)."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and max_q == max_k
    assert is_causal or window_size == (-1, 0)
    assert max_q == int(cu_seq_q.diff().max()) and cu_seq_q[-1] == len(query)
    CALLS.append(len(cu_seq_q) - 1)
    out = torch.full_like(query, float("nan"))
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


@pytest.fixture
def reference_kernel(monkeypatch):
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", reference_varlen_attn)
    CALLS.clear()
    return CALLS


def test_the_layout_takes_the_real_tokens_in_order_with_their_positions_and_response_positions():
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 0],    # left-padded prompt of 2, response of 2 that ended early
                                   [1, 1, 1, 1, 1, 1],    # prompt of 3, response of 3
                                   [0, 0, 1, 1, 0, 0]])   # prompt of 1, response of 1
    layout = pack_layout(attention_mask, position_ids_from_mask(attention_mask), prompt_width=3)
    tokens = torch.arange(18).reshape(3, 6)
    assert tokens[layout.real].tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 14, 15]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1]]
    assert layout.cu_seq_lens.tolist() == [0, 4, 10, 12] and layout.cu_seq_lens.dtype == torch.int32
    assert layout.max_length == 6
    # The position before each response token; past a row's response, the one before its last response token.
    assert layout.response_index.tolist() == [[1, 2, 2], [6, 7, 8], [10, 10, 10]]
    packed = tokens[layout.real]
    assert packed[layout.response_index[:2] + 1].tolist() == [[3, 4, 4], [9, 10, 11]]  # the tokens they predict


def test_the_attention_wrapper_gives_each_sequence_its_own_causal_attention(reference_kernel):
    """Grouped key/value heads, a scale: the wrapper's output is per-sequence causal SDPA, laid out as transformers'
    attentions return it."""
    torch.manual_seed(0)
    lengths = [3, 5, 1]
    query, key, value = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    starts = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    out, weights = varlen_attention(None, query, key, value, None, scaling=0.3, cu_seq_lens_q=starts, max_length_q=5)
    assert weights is None and out.shape == (1, 9, 4, 8)
    for start, length in zip([0, 3, 8], lengths, strict=True):
        part = slice(start, start + length)
        expected = F.scaled_dot_product_attention(query[:, :, part], key[:, :, part].repeat_interleave(2, 1),
                                                  value[:, :, part].repeat_interleave(2, 1), is_causal=True,
                                                  scale=0.3).transpose(1, 2)
        torch.testing.assert_close(out[:, part], expected)
    with pytest.raises(ValueError, match="one packed row"):
        varlen_attention(None, query, key, value, torch.ones(1, 1, 9, 9), cu_seq_lens_q=starts, max_length_q=5)


def test_packed_passes_give_the_padded_hidden_states_and_logprobs(tiny_model_dir, reference_kernel):
    trainer = PPOTrainer(tiny_config(tiny_model_dir), reward_fn=length_reward)
    input_ids = torch.randint(2, 100, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = attention_mask[2, :4] = attention_mask[1, -2:] = 0
    batch = SequenceBatch(input_ids, attention_mask, prompt_width=5)
    packed = dataclasses.replace(batch, packed=True)
    mask = batch.response_mask.bool()
    body = backbone_of(trainer.models.policy)
    torch.testing.assert_close(response_hidden_states(body, packed)[mask], response_hidden_states(body, batch)[mask])
    for fused in (True, False):  # the fused head reads the hidden states; the model's own forward, its logits
        logprobs = sequence_logprobs(trainer.models.policy, packed, 0.7, with_entropy=True, fused_head=fused)
        plain = sequence_logprobs(trainer.models.policy, batch, 0.7, with_entropy=True, fused_head=fused)
        for fast, slow in zip(logprobs, plain, strict=True):
            torch.testing.assert_close(fast[mask], slow[mask])
    assert reference_kernel and set(reference_kernel) == {3}  # one packed row of three sequences, every layer


def test_the_load_check_passes_a_right_kernel_and_fails_a_wrong_or_missing_one(tiny_model_dir, reference_kernel,
                                                                             monkeypatch):
    body = backbone_of(PPOTrainer(tiny_config(tiny_model_dir), reward_fn=length_reward).models.policy)
    assert packing_reproduces_forward(body)

    def across_sequences(query, key, value, cu_seq_q, *args, **kwargs):  # one causal attention over the whole row
        return F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (query, key, value)),
                                              is_causal=True).transpose(0, 1)

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", across_sequences)
    assert not packing_reproduces_forward(body)
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # only the errors of a body that cannot pack are read as "no"
        packing_reproduces_forward(body)
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", lambda *args: None)  # takes no keywords
    assert not packing_reproduces_forward(body)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"temperature": 0.7, "micro_batch_tokens": 24},
    {"use_lora": False, "kl_loss_coef": 0.1, "micro_batch_size": 3},
    {"lora_target_modules": ["q_proj", "down_proj"], "lora_layers": [1]},
    {"advantage_estimator": "grpo", "num_generations": 2, "kl_coef": 0.0, "kl_loss_coef": 0.1},
], ids=["lora-gae-token-budget", "full", "cached-frozen-layer", "grpo"])
def test_packed_passes_give_the_padded_paths_rollout_losses_and_weights(tiny_model_dir, reference_kernel, overrides):
    """Two PPO steps with every logprob and value pass packed against the padded passes, in float32, to
    `assert_same_float32_steps`' tolerances (the kernel here is the CPU reference; on a GPU, the RESULTS check)."""
    results = []
    before = None
    for packed in (True, False):
        trainer = PPOTrainer(tiny_config(tiny_model_dir, **overrides), reward_fn=length_reward)
        assert not trainer.models.packed  # 'auto' on the CPU: padded
        trainer.models.packed = packed
        before = before or {n: p.detach().clone() for n, p in trainer.models.named_trainable().items()}
        reference_kernel.clear()
        results.append(two_ppo_steps(trainer))
        assert bool(reference_kernel) == packed
    assert_same_float32_steps(*results, before)


def test_a_device_named_without_an_index_is_the_one_its_tensors_land_on():
    """The trainer's device is often "cuda" while its models' parameters say "cuda:0"; comparing the two as they
    are once made `pack_sequences: auto` decline packing on every GPU run. The same naming, on the CPU: "cpu:0"."""
    body = torch.nn.Linear(2, 2)
    assert torch.device("cpu", 0) != body.weight.device
    assert placed_on(body, torch.device("cpu", 0)) and placed_on(body, torch.device("cpu"))
    assert not placed_on(body, torch.device("meta"))


def test_packing_on_the_cpu_is_refused_when_asked_for_and_skipped_by_auto(tiny_model_dir, caplog):
    with pytest.raises(ValueError, match="pack_sequences: on, but the run is on cpu.*CUDA GPU only.*auto"):
        PPOTrainer(tiny_config(tiny_model_dir, pack_sequences="on"), reward_fn=length_reward)
    models = PPOTrainer(tiny_config(tiny_model_dir), reward_fn=length_reward).models
    on_the_cpu = "the run is on cpu, and variable-length FlashAttention runs on a CUDA GPU only"
    assert not models.packed and models.packing_declined == on_the_cpu  # what `ppo-lm bench` reports
    body = backbone_of(models.policy)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_packing("auto", [body], cpu, torch.bfloat16, compile_layers=False) == (False, on_the_cpu)
    assert resolve_packing("off", [body], cuda, torch.bfloat16, compile_layers=False) == (False, None)
    assert resolve_packing("auto", [body], cuda, torch.bfloat16, compile_layers=True) == (False, None)
    with pytest.raises(ValueError, match="sharding launch places the models after loading"):
        resolve_packing("on", [body], cuda, torch.bfloat16, compile_layers=False)  # the body is still on the CPU
    with pytest.raises(ValueError, match="must be one of"):
        PPOConfig(model_name="m", pack_sequences="yes").validate()
