#!/usr/bin/env bash
# Create (or reuse) .venv with torch and r2d2-engine installed in editable mode. Idempotent:
# torch is installed only when the venv cannot import it, and a stamp of the build inputs skips
# the package reinstall when nothing changed.
#   R2D2_VENV   where the venv lives (default: <repo>/.venv)
#   R2D2_TORCH  a torch requirement to install as given, with pip's own settings (e.g.
#               "torch==2.5.1"). Unset: torch==2.13.0 from, in order,
#                 1. a wheel already on this machine (pip's find-links), with no index consulted;
#                 2. on a machine without an NVIDIA GPU (no nvidia-smi), PyTorch's CPU index
#                    (https://download.pytorch.org/whl/cpu), so pip never pulls the multi-GB
#                    CUDA packages that PyPI's Linux torch depends on;
#                 3. on a GPU machine, pip's default index (the CUDA build).
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

install_torch() {
  if [ -n "${R2D2_TORCH:-}" ]; then
    echo "[setup] installing $TORCH_REQ (R2D2_TORCH)"
    quiet_pip "$VPY" -m pip install -q "$TORCH_REQ"
    return
  fi
  local log
  log="$(mktemp)"
  if "$VPY" -m pip install -q --no-index --no-deps "$TORCH_REQ" >"$log" 2>&1; then
    echo "[setup] installed $TORCH_REQ from a wheel on this machine"
    if command -v nvidia-smi >/dev/null 2>&1; then
      # Its dependencies from pip's usual sources; torch itself is satisfied.
      quiet_pip "$VPY" -m pip install -q "$TORCH_REQ"
    else
      # Its small dependencies (filelock, sympy, ...) only: should the local wheel be a CUDA
      # build, its nvidia-* runtime packages (GBs) are useless without a GPU and are left out.
      local deps
      deps=$("$VPY" - <<'PY'
from importlib.metadata import requires
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv has pip's vendored copy only
    from pip._vendor.packaging.requirements import Requirement
out = []
for r in map(Requirement, requires("torch") or []):
    if (r.marker is None or r.marker.evaluate({"extra": ""})) and not r.name.startswith(("nvidia-", "cuda-")):
        out.append(str(r).split(";")[0].strip())
print("\n".join(out))
PY
)
      local -a dep_list
      mapfile -t dep_list <<<"$deps"
      if [ -n "$deps" ]; then
        quiet_pip "$VPY" -m pip install -q "${dep_list[@]}"
      fi
    fi
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] no NVIDIA GPU (no nvidia-smi): installing $TORCH_REQ, CPU build, from" \
      "https://download.pytorch.org/whl/cpu"
    quiet_pip "$VPY" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "$TORCH_REQ"
  else
    echo "[setup] installing $TORCH_REQ (CUDA build: this machine has an NVIDIA GPU)"
    quiet_pip "$VPY" -m pip install -q "$TORCH_REQ"
  fi
  rm -f "$log"
}

# torch first: installing the package with no torch present would resolve the newest CUDA build.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  install_torch
fi
STAMP="$VENV/.r2d2-stamp"
want=$(cd "$ROOT" && cat pyproject.toml setup.py r2d2/_build.py $(find csrc -type f | sort) 2>/dev/null | sha1sum | cut -c1-40)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ] || ! "$VPY" -c "import r2d2" >/dev/null 2>&1; then
  echo "[setup] installing r2d2-engine (editable, with the r2d2._C extension)"
  (cd "$ROOT" && quiet_pip "$VPY" -m pip install -q ninja setuptools wheel && \
     quiet_pip "$VPY" -m pip install -q --no-build-isolation -e ".[dev]")
  echo "$want" > "$STAMP"
fi
