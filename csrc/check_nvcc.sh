#!/usr/bin/env bash
# Compile every .cu under csrc/ with nvcc for sm_80 and sm_90 (object only: nothing here can run
# them), and syntax-check the *_cuda.cpp torch bindings against torch's bundled CUDA headers.
# The .cu files include no torch headers, so this works with a CPU-only torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHS="${R2D2_CUDA_ARCHS:-80;90}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
gencode=()
for a in ${ARCHS//;/ }; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done
n=0
while IFS= read -r -d '' f; do
  echo "[nvcc] $f (sm ${ARCHS})"
  nvcc -std=c++17 -O3 -c "$f" -I "$ROOT/csrc" "${gencode[@]}" -o "$OUT/$(basename "$f").o"
  n=$((n + 1))
done < <(find "$ROOT/csrc" -name '*.cu' -print0 | sort -z)
echo "[nvcc] compiled $n .cu files"

PY="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
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
