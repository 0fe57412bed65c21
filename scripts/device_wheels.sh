#!/usr/bin/env bash
# Wheels of the packages r2d2 needs that the lent GPU machine's image lacks (its pip reaches no
# index), into .whl/ (git-ignored) for run(..., carry=[".whl"]); scripts/gpu_session.sh installs
# them first. Pure-Python wheels, for the image's python 3.12. Versions: what this checkout's venv
# has, so both machines run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
pins=()
for pkg in webdataset braceexpand; do
  v="$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null || true)"
  pins+=("$pkg${v:+==$v}")
done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${pins[@]}"
ls -l .whl
