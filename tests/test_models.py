"""models.py: the scalar head's initialisation, LoRA adapters on chosen layers only, and when the frozen bottom
layers may be run once per rollout (cached)."""

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import length_reward, tiny_config, tiny_qwen3_config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from ppo_lm import PPOTrainer, SFTConfig, SFTTrainer
from ppo_lm.generation import SequenceBatch, backbone_of
from ppo_lm.losses import entropy_from_logits
from ppo_lm.models import (
    FLOAT32_SDPA,
    FusedLoraLinear,
    HeadTokenLogprobs,
    ModelLoadError,
    _entropy_then_exp_,
    add_vocabulary_gradients_in_place,
    autocast_bodies,
    autocast_dtype,
    encode_for_reward,
    fuse_lora_layers,
    fused_head_reproduces_logprobs,
    head_reads_last_hidden_state,
    head_token_logprobs,
    init_scalar_head,
    load_pretrained,
    load_tokenizer,
    resolve_dtype,
    sequence_logprobs,
    shared_frozen_layers,
    store_frozen_linear_weights,
    token_logprobs,
)


def test_scalar_head_init_std():
    torch.manual_seed(0)
    head = torch.nn.Linear(9999, 1)
    init_scalar_head(head)
    assert head.weight.std().item() == pytest.approx(1 / math.sqrt(10000), rel=0.05)
    assert head.bias.item() == 0.0


def test_encode_for_reward_appends_eos_to_ended_rows_only(qwen_tokenizer):
    texts = ["Hello world, this is a longer text", "Hi", "Hi"]
    input_ids, attention_mask = encode_for_reward(qwen_tokenizer, texts, torch.tensor([True, True, False]))
    plain = [qwen_tokenizer(text)["input_ids"] for text in texts]
    eos, pad = qwen_tokenizer.eos_token_id, qwen_tokenizer.pad_token_id
    expected = [plain[0] + [eos], plain[1] + [eos], plain[2]]
    width = len(expected[0])
    assert input_ids.tolist() == [[pad] * (width - len(ids)) + ids for ids in expected]  # left-padded
    assert attention_mask.tolist() == [[0] * (width - len(ids)) + [1] * len(ids) for ids in expected]


@pytest.mark.slow
def test_lora_layers_put_adapters_on_the_chosen_layers_only(tiny_model_dir):
    trainer = PPOTrainer(tiny_config(tiny_model_dir, lora_target_modules=["q_proj", "down_proj"], lora_layers=[1]),
                         reward_fn=length_reward)
    names = [name for name in trainer.models.named_trainable() if ".lora_" in name]
    assert names and all(".layers.1." in name for name in names)
    assert {name.split(".lora_")[0].rsplit(".", 1)[1] for name in names} == {"q_proj", "down_proj"}
    with pytest.raises(ValueError, match="lora_layers.*needs lora_target_modules"):
        tiny_config(tiny_model_dir, lora_layers=[1]).validate()


@pytest.mark.slow
def test_frozen_layers_are_not_cached_where_that_would_change_the_numbers(tiny_model_dir, caplog):
    config = tiny_config(tiny_model_dir, lora_target_modules=["q_proj"], lora_layers=[1])
    trainer = PPOTrainer(config, reward_fn=length_reward)
    assert shared_frozen_layers(config, trainer.models) == 1
    # An architecture that transforms `inputs_embeds` on the way in: the cached path no longer matches.
    decoder = backbone_of(trainer.models.policy)
    handle = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "inputs_embeds": kwargs["inputs_embeds"] * 2})
        if kwargs.get("inputs_embeds") is not None else None, with_kwargs=True)
    with caplog.at_level(logging.WARNING):
        assert shared_frozen_layers(config, trainer.models) == 0
    handle.remove()
    assert "does not reproduce a whole forward pass" in caplog.text
    # A separate reference model, or the switch turned off: every pass runs every layer.
    assert shared_frozen_layers(dataclasses.replace(config, cache_frozen_layers=False), trainer.models) == 0
    separate_reference = dataclasses.replace(config, ref_model_name=tiny_model_dir)
    assert PPOTrainer(separate_reference, reward_fn=length_reward).frozen_layers == 0


# --- a model that cannot be loaded: one line naming the field, the value, what was tried and what to do ---------------

