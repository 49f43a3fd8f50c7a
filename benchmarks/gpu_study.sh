#!/usr/bin/env bash
# The seed-level study (benchmarks/reproduce.py) with a model of tens of millions of parameters, for the borrowed GPU
# machine: hidden 640, 8 layers (about 30M parameters with the 300-token tokenizer), the non-copy `parity` task,
# 8 seeds of plain SFT (sft_equal), the paper's two_stage, key weights 2 and 3, and the loss-scale control
# weighted_x3_mean; 400 optimizer steps of 32 rows, 200 held-out questions. reproduce.py prints the per-seed
# accuracies, the seeds that learnt the task (parity >= 0.65, fixed in advance), Fisher's exact test on them and the
# hierarchical bootstrap interval, and keeps one result file per unit under $out/parity_seeds_gpu (a rerun skips the
# units it has). Not yet run on a GPU: the size is an estimate for 8 minutes (40 trainings of 400 steps at ~15 ms,
# plus generation, 3 units at a time on the one GPU); lower --steps if it runs longer. Training runs on the GPU.
# That machine has torch/transformers/accelerate/peft but not trl, datasets or math-verify: fetch their wheels here,
#   bash benchmarks/fetch_gpu_wheels.sh
# then run it there through the device tool:
#   run(command="bash benchmarks/gpu_study.sh", carry=[".whl"], timeout_s=570)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
timeout 540 python3 benchmarks/reproduce.py --tasks parity --seeds 0,1,2,3,4,5,6,7 --jobs 3 --steps 400 \
  --batch-size 32 --hidden-size 640 --layers 8 --learning-rate 1e-3 --train-size 4000 --test-size 200 \
  --arms sft_equal,weighted_x3,weighted_x3_mean,two_stage,weighted_x2 --out-dir "$out/parity_seeds_gpu" \
  --json "$out/reproduce_gpu.json" 2>&1 | grep -v Warning | tee "$out/reproduce_gpu.txt"
