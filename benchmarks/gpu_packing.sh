#!/usr/bin/env bash
# Issue 15's GPU checks in one call: packed, padding-free rows against length-sorted micro-batches on the GPU
# (benchmarks/packed_vs_sorted.py), then `ppo-lm bench` on the default model's shape at ppo-lm's defaults.
#
#     bash benchmarks/gpu_packing.sh OUTDIR
#
# Run from the repository root on a machine with one CUDA GPU, with the project's Python packages importable
# (`uv sync`, or the GPU image's own torch with the project's other pins on PYTHONPATH). Appends JSON lines to
# OUTDIR/packed_vs_sorted_gpu.jsonl and OUTDIR/bench_gpu.jsonl; each run has its own time limit, the most useful first.
set -u
out=${1:?usage: bash benchmarks/gpu_packing.sh OUTDIR}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
packed() {  # ARCH BATCH BUDGET ATTENTIONS LIMIT
    timeout "$5" "$python" benchmarks/packed_vs_sorted.py --device cuda --dtype bfloat16 --arch "$1" --batch "$2" \
        --budget "$3" --attention "$4" --repeats 5 | tee -a "$out/packed_vs_sorted_gpu.jsonl"
}
packed qwen3-0.6b 32 auto sdpa,varlen 120
packed qwen3-0.6b 256 auto sdpa,varlen 150
packed qwen3-0.6b 256 8192 sdpa,varlen 120
packed small_vocab 32 auto sdpa,varlen 90
packed small_vocab 256 auto sdpa,varlen 90
timeout 150 "$python" -m ppo_lm bench --arch qwen3-0.6b --use_lora true --prompt_lengths tldr --steps 2 \
    --warmup 1 | tee -a "$out/bench_gpu.jsonl"
packed qwen3-0.6b 256 auto flex_attention 150
