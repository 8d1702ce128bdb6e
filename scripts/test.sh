#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the default test suite (slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q "$@"
