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
echo "== newest TRL ($(.venvs/trl/bin/python -c 'import trl; print("trl", trl.__version__)')): every test"
.venvs/trl/bin/python -m pytest -q -p no:cacheprovider
# The Axolotl stacks run what depends on them: every Axolotl test, and the TRL adapter on their own trl (1.9.0, the
# oldest supported, with the real-tokenizer matrix; 1.14.1). The core (finders, masking, loss, CLI, docs) and the
# several-process runs do not change with the stack and run once, above: the three environments stay inside the
# time CI allows.
declare -A selection=([axolotl]="axolotl or stack or conformance" [axolotl-0.21]="axolotl or stack")
for env in axolotl axolotl-0.21; do
  echo "== Axolotl stack ($(.venvs/$env/bin/python -c 'import trl, axolotl; print("axolotl", axolotl.__version__, "trl", trl.__version__)')): ${selection[$env]}"
  .venvs/$env/bin/python -m pytest -q -p no:cacheprovider -m "${selection[$env]}"
done
