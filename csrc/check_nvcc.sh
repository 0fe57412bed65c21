#!/usr/bin/env bash
# Compile every .cu under csrc/ with nvcc (object only: nothing here can run them) with the real
# build's flags, and syntax-check the *_cuda.cpp torch bindings against torch's bundled CUDA
# headers. The .cu files include no torch headers, so this works with a CPU-only torch.
# The nvcc flags (optimisation, --use_fast_math, -std, the -D__CUDA_NO_HALF_OPERATORS__ family
# torch's BuildExtension adds, -gencode for R2D2_CUDA_ARCHS, default "80;90") come from
# `python setup.py --print-nvcc-flags`, so this check and the build cannot drift apart.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
PY="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
if ! FLAGS_TXT="$(cd "$ROOT" && "$PY" setup.py --print-nvcc-flags)"; then
  echo "[nvcc] could not read the build's nvcc flags (python setup.py --print-nvcc-flags with $PY)" >&2
  exit 1
fi
mapfile -t NVCC_FLAGS <<<"$FLAGS_TXT"
echo "[nvcc] flags: ${NVCC_FLAGS[*]}"
n=0
while IFS= read -r -d '' f; do
  echo "[nvcc] $f"
  nvcc -c "$f" -I "$ROOT/csrc" "${NVCC_FLAGS[@]}" -o "$OUT/$(basename "$f").o"
  n=$((n + 1))
done < <(find "$ROOT/csrc" -name '*.cu' -print0 | sort -z)
echo "[nvcc] compiled $n .cu files"

if TINC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" 2>/dev/null); then
  CUDA_INC="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")/include"
  [ -d /usr/local/cuda/include ] && CUDA_INC=/usr/local/cuda/include
  PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  # The CPU wheel ships c10/cuda headers but not the generated cuda_cmake_macros.h; an empty stub
  # lets bindings include c10/cuda/CUDAStream.h, CUDAGuard.h and ATen/cuda/CUDAContext.h.
  mkdir -p "$OUT/stub/c10/cuda/impl"
  echo '#pragma once' > "$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  m=0
  while IFS= read -r -d '' f; do
    echo "[g++ -fsyntax-only] $f"
    # shellcheck disable=SC2086
    g++ -std=c++17 -fsyntax-only -Wno-c++20-extensions -DR2D2_WITH_CUDA=1 -DUSE_C10D_GLOO -DTORCH_EXTENSION_NAME=_C \
      $(for i in $TINC; do echo -I "$i"; done) -I "$CUDA_INC" -I "$OUT/stub" -I "$PYINC" -I "$ROOT/csrc" "$f"
    m=$((m + 1))
  done < <(find "$ROOT/csrc" -name '*_cuda.cpp' -print0 | sort -z)
  echo "[g++] syntax-checked $m CUDA binding files"
fi
