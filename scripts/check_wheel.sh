#!/usr/bin/env bash
# The package as users get it: build the sdist and the wheel (the wheel from the sdist, so both are complete), check
# their metadata, install the wheel (not editable) into a venv that holds nothing of this checkout, and run it from a
# temporary folder, so no source tree is on the path. Called by scripts/test.sh; needs the tools of .venvs/trl (build,
# twine), or of the venv SFTKEY_VENV names.
#   scripts/check_wheel.sh [--fresh] [--newest]
#     --fresh: rebuild the wheel venv even when its dependencies are current
#     --newest: the wheel's dependencies resolved afresh into .venvs/wheel-newest (scripts/test.sh --newest); without
#               it they are held to the versions of the trl environment's lock, constraints/lock-trl.txt
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tools=${SFTKEY_VENV:-.venvs/trl}
fresh=false
venv=$repo/.venvs/wheel
constraints=(-c constraints/torch.txt -c constraints/lock-trl.txt)
for option in "$@"; do
  case $option in
    --fresh) fresh=true ;;
    --newest) venv=$repo/.venvs/wheel-newest; constraints=(-c constraints/torch.txt) ;;
    *) echo "unknown option: $option (--fresh, --newest)" >&2; exit 2 ;;
  esac
done
stamp=$venv/.deps-installed
dist=$(mktemp -d)
run_dir=$(mktemp -d)
trap 'rm -rf "$dist" "$run_dir"' EXIT

# Isolated build (build-system.requires from the index), as a release would build it; output only on failure
if ! "$tools/bin/python" -m build --outdir "$dist" . >"$dist/build.log" 2>&1; then
  cat "$dist/build.log" >&2
  exit 1
fi
rm "$dist/build.log"
"$tools/bin/twine" check --strict "$dist"/*
wheel=$(ls "$dist"/*.whl)
built=$SECONDS

# The venv's dependencies (torch, then the trl extra as the wheel declares it) are installed once and reused until
# pyproject.toml or this script changes, as scripts/setup_env.sh does: reinstalling them each run costs about 80 s
# and proves nothing more. The package itself is reinstalled from this run's wheel every time.
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if $fresh || ! [ -f "$stamp" ] || ! [ "$stamp" -nt pyproject.toml ] || ! [ "$stamp" -nt "$0" ] \
  || ! [ "$stamp" -nt constraints/lock-trl.txt ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" "${constraints[@]}" "$wheel[trl]"
  touch "$stamp"
fi
"${pip[@]}" --force-reinstall --no-deps "$wheel"
"${pip[@]}" "${constraints[@]}" "$wheel[trl]"  # every declared dependency still satisfied (no-op when it is)
"$venv/bin/python" -m pip check --disable-pip-version-check
installed=$SECONDS

# -I: no script folder, PYTHONPATH or user site on sys.path; the checks run from an empty temporary folder
cd "$run_dir"
env -u PYTHONPATH "$venv/bin/python" -I "$repo/scripts/check_wheel.py" --dist "$dist"
echo "wheel check: ${SECONDS} s (build and twine ${built} s, environment $((installed - built)) s, checks $((SECONDS - installed)) s)"
