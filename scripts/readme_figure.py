"""Make the README's report figure: a real `ppo-lm train` run on a tiny random Qwen3, offline, on the CPU.

    uv run python scripts/readme_figure.py            # writes docs/report-example.png (about a minute)

The reward is 1 for a completion that starts with a space, which about half of this model's samples do; the run
shows the reward rising while the KL to the reference grows. The model is random, so its text is not meaningful.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import build_qwen_tokenizer, tiny_qwen3_config  # noqa: E402

from ppo_lm.cli import main  # noqa: E402

REWARD = "def reward(prompts, completions):\n    return [1.0 if c.startswith(' ') else 0.0 for c in completions]\n"


def build_files(work: Path) -> Path:
    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer), initializer_range=0.5))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "reward.py").write_text(REWARD)
    topics = ["the weather", "my cat", "a long trip", "the new job", "dinner", "the garden", "a bad day", "music"]
    rows = [{"prompt": f"Tell me about {topic}, part {i}:"} for i in range(6) for topic in topics]
    (work / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "model_name": str(work / "model"), "dataset": str(work / "prompts.jsonl"),
        "reward_fn": f"{work / 'reward.py'}:reward", "output_dir": str(work / "run"), "batch_size": 16,
        "max_new_tokens": 4, "learning_rate": 0.01, "value_learning_rate": 0.01, "ppo_epochs": 2,
        "kl_coef": 0.02, "top_k": 0, "top_p": 1.0, "total_steps": 40, "eval_steps": 10, "save_steps": 20,
        "eval_fraction": 0.34, "report_to": "none", "device": "cpu",
    }
    (work / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return work / "config.yaml"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        assert main(["train", "--config", str(build_files(work))]) == 0
        shutil.copy(work / "run" / "report.png", ROOT / "docs" / "report-example.png")
        print((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"wrote {ROOT / 'docs' / 'report-example.png'}")