@pytest.fixture()
def offline(monkeypatch):
    """No hub: its calls fail at once instead of retrying for half a minute on a machine without network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name, expected", [
    ("ppo-lm-tests/no-such-model", "model_name='ppo-lm-tests/no-such-model' cannot be loaded: it is no local "
                                   "directory, and the Hugging Face Hub did not provide it ("),
    ("./no-such-folder", "model_name='./no-such-folder' cannot be loaded: no directory "),
])
def test_a_model_that_cannot_be_found_is_one_clear_line(offline, tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_tokenizer(name)
    message = str(error.value)
    assert message.startswith(expected) and "\n" not in message and "To fix it:" in message
    assert ("hf auth login" in message) == (name == "ppo-lm-tests/no-such-model")


def test_a_folder_without_a_model_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError) as error:
        load_pretrained(AutoModelForCausalLM.from_pretrained, str(tmp_path), "reward_model_name")
    message = str(error.value)
    assert message.startswith(f"reward_model_name='{tmp_path}' cannot be loaded: the local directory {tmp_path} "
                              "holds no loadable model or tokenizer (")
    assert "\n" not in message and "save_pretrained" in message


@pytest.mark.parametrize("setting, device, weights, native, expected", [
    ("no", "cpu", torch.float32, True, None),
    ("bf16", "cpu", torch.float32, False, torch.bfloat16),  # asked for: even where bfloat16 is emulated
    ("bf16", "cuda", torch.float32, False, torch.bfloat16),
    ("bf16", "cpu", torch.bfloat16, True, None),  # bfloat16 weights multiply in bfloat16 already
    ("auto", "cpu", torch.float32, True, torch.bfloat16),
    ("auto", "cpu", torch.float32, False, None),  # emulated bfloat16 is slower than float32
    ("auto", "cuda", torch.float32, True, None),  # a GPU gets bfloat16 weights from dtype: auto instead
])
def test_autocast_dtype_follows_the_setting_the_device_and_the_weights(monkeypatch, setting, device, weights, native,
                                                                       expected):
    monkeypatch.setattr("ppo_lm.models.cpu_multiplies_bf16", lambda: native)
    assert autocast_dtype(setting, torch.device(device), weights) == expected


@pytest.mark.parametrize("name, native, expected", [
    ("auto", True, torch.float32),  # a CPU's default weights stay float32 (mixed_precision autocasts them instead)
    ("bfloat16_if_native", True, torch.bfloat16),
    ("bfloat16_if_native", False, torch.float32),  # emulated bfloat16 is slower than float32
    ("bfloat16", False, torch.bfloat16),  # asked for: kept, with a warning
    ("float32", True, torch.float32),
])
def test_the_weights_dtype_on_a_cpu_follows_the_setting_and_its_bfloat16_instructions(monkeypatch, caplog, name,
                                                                                     native, expected):
    monkeypatch.setattr("ppo_lm.models.cpu_multiplies_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="ppo_lm.models"):
        assert resolve_dtype(name, torch.device("cpu")) == expected
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warned) == (name == "bfloat16" and not native)
    assert all("dtype: bfloat16 on a CPU without AVX-512 BF16 or AMX" in w and "bfloat16_if_native" in w
               for w in warned)


def test_bf16_autocast_asked_for_on_a_cpu_that_emulates_it_is_kept_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr("ppo_lm.models.cpu_multiplies_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="ppo_lm.models"):
        assert autocast_dtype("bf16", torch.device("cpu"), torch.float32) == torch.bfloat16
        assert autocast_dtype("auto", torch.device("cpu"), torch.float32) is None
    assert [r.getMessage().split(" on a CPU")[0] for r in caplog.records] == ["mixed_precision: bf16"]


@pytest.mark.parametrize("amx", [False, True])
def test_autocast_bodies_run_sdpa_attention_in_float32_on_a_cpu(tiny_model_dir, tmp_path, monkeypatch, amx):
    """With AMX tiles or without, the attention kernel gets float32 operands outside autocast (the products around it
    stay bfloat16); the switch is not saved with the model."""
    monkeypatch.setattr("ppo_lm.models.cpu_has_amx", lambda: amx)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), {query.dtype, key.dtype, value.dtype}))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"
    autocast_bodies([model], torch.device("cpu"), torch.bfloat16)
    products = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, output: products.append(output.dtype))
    model(torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    assert len(seen) == 2 and all(call == (False, {torch.float32}) for call in seen)
    assert products == [torch.bfloat16]
    assert model.config._attn_implementation == FLOAT32_SDPA
    model.save_pretrained(tmp_path)
    assert FLOAT32_SDPA not in (tmp_path / "config.json").read_text()


def test_float32_sdpa_is_sdpa_on_float32_operands_under_autocast_and_plain_sdpa_outside():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ppo_lm.models import float32_sdpa

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, heads, 5, 8, generator=generator).bfloat16() for heads in (4, 2, 2))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[0, :, :, 0] = False  # a padded first position
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = float32_sdpa(module, query, key, value, mask, scaling=0.3)
    reference, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, scaling=0.3)
    assert fast.dtype == torch.float32 and torch.equal(fast, reference)
    outside, _ = float32_sdpa(module, query, key, value, mask, scaling=0.3)
    plain, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert outside.dtype == torch.bfloat16 and torch.equal(outside, plain)


def _resident_file_bytes(directory: Path) -> int:
    """Resident bytes of this process's mappings of files in `directory` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) == 6 and Path(fields[5]).parent == directory
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads the process's memory map (Linux)")
def test_stored_frozen_weights_give_the_same_products_and_their_float32_file_pages_go(tmp_path):
    """A model loaded from safetensors views the mapped file; after a pass has read every weight, storing the
    frozen linear weights in bfloat16 drops their float32 pages from memory, and the body's autocast products
    (hidden states) stay the same to the bit. The trained weight keeps float32 and its pages."""
    config = tiny_qwen3_config(vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=64, eos_token_id=0, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).requires_grad_(False).eval()
    trained = model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    input_ids = torch.arange(40).reshape(2, 20)

    def hidden() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.model(input_ids=input_ids).last_hidden_state

    before, resident = hidden(), _resident_file_bytes(tmp_path)
    frozen = [m.weight for m in model.model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not trained]
    assert store_frozen_linear_weights(model.model, torch.bfloat16) == len(frozen)
    assert all(m.weight.dtype == torch.bfloat16 for m in model.model.modules()
               if isinstance(m, torch.nn.Linear) and m.weight is not trained) and trained.dtype == torch.float32
    released = resident - _resident_file_bytes(tmp_path)
    float32_bytes = sum(w.numel() * 4 for w in frozen)
    assert 0.9 * float32_bytes <= released <= float32_bytes
    assert torch.equal(hidden(), before)


