"""Export: a checkpoint's policy as one plain transformers model, the adapter merged into the base weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo_lm.checkpoint import find_checkpoint
from ppo_lm.config import PPOConfig
from ppo_lm.models import load_pretrained
from ppo_lm.runs import read_config_file


def export_policy(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the checkpoint's policy to `out_dir` so `AutoModelForCausalLM.from_pretrained` loads it without peft.

    A non-empty `out_dir` is refused unless `overwrite`. The weights keep the base model's dtype.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it.")
    checkpoint = find_checkpoint(Path(checkpoint))
    config = PPOConfig(**read_config_file(checkpoint / "config.yaml"))
    # The base the checkpoint's config names: moved or deleted since the run, it is one clear line.
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, config.model_name, "model_name")
    if config.use_lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint / "policy")).merge_and_unload()
    else:
        prefix = "policy."
        trained = {k[len(prefix):]: v for k, v in load_file(str(checkpoint / "trainable.safetensors")).items()
                   if k.startswith(prefix)}
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(trained, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or set(missing) - tied:
            raise ValueError(f"Checkpoint {checkpoint} does not fit {config.model_name}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}.")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(checkpoint / "policy")).save_pretrained(str(out_dir))
    return out_dir
