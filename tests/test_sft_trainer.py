"""SFTTrainer and `ppo-lm sft` on a tiny Qwen3: the completion-only loss, micro-batches, learning, exact resume, the
final model, bad input."""

import json

import pytest
import torch
from rlhf_data import sft_rows, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ppo_lm.cli import main
from ppo_lm.config import SFTConfig
from ppo_lm.sft_trainer import SFTTrainer, completion_nll


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the loss ---------------------------------------------------------------------------------------------------------

def test_completion_nll_is_the_token_mean_and_splits_into_micro_batches():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.125, 0.3, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.25)) + torch.log(torch.tensor(0.125))) / 3
    torch.testing.assert_close(completion_nll(logprobs, mask, mask.sum()), expected)
    parts = completion_nll(logprobs[:1], mask[:1], 3) + completion_nll(logprobs[1:], mask[1:], 3)
    torch.testing.assert_close(parts, expected)


# --- the trainer ------------------------------------------------------------------------------------------------------

def tiny_sft_config(model_dir, **overrides):
    """float32 products (mixed_precision: no): the tests compare steps at float32 tolerances."""
    settings = dict(model_name=model_dir, batch_size=4, learning_rate=1e-3, use_lora=False, device="cpu",
                    sample_max_new_tokens=3, mixed_precision="no")
    settings.update(overrides)
    return SFTConfig(**settings)


@pytest.fixture(scope="module")
def sft_trainer(tiny_model_dir):
    return SFTTrainer(tiny_sft_config(tiny_model_dir))


@pytest.mark.slow
def test_the_loss_reads_completion_tokens_only(sft_trainer):
    items = sft_rows(3)
    items[1]["completion"] = " a much longer completion than the others here"
    (loss, stats), = list(sft_trainer.micro_losses(items, None))
    # By hand: each sequence alone, unpadded, through the plain causal LM; the completion and EOS are scored.
    model, tokenizer = sft_trainer.model, sft_trainer.tokenizer
    total, count = 0.0, 0
    for item in items:
        prompt_ids = tokenizer(item["prompt"])["input_ids"]
        target = tokenizer(item["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + target])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
        total -= logprobs[positions, torch.tensor(target)].sum().item()
        count += len(target)
    assert loss.item() == pytest.approx(total / count, rel=1e-4)
    assert stats["tokens"] == count


@pytest.mark.slow
def test_micro_batches_give_the_same_step(tiny_model_dir):
    items = sft_rows(4)
    items[0]["prompt"] += " and a much longer prompt than the others"
    results = []
    for micro_batch_size in (None, 3):
        trainer = SFTTrainer(tiny_sft_config(tiny_model_dir, micro_batch_size=micro_batch_size))
        stats = trainer.train_step(items)
        results.append((stats, {n: p.detach().clone() for n, p in trainer.trainable().items()}))
    assert_same_step(*results)


def assert_same_step(first: tuple[dict, dict], second: tuple[dict, dict]) -> None:
    """Two SFT steps' (statistics, weights) agree: loss and tokens, gradient norm, and every weight to float32
    rounding (Adam moves a weight by about lr x the gradient's sign, so the tolerance is absolute)."""
    (stats, weights), (other_stats, other_weights) = first, second
    assert other_stats["loss"] == pytest.approx(stats["loss"], rel=1e-5) and other_stats["tokens"] == stats["tokens"]
    assert other_stats["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-4)
    for name in weights:
        torch.testing.assert_close(other_weights[name], weights[name], atol=5e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False])
def test_the_fused_head_gives_the_plain_sft_step(tiny_model_dir, use_lora):
    """SFT's completion logprobs through the fused head (chosen at start-up for Qwen3) against the model's own
    forward pass: the same loss, gradient norm and weights after a step, to float32 rounding (full fine-tuning
    trains the tied head through it)."""
    items = sft_rows(4)
    results = []
    for fused in (True, False):
        trainer = SFTTrainer(tiny_sft_config(tiny_model_dir, use_lora=use_lora))
        assert trainer.fused_head
        trainer.fused_head = fused
        stats = trainer.train_step(items)
        results.append((stats, {n: p.detach().clone() for n, p in trainer.trainable().items()}))
    assert_same_step(*results)


# --- runs from the command line ---------------------------------------------------------------------------------------

@pytest.fixture()
def sft_files(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(20))
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name: {tiny_model_dir}\ndataset: {data}\nbatch_size: 4\nlearning_rate: 0.001\n"
                      "use_lora: false\ntotal_steps: 4\neval_steps: 2\nsave_steps: 2\neval_fraction: 0.2\n"
                      "sample_max_new_tokens: 6\nmax_eval_samples: 2\nreport_to: none\ndevice: cpu\n")
    return {"config": str(config), "dir": tmp_path}


@pytest.mark.slow
def test_sft_lowers_the_completion_loss_and_writes_a_final_model(sft_files):
    run_dir = sft_files["dir"] / "run"
    assert main(["sft", "--config", sft_files["config"], "--output_dir", str(run_dir), "--total_steps", "8",
                 "--eval_steps", "8"]) == 0
    evals = [m for m in read_metrics(run_dir) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 8]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 1.0, evals
    final = run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(str(final))  # a plain causal LM, with its tokenizer beside it
    assert (final / "tokenizer.json").is_file() and (final / "model.safetensors").is_file()
    trained = load_file(str(run_dir / "checkpoint-8" / "trainable.safetensors"))
    state = model.state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(state[name], tensor)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "reference"} <= samples[0].keys()
    assert (run_dir / "report.png").is_file() and (run_dir / "samples.md").is_file()


@pytest.mark.slow
def test_sft_resumed_run_matches_the_straight_run(sft_files):
    straight, halves = sft_files["dir"] / "straight", sft_files["dir"] / "halves"
    lora = ["--use_lora", "True", "--learning_rate", "0.01"]  # the LoRA path, which the other run tests skip
    assert main(["sft", "--config", sft_files["config"], "--output_dir", str(straight), *lora]) == 0
    assert main(["sft", "--config", sft_files["config"], "--output_dir", str(halves), "--total_steps", "2",
                 *lora]) == 0
    assert main(["sft", "--resume", str(halves), "--total_steps", "4"]) == 0  # the rest from its config.yaml
    straight_metrics, resumed_metrics = read_metrics(straight), read_metrics(halves)
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in straight_metrics]
    for a, b in zip(straight_metrics, resumed_metrics, strict=True):  # every step, train and eval
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    a = load_file(str(straight / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(halves / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any("lora_A" in name for name in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    merged = AutoModelForCausalLM.from_pretrained(str(halves / "final"))
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_sft_bad_input_fails_before_any_model_loads(sft_files, capsys):
    bad = write_jsonl(sft_files["dir"] / "bad.jsonl", [{"prompt": "only a prompt"}])
    code = main(["sft", "--config", sft_files["config"], "--dataset", bad, "--model_name",
                 str(sft_files["dir"] / "no-such-model"), "--output_dir", str(sft_files["dir"] / "run")])
    error = capsys.readouterr().err
    assert code == 2 and "lacks column 'completion'" in error and "no-such-model" not in error
    with pytest.raises(ValueError, match=r"SFTConfig.batch_size=0 is invalid: must be an integer >= 1"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"SFTConfig.lora_dropout=1.5 is invalid"):
        SFTConfig(lora_dropout=1.5)
