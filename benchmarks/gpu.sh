#!/usr/bin/env bash
# The overhead benchmark on the borrowed GPU machine: a randomly initialised ~0.5B Qwen-shaped Llama (vocabulary
# 151936) in bf16 with packing, plus the small large-vocabulary shape; stock SFTTrainer vs every SFTKey arm. Then
# every SFTKey mode under FSDP2 on the CUDA path (benchmarks/fsdp_check.py).
# That machine has torch/transformers/accelerate/peft but not trl or datasets: fetch their wheels here first,
#   bash benchmarks/fetch_gpu_wheels.sh
# then run it there through the device tool (about 5-7 minutes with the FSDP2 check at the end):
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
python3 benchmarks/overhead.py --device cuda --shapes qwen-0.5b,large-vocab --packing --bf16 --rounds 3 \
  --steps 10 --warmup 3 --batch 8 --max-length 1024 --json "$out/overhead_gpu.json" 2>&1 | tee "$out/overhead_gpu.txt"
# SFTKey under FSDP2 on the CUDA path: one process (torchrun), bf16, each mode against the same run without FSDP,
# and a FULL_STATE_DICT save (the CPU tests use sharded checkpoints); about 1 minute
python3 benchmarks/fsdp_check.py --device cuda --json "$out/fsdp_gpu.json" 2>&1 | tail -n 8 | tee "$out/fsdp_gpu.txt"
