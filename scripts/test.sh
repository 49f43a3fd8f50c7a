#!/usr/bin/env bash
# The whole test suite: build the three environments, lint, type-check, build the docs, build and exercise the wheel,
# run pytest in each environment. Every step runs even when an earlier one failed; the end is one line per step
# (passed / failed / errors, minutes) and the exit status is 1 if any failed.
#   bash scripts/test.sh            the locked environments (constraints/lock-*.txt): what passed when they were written
#   bash scripts/test.sh --newest   the same on environments resolved afresh (.venvs/*-newest: the newest releases
#                                   within pyproject.toml's ranges); only if everything passes, the locks are rewritten
#                                   from them
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 WANDB_DISABLED=true
newest=${1:-}
case $newest in
  "") suffix= ;;
  --newest) suffix=-newest ;;
  *) echo "usage: scripts/test.sh [--newest]" >&2; exit 2 ;;
esac
environments=(trl axolotl axolotl-0.21)
# The Axolotl stacks run what depends on them: every Axolotl test, and the TRL adapter on their own trl (1.9.0, the
# oldest supported, with the real-tokenizer matrix; 1.14.1). The core (finders, masking, loss, CLI, docs) and the
# several-process runs do not change with the stack and run once, in trl: the three environments stay inside the
# time CI allows.
declare -A selection=([trl]="" [axolotl]="axolotl or stack or conformance" [axolotl-0.21]="axolotl or stack")
reports=build/test-reports$suffix
rm -rf "$reports"
mkdir -p "$reports"
summary=()
failures=0

# record NAME STATUS DETAIL SECONDS: one summary line
record() {
  summary+=("$(printf '%-14s %-7s %s (%d.%d min)' "$1" "$2" "$3" $(($4 / 60)) $(($4 % 60 * 10 / 60)))")
  [ "$2" = ok ] || failures=$((failures + 1))
}

# checks VENV: lint, type-check, docs, wheel; the names of those that failed
checks() {
  local failed=() paths=(sftkey_plugin tests recipes benchmarks examples scripts docs/conf.py)
  echo "== checks: ruff, mypy, docs (strict), the wheel installed into a clean environment"
  "$1/bin/ruff" check "${paths[@]}" || failed+=(ruff)
  "$1/bin/ruff" format --check "${paths[@]}" || failed+=("ruff format")
  "$1/bin/mypy" || failed+=(mypy)
  SFTKEY_VENV=$1 bash scripts/build_docs.sh || failed+=(docs)
  SFTKEY_VENV=$1 bash scripts/check_wheel.sh $newest || failed+=(wheel)
  failed_checks=$(IFS=,; echo "${failed[*]}")
}

for env in "${environments[@]}"; do
  venv=.venvs/$env$suffix
  started=$SECONDS
  echo "== $env: environment ($venv)"
  if ! bash scripts/setup_env.sh "$env" $newest; then
    record "$env" FAILED "the environment did not build" $((SECONDS - started))
    [ "$env" = trl ] && record checks FAILED "not run: they need $venv" 0
    continue
  fi
  stack=$("$venv/bin/python" -c 'import importlib.metadata as m
print(" ".join(f"{p} {m.version(p)}" for p in ("axolotl", "trl", "transformers") if any(True for _ in m.distributions(name=p))))')
  if [ "$env" = trl ]; then
    started=$SECONDS
    checks "$venv"
    if [ -z "$failed_checks" ]; then
      record checks ok "ruff, ruff format, mypy, docs, wheel" $((SECONDS - started))
    else
      record checks FAILED "$failed_checks" $((SECONDS - started))
    fi
  fi
  started=$SECONDS
  echo "== $env ($stack): ${selection[$env]:-every test}"
  marker=()
  [ -n "${selection[$env]}" ] && marker=(-m "${selection[$env]}")
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${marker[@]}" --junitxml="$reports/$env.xml"
  code=$?
  counts=$(python3 scripts/junit_counts.py "$reports/$env.xml" 2>/dev/null || echo "no report")
  if [ $code -eq 0 ]; then
    record "$env" ok "$counts; $stack" $((SECONDS - started))
  else
    record "$env" FAILED "$counts; pytest exit $code; $stack" $((SECONDS - started))
  fi
done

echo "== summary${suffix:+ (newest releases)}"
printf '%s\n' "${summary[@]}"
python3 scripts/junit_counts.py --total "$reports"/*.xml 2>/dev/null || echo "total: no test report"
if [ $failures -gt 0 ]; then
  echo "$failures of the steps above failed"
  exit 1
fi
if [ -n "$newest" ]; then
  for env in "${environments[@]}"; do
    { echo "# scripts/test.sh --newest passed with this set on $(date -u +%F); torch: constraints/torch.txt"
      bash scripts/freeze_env.sh ".venvs/$env-newest"; } > "constraints/lock-$env.txt"
  done
  echo "locks rewritten: $(ls constraints/lock-*.txt | tr '\n' ' ')(review with git diff, then commit)"
fi
