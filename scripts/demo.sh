#!/usr/bin/env bash
# Set up (scripts/setup.sh), then fit the seed tutorial's models and print their tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 examples/tutorial.py
