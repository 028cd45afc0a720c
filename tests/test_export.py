"""export.py, through `ppo-lm export`: a checkpoint's policy as one plain transformers model (the LoRA adapter merged,
or full fine-tuning's weights), loaded without peft."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo_lm.cli import main

pytestmark = pytest.mark.slow  # each test trains, then exports


def test_export_loads_without_peft_and_generates_the_same_greedy_text(run_files, tmp_path):
    run_dir = run_files["dir"] / "run"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir)]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(run_dir / "checkpoint-4"), str(out)]) == 0
    assert not (out / "adapter_config.json").exists()

    # The trained policy: base + the checkpoint's peft adapter.
    from peft import PeftModel

    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    base = AutoModelForCausalLM.from_pretrained(config["model_name"])
    policy = PeftModel.from_pretrained(base, str(run_dir / "checkpoint-4" / "policy")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    inputs = tokenizer(["Question 3: what is 3 plus 3?"], return_tensors="pt")
    expected = policy.generate(**inputs, do_sample=False, max_new_tokens=8)[0].tolist()

    # The exported model, in a process where peft cannot be imported.
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["peft"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        inputs = tokenizer(["Question 3: what is 3 plus 3?"], return_tensors="pt")
        print(json.dumps(model.generate(**inputs, do_sample=False, max_new_tokens=8)[0].tolist()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
    assert main(["export", str(run_dir / "checkpoint-4"), str(out)]) == 2  # not overwritten unasked


def test_full_fine_tuning_run_exports_its_weights(run_files, tmp_path):
    run_dir = run_files["dir"] / "full"
    assert main(["train", "--config", run_files["config"], "--output_dir", str(run_dir), "--use_lora", "False",
                 "--total_steps", "1", "--eval_fraction", "0"]) == 0
    trained = load_file(str(run_dir / "checkpoint-1" / "trainable.safetensors"))
    out = tmp_path / "exported-full"
    assert main(["export", str(run_dir), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for name, tensor in trained.items():
        if name.startswith("policy."):
            torch.testing.assert_close(exported[name[len("policy."):]], tensor)
