#!/usr/bin/env bash
# The package as users get it: build the sdist and the wheel (the wheel from the sdist, so both are complete), check
# their metadata, install the wheel (not editable) into a venv that holds nothing of this checkout, and run it from a
# temporary folder, so no source tree is on the path. Called by scripts/test.sh; needs .venvs/trl (build, twine).
#   scripts/check_wheel.sh [--fresh]   --fresh: rebuild the wheel venv even when its dependencies are current
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
venv=$repo/.venvs/wheel
stamp=$venv/.deps-installed
dist=$(mktemp -d)
run_dir=$(mktemp -d)
trap 'rm -rf "$dist" "$run_dir"' EXIT

# Isolated build (build-system.requires from the index), as a release would build it; output only on failure
if ! .venvs/trl/bin/python -m build --outdir "$dist" . >"$dist/build.log" 2>&1; then
  cat "$dist/build.log" >&2
  exit 1
fi
rm "$dist/build.log"
.venvs/trl/bin/twine check --strict "$dist"/*
wheel=$(ls "$dist"/*.whl)
built=$SECONDS

# The venv's dependencies (torch, then the trl extra as the wheel declares it) are installed once and reused until
# pyproject.toml or this script changes, as scripts/setup_env.sh does: reinstalling them each run costs about 80 s
# and proves nothing more. The package itself is reinstalled from this run's wheel every time.
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if [ "${1:-}" = "--fresh" ] || ! [ -f "$stamp" ] || ! [ "$stamp" -nt pyproject.toml ] || ! [ "$stamp" -nt "$0" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -c constraints/torch.txt "$wheel[trl]"
  touch "$stamp"
fi
"${pip[@]}" --force-reinstall --no-deps "$wheel"
"${pip[@]}" -c constraints/torch.txt "$wheel[trl]"  # every declared dependency still satisfied (no-op when it is)
"$venv/bin/python" -m pip check --disable-pip-version-check
installed=$SECONDS

# -I: no script folder, PYTHONPATH or user site on sys.path; the checks run from an empty temporary folder
cd "$run_dir"
env -u PYTHONPATH "$venv/bin/python" -I "$repo/scripts/check_wheel.py" --dist "$dist"
echo "wheel check: ${SECONDS} s (build and twine ${built} s, environment $((installed - built)) s, checks $((SECONDS - installed)) s)"
