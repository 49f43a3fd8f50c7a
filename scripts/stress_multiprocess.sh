#!/usr/bin/env bash
# The several-process tests (pytest -m multiprocess: every launch of 2 processes, each asserting that every process
# exited cleanly) run RUNS times in a row in one environment, while HOGS CPU-bound processes compete for the cores.
# One line per run, then the count of failed runs (exit 1 if any); each run's output in build/stress-ENV/.
#   scripts/stress_multiprocess.sh [RUNS] [ENV] [HOGS]     defaults: 20 trl 2
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
env=${2:-trl}
hogs=${3:-2}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 WANDB_DISABLED=true
bash scripts/setup_env.sh "$env" || exit 1
logs=build/stress-$env
rm -rf "$logs"
mkdir -p "$logs"
pids=()
for _ in $(seq "$hogs"); do
  python3 -c 'while True: pass' &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
failed=0
for run in $(seq "$runs"); do
  started=$SECONDS
  if ".venvs/$env/bin/python" -m pytest -q -p no:cacheprovider -m multiprocess >"$logs/run-$run.log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed=$((failed + 1))
  fi
  echo "run $run/$runs: $status: $(tail -n 1 "$logs/run-$run.log") ($((SECONDS - started)) s)"
done
echo "$env, $runs runs of pytest -m multiprocess beside $hogs CPU-bound processes: $((runs - failed)) passed, $failed failed"
[ $failed -eq 0 ]