@pytest.mark.slow
def test_sft_under_autocast_runs_the_body_in_bfloat16_and_keeps_float32_weights(tiny_model_dir, tmp_path):
    config = SFTConfig(model_name=tiny_model_dir, output_dir=str(tmp_path), device="cpu", batch_size=2,
                       mixed_precision="bf16", learning_rate=1e-3)
    trainer = SFTTrainer(config)
    body = backbone_of(trainer.model)
    seen = []
    body.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    trainable = {name: p.detach().clone() for name, p in trainer.trainable().items()}
    stats = trainer.train_step([{"prompt": "Hello", "completion": " world"}, {"prompt": "TL;DR:", "completion": " ok"}])
    assert seen and set(seen) == {torch.bfloat16}  # the body's products ran in bfloat16
    assert math.isfinite(stats["loss"])
    moved = [name for name, p in trainer.trainable().items() if not torch.equal(p, trainable[name])]
    assert moved and all(p.dtype == torch.float32 for p in trainer.trainable().values())
    # The LoRA base is frozen: stored in bfloat16, the operands autocast gave its products.
    assert body.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16


def test_token_logprobs_are_the_gathered_log_softmax_and_have_its_gradient():
    """The fused cross-entropy path against the plain one (logit of the token minus logsumexp), float32."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 1000) * 4).requires_grad_(True)
    tokens = torch.randint(0, 1000, (3, 5))
    fused = token_logprobs(logits, tokens)
    plain = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-6)
    weights = torch.randn(3, 5)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), logits)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), logits)
    torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype, temperature, bias", [
    (torch.float32, 1.0, False), (torch.float32, 0.7, True), (torch.bfloat16, 0.7, False)])
def test_the_fused_head_gives_the_plain_heads_logprobs_entropy_and_gradients(dtype, temperature, bias):
    """`HeadTokenLogprobs` against the head's logits (cast to float32, divided by the temperature) through
    `token_logprobs`: logprobs, entropy and the gradients of the hidden states, the head's weight and its bias.
    Tolerances: float32 rounding for float32 weights; for bfloat16 weights, whose gradients both paths round to
    bfloat16 from float32 values that differ in rounding, one bfloat16 step (2^-8 relative)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=bias).to(dtype)
    hidden = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
    tokens = torch.randint(0, 1000, (3, 5))
    upstream = torch.randn(3, 5)

    logits = head(hidden).float() / temperature
    plain = token_logprobs(logits, tokens)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), [hidden, *head.parameters()])
    fused, entropy = head_token_logprobs(_HeadOnly(head), hidden, tokens, temperature,
                                         with_entropy=True)
    fused_grads = torch.autograd.grad((fused * upstream).sum(), [hidden, *head.parameters()])

    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2**-8}
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach()), atol=1e-4, rtol=1e-5)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads, strict=True):
        assert fused_grad.dtype == plain_grad.dtype == dtype
        torch.testing.assert_close(fused_grad, plain_grad, **tolerance)
    assert "forward" not in head.__dict__  # the head's own forward is back


