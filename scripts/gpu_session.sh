#!/usr/bin/env bash
# Everything only a GPU can show, in one call (made for the lent H100/H200 machine, whose image
# already has a CUDA torch, triton, nvcc and ninja):
#   1. build r2d2._C with its CUDA part,      2. r2d2 doctor,
#   3. every GPU-marked test,                  4. the benchmark suite (rows + report).
# Results land in $OUT (the device tool's folder) or benchmarks/results/. Then copy the
# benchmark .jsonl/.md/.png under benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}"
stamp="$(date -u +%Y-%m-%d)"

echo "== build (log: $OUT/build.log)"
if ! python -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
python -m r2d2 doctor | tee "$OUT/doctor.txt"

echo "== GPU tests"
python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
dev="$(python -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))')"
python -m r2d2 bench "${R2D2_BENCH_SUITE:-all}" --out "$OUT/${stamp}_${dev}.jsonl" 2>&1 | tail -80
exit "$tests_rc"
