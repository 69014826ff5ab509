#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: create .venv if missing and install the package with
# the tested pins. Sourced, not run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.offpg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -c constraints.txt -e '.[dev,envs]'
    touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
