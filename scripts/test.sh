#!/usr/bin/env bash
# The test command: set up (no-op when done) and run the whole suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${EASYQUANT_VENV:-.venv}/bin/python" -m pytest -q "$@"
