#!/usr/bin/env bash
# Create (or reuse) .venv with torch and r2d2-engine installed in editable mode. Idempotent:
# a stamp of the build inputs skips the reinstall when nothing changed.
#   R2D2_VENV   where the venv lives (default: <repo>/.venv)
#   R2D2_TORCH  the torch requirement (default torch==2.13.0; on a CPU-only machine that is the
#               CPU wheel, so pip never pulls the multi-GB CUDA packages)
set -euo pipefail
# This machine's pip config names optional local indexes that may be absent; drop that noise only.
quiet_pip() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${R2D2_VENV:-$ROOT/.venv}"
TORCH_REQ="${R2D2_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# torch first: installing the package with no torch present would resolve the newest CUDA build.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_REQ"
  quiet_pip "$VPY" -m pip install -q "$TORCH_REQ"
fi
STAMP="$VENV/.r2d2-stamp"
want=$(cd "$ROOT" && cat pyproject.toml setup.py $(find csrc -type f | sort) 2>/dev/null | sha1sum | cut -c1-40)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ] || ! "$VPY" -c "import r2d2" >/dev/null 2>&1; then
  echo "[setup] installing r2d2-engine (editable, with the r2d2._C extension)"
  (cd "$ROOT" && quiet_pip "$VPY" -m pip install -q ninja setuptools wheel && \
     quiet_pip "$VPY" -m pip install -q --no-build-isolation -e ".[dev]")
  echo "$want" > "$STAMP"
fi
