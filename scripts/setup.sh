#!/usr/bin/env bash
# Create .venv and install alignflow with the versions it was tested with. Idempotent: when
# pyproject.toml and requirements.lock are unchanged a second run only compares a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))'; then
  echo "alignflow needs Python 3.11 or 3.12; $PY is $("$PY" -V 2>&1)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ "$(cat .venv/.alignflow-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing alignflow into .venv (about a minute)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  # requirements.lock holds exact versions; torch==2.13.0 comes from pyproject.toml, which on
  # these machines resolves to the CPU wheel on disk.
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
  echo "$stamp" > .venv/.alignflow-stamp
fi