@pytest.mark.parametrize("chunk_elements", [2**23, 7 * 5])
def test_the_fused_heads_entropy_in_vocabulary_blocks_is_the_whole_rows_entropy(chunk_elements):
    """`_entropy_then_exp_` on vocabulary-major logits shifted by their column maximum, in one block and in blocks
    of seven vocabulary rows (which split 1,000 rows unevenly): each column's entropy, float32 rounding, and the
    exponentials left in place."""
    torch.manual_seed(0)
    logits = torch.randn(5, 1000) * 4  # [positions, vocab]
    shifted = (logits - logits.amax(1, keepdim=True)).T.contiguous()
    expected_exp = shifted.exp()
    entropy = _entropy_then_exp_(shifted, chunk_elements)
    torch.testing.assert_close(entropy, entropy_from_logits(logits), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shifted, expected_exp, atol=0, rtol=0)


def test_the_fused_head_refuses_a_second_backward_pass():
    """Its backward pass overwrites what it saved, so a second one (retain_graph) would be wrong: it raises."""
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    logprobs, _ = HeadTokenLogprobs.apply(hidden, weight, None, torch.randint(0, 50, (4,)), 1.0, False)
    logprobs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass only"):
        logprobs.sum().backward()


class _HeadOnly(torch.nn.Module):
    """A model that is only an output head, for `head_token_logprobs`."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def test_a_model_that_rescales_its_logits_keeps_its_own_forward_pass(tiny_model_dir):
    """The load-time probes: a Qwen3 model's logits are its linear head on its last hidden state, so the fused head
    and a shared value trunk may read them from there. A model whose forward rescales its logits (as Gemma's
    soft-capping or Granite's logit scaling do), or whose head has no weight, is left to its own forward pass."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rng = torch.get_rng_state()
    assert fused_head_reproduces_logprobs(model) and head_reads_last_hidden_state(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the probes draw no random numbers (the run's samples stay)
    forward = model.forward

    def rescaled(*args, **kwargs):
        output = forward(*args, **kwargs)
        output.logits = output.logits * 0.5
        return output

    model.forward = rescaled
    assert not fused_head_reproduces_logprobs(model) and not head_reads_last_hidden_state(model)
    del model.forward
    model.lm_head = _HeadOnly(model.lm_head)  # a head module without a weight of its own
    assert not fused_head_reproduces_logprobs(model)


def test_lora_layers_under_autocast_skip_peft_input_casts_with_the_same_numbers(tiny_model_dir):
    """Under autocast, peft's cast of a bfloat16 input to the float32 adapter's dtype is undone by autocast before
    the adapter's product, so skipping it (what `autocast_bodies` sets) must give bit for bit the same logprobs and
    adapter gradients as keeping it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ppo_lm.models import sequence_logprobs

    trainer = PPOTrainer(tiny_config(tiny_model_dir, mixed_precision="bf16"), reward_fn=length_reward)
    policy = trainer.models.policy
    layers = [module for module in policy.modules() if isinstance(module, BaseTunerLayer)]
    assert layers and not any(layer.cast_input_dtype_enabled for layer in layers)
    batch = trainer.make_rollout(["Hello there", "TL;DR: the cat sat"] * 2).batch
    results = []
    for cast in (False, True):
        for layer in layers:
            layer.cast_input_dtype_enabled = cast
        policy.zero_grad(set_to_none=True)
        logprobs, _ = sequence_logprobs(policy, batch, temperature=1.0)
        logprobs.sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in trainer.models.policy_parameters()]))
    (skipped, skipped_grads), (cast, cast_grads) = results
    assert torch.equal(skipped, cast)
    assert all(torch.equal(a, b) for a, b in zip(skipped_grads, cast_grads, strict=True))


# --- LoRA's up-projection added to the base output in one product ----------------------------------------------------

def _two_adapter_lora_models(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same tiny Qwen3 with a policy and a value LoRA adapter (B nonzero, so the adapters count), twice: as peft
    made it, and with `fuse_lora_layers` applied."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        base = Qwen3ForCausalLM(tiny_qwen3_config(512, eos_token_id=0, pad_token_id=0)).to(dtype)
        settings = dict(r=4, lora_alpha=8, target_modules="all-linear")
        model = get_peft_model(base, LoraConfig(**settings), adapter_name="default")
        model.add_adapter("value", LoraConfig(**settings))
        model.set_adapter("default")
        for name, tensor in model.named_parameters():
            if "lora_" in name:
                tensor.data = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
                tensor.requires_grad_(True)
        models.append(model)
    return models[0], models[1]


@pytest.mark.parametrize("base_dtype, autocast", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.float32, True)],
                         ids=["float32", "bfloat16-base-float32-adapters", "bfloat16-autocast"])
def test_fused_lora_layers_give_peft_outputs_and_gradients_in_every_adapter_state(base_dtype, autocast):
    """The fused layers against peft's, on the same weights: logits and adapter gradients with the policy adapter,
    the value adapter and the adapters disabled (the reference). Tolerances: float32 rounding in float32; for a
    bfloat16 base or products, peft rounds the adapter's product, its scaled copy and the sum (three bfloat16
    roundings) where `addmm` rounds once, so they agree to a few bfloat16 steps of the logits."""
    plain, fused = _two_adapter_lora_models(base_dtype)
    assert fuse_lora_layers(fused) == 2 * 7 and not any(type(m) is FusedLoraLinear for m in plain.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, 512, (3, 11), generator=torch.Generator().manual_seed(1))
    tolerance = dict(atol=1e-5, rtol=1e-5) if base_dtype == torch.float32 and not autocast else dict(atol=6e-2, rtol=0)
    for state in ("default", "value", "disabled"):
        results = []
        for model in (plain, fused):
            model.zero_grad()
            context = model.disable_adapter() if state == "disabled" else contextlib.nullcontext()
            if state != "disabled":
                model.set_adapter(state)
                for name, tensor in model.named_parameters():
                    tensor.requires_grad_("lora_" in name)
            with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=tokens).logits.float()
            if state != "disabled":
                logits.square().mean().backward()
            grads = {n: t.grad.float() for n, t in model.named_parameters() if t.grad is not None}
            results.append((logits, grads))
        (plain_logits, plain_grads), (fused_logits, fused_grads) = results
        assert fused_logits.dtype == plain_logits.dtype
        torch.testing.assert_close(fused_logits, plain_logits, **tolerance)
        assert fused_grads.keys() == plain_grads.keys() and (state == "disabled") == (not plain_grads)
        for name, grad in plain_grads.items():
            scale = grad.abs().max()
            torch.testing.assert_close(fused_grads[name] / scale, grad / scale, atol=tolerance["atol"] * 2, rtol=0)


def _micro_batch_gradients(model: torch.nn.Module, batches: list[SequenceBatch]) -> tuple[dict, int]:
    """The trained gradients after one backward pass per batch through the fused head, and how many dense
    embedding gradients autograd built on the way."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for batch in batches:
            logprobs, _ = sequence_logprobs(model, batch, 0.7, fused_head=True)
            (logprobs * torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)).sum().backward()
    dense = sum(event.count for event in profile.key_averages() if event.key == "aten::embedding_dense_backward")
    return {name: p.grad.clone() for name, p in model.named_parameters()}, dense


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_vocabulary_gradients_added_in_place_are_autograds_gradients(tied):
    """`add_vocabulary_gradients_in_place` on a fully trained model, three micro-batches accumulated: every
    gradient equals autograd's own to float32 rounding (the same sums in another order), the padding token's
    embedding row gets none (untied), and only the first micro-batch (no `.grad` yet) builds a dense embedding
    gradient."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(300, tie_word_embeddings=tied, pad_token_id=7)).float()
    assert model.get_input_embeddings().padding_idx == 7
    batches = []
    for width in (5, 8, 6):
        ids = torch.randint(0, 300, (3, width + 4))
        ids[0, :2] = 7  # left padding: the pad token's row must get no gradient
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        batches.append(SequenceBatch(ids, mask, prompt_width=width))
    plain, plain_dense = _micro_batch_gradients(model, batches)
    assert add_vocabulary_gradients_in_place(model) == (1 if tied else 2)
    in_place, in_place_dense = _micro_batch_gradients(model, batches)
    assert (plain_dense, in_place_dense) == (3, 1)
    assert plain.keys() == in_place.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(in_place[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    embedding = "model.embed_tokens.weight"
    assert in_place[embedding].abs().sum() > 0
    if not tied:  # a tied weight's row 7 is also the head's, whose softmax gives every row a gradient
        assert torch.equal(in_place[embedding][7], torch.zeros(64))
    with torch.no_grad():  # a pass without gradients is a plain lookup
        assert torch.equal(model.get_input_embeddings()(batches[0].input_ids),
                           torch.nn.functional.embedding(batches[0].input_ids, model.model.embed_tokens.weight))
