#!/usr/bin/env bash
# The whole test suite: build the three environments, lint, type-check, build the docs, build and exercise the wheel,
# run pytest in each environment.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 WANDB_DISABLED=true
for env in trl axolotl axolotl-0.21; do
  bash scripts/setup_env.sh "$env"
done
.venvs/trl/bin/ruff check sftkey_plugin tests recipes benchmarks examples scripts docs/conf.py
.venvs/trl/bin/ruff format --check sftkey_plugin tests recipes benchmarks examples scripts docs/conf.py
.venvs/trl/bin/mypy
echo "== docs (strict)"
bash scripts/build_docs.sh
echo "== the wheel, installed into a clean environment"
bash scripts/check_wheel.sh
echo "== newest TRL ($(.venvs/trl/bin/python -c 'import trl; print("trl", trl.__version__)'))"
.venvs/trl/bin/python -m pytest -q -p no:cacheprovider
for env in axolotl axolotl-0.21; do
  echo "== Axolotl stack ($(.venvs/$env/bin/python -c 'import trl, axolotl; print("axolotl", axolotl.__version__, "trl", trl.__version__)'))"
  .venvs/$env/bin/python -m pytest -q -p no:cacheprovider
done
