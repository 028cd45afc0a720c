#!/usr/bin/env bash
# Issue 15's open GPU checks in one call (about 4 minutes on an H200): the trainer with `pack_sequences: auto` against
# padded passes (benchmarks/packing_gpu_check.py: 16-bit gaps, one rollout and update each way, `ppo-lm bench` with
# packing on and off), then what switching LoRA adapters costs there (benchmarks/adapter_switch.py).
#
#     bash benchmarks/gpu_trainer_check.sh OUTDIR
#
# Run from the repository root on a machine with one CUDA GPU and the project's Python packages importable. What to
# read: packing_gpu_check.jsonl's `trainer` line must say `auto_resolved_packed: true` and its first `bench` line
# `packed: true` (session 44 fixed auto declining on every single-GPU run, unverified there); the two `bench` lines'
# `median_step_s` and `stage_s.update` are the packed step against the padded one.
set -u
out=${1:?usage: bash benchmarks/gpu_trainer_check.sh OUTDIR}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
timeout 340 "$python" benchmarks/packing_gpu_check.py "$out/packing_gpu_check.jsonl" 2>&1 \
    | grep -v -i "warn\|Loading weights\|Writing model"
timeout 60 "$python" benchmarks/adapter_switch.py --arch qwen3-0.6b --device cuda --out "$out/adapter_switch.jsonl" 2>&1 \
    | tail -1
