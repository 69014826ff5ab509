#!/usr/bin/env bash
# Set up .venv (if needed) and run the linters and the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
ruff check .
python -m pytest "$@"
