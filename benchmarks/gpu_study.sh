#!/usr/bin/env bash
# The equal-compute study (benchmarks/reproduce.py) with a model of tens of millions of parameters, for the borrowed
# GPU machine: hidden 640, 8 layers (about 30M parameters with the 300-token tokenizer), every default arm (sft_short,
# sft_equal, two_stage, soft_stage2, weighted_x2, weighted_x3, ramp) on `arithmetic` and the non-copy `parity` task,
# 3 seeds, 400 optimizer steps of 32 rows, 200 held-out questions per task. Not yet run on a GPU: the size is an
# estimate for 8 minutes (42 trainings of 400 steps at ~15 ms, plus generation, 3 units at a time on the one GPU);
# lower --steps if it runs longer. Training runs on the GPU (reproduce.py --device auto).
# That machine has torch/transformers/accelerate/peft but not trl, datasets or math-verify: fetch their wheels here,
#   bash benchmarks/fetch_gpu_wheels.sh
# then run it there through the device tool:
#   run(command="bash benchmarks/gpu_study.sh", carry=[".whl"], timeout_s=570)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
timeout 540 python3 benchmarks/reproduce.py --tasks parity,arithmetic --seeds 0,1,2 --jobs 3 --steps 400 --batch-size 32 \
  --hidden-size 640 --layers 8 --learning-rate 1e-3 --train-size 4000 --test-size 200 \
  --json "$out/reproduce_gpu.json" 2>&1 | grep -v Warning | tee "$out/reproduce_gpu.txt"
