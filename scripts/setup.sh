#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install showo-mlx into it.
# Idempotent: safe to run before every command. PYTHON overrides the interpreter (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
