# Sourced by gpu.sh and gpu_study.sh on the GPU machine: from the repository root, install the carried wheels (.whl/,
# from fetch_gpu_wheels.sh) into /tmp/site, set the offline environment and $out, and print the GPU.
set -euo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
