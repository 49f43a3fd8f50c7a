#!/usr/bin/env bash
# Build docs/ strictly (warnings are errors: a broken link, a missing page or anchor, a page in no table of contents)
# into build/docs/, after checking that the generated configuration reference is current. Needs .venvs/trl (docs), or
# the venv SFTKEY_VENV names.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${SFTKEY_VENV:-.venvs/trl}/bin/python
"$python" scripts/config_reference.py --check
"$python" -m sphinx -b html -n -W --keep-going -q docs build/docs
