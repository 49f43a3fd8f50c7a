#!/usr/bin/env bash
# The packages of a venv in the lock's format: NAME==VERSION, sorted; without this package (editable) and torch
# (installed first, pinned in constraints/torch.txt).
#   scripts/freeze_env.sh VENV
set -euo pipefail
venv=${1:?usage: freeze_env.sh VENV}
"$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v -i '^torch==' | sort -f
