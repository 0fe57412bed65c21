#!/usr/bin/env bash
# Everything only a GPU can show, as ONE prepared command that fits one call of the lent machine
# (the device tool allows 600 s per command and 15 min of device time per session, the machine's
# start included): build r2d2._C, run the GPU tests, then a benchmark set sized to the budget.
#
#   bash scripts/gpu_session.sh                 # on the GPU machine (writes into $OUT)
#   bash scripts/gpu_session.sh --cpu           # the same plumbing on a CPU, tiny settings (CI)
#   bash scripts/gpu_session.sh --dry-run       # print the plan (phases, caps, commands) only
#   options: --budget S (default 500; --cpu 300)   --phases a,b,...   --out DIR
#
# Phases run in order, each under its own `timeout` (SIGINT first, so pytest writes its junit
# and a bench script stops between rows; KILL 15 s later). The caps of the default phases add up
# to the budget (530 s: the 600 s command limit with room for the kill and the files; with the
# machine's start, about 11 of the 15 device minutes), so each gets its cap when the ones before
# it use theirs; a phase that ends early leaves its time to the next ones' caps, never more. The
# order is what only a GPU can show, most valuable first: the kernels' GPU tests, the base step,
# the kernel benchmarks, the largest batch, then the remaining GPU tests. A phase that cannot get
# its minimum is skipped and says so. Benchmark rows are appended to the results file as each is
# measured, so a timeout loses nothing already measured, and the .md/.png are rendered from
# whatever is there.
#   env          GPU, driver, python, torch, triton versions; carried wheels (.whl/) installed first
#   build        pip install -e . (the CUDA extension for this GPU's arch only), timed
#   doctor       r2d2 doctor: what the install can run and which backend auto picks
#   gpu_kernels  pytest -m gpu on the three kernels' test files (bf16/fp16, CUDA backend, autotune),
#                not -x (every failure is worth seeing), pytest-xdist workers when installed
#   step         base preset, one batch that fits (the largest of 256, 128, ... eager fits):
#                eager, ours, apex (a skipped row where apex is absent)
#   kernels_*    bench_distill_kl / bench_contrastive / bench_attention --quick: each op's
#                providers at one or two of the issue's shapes, short do_bench budgets
#   max_batch    largest checkpointed batch, eager vs ours, search bounded by its cap
#   gpu_rest     pytest -m gpu on every other test file (attention auto, harness)
#   report       benchmarks/report.py -> .md and .png beside the rows
#   step_compile (only when named in --phases: inductor compiles the base model for minutes)
#                eager+compile, ours+compile at the step rows' batch; a second call:
#                bash scripts/gpu_session.sh --phases build,step_compile,report
# Results in $OUT (at most 8 files come back from the device tool; these are 7):
#   <date>_<device>.jsonl .md .png   commit as is under benchmarks/results/
#   session.md                       phase table (status, exit code, seconds, cap), env, tails
#   gpu_kernels.xml gpu_rest.xml     junit of the GPU tests
#   logs.tar.gz                      every phase's full log
# Exit status: 0 when every phase ran and passed, 1 when one failed or timed out, 3 when some
# were skipped for the budget (and none failed).
#
# python: $PYTHON, else the checkout's .venv/bin/python when it imports torch, else python3 (the
# device image's python3 holds CUDA torch). Packages the device image lacks (webdataset,
# braceexpand) travel as wheels: bash scripts/device_wheels.sh here once, then
# run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

MODE=gpu
BUDGET=""
PHASES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --dry-run) MODE=dry ;;
    --budget) BUDGET="$2"; shift ;;
    --phases) PHASES="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then BUDGET=$([ "$MODE" = cpu ] && echo 300 || echo 530); fi
RESERVE=15                                  # kept back for the report phase (its cap)
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c 'import torch' 2>/dev/null; then
  PY="$ROOT/.venv/bin/python"
else PY=python3; fi                         # the device image's python3 holds CUDA torch
if [ "$MODE" != dry ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  # wheels carried to the device machine (scripts/device_wheels.sh): a target dir, not site-packages
  SITE="${TMPDIR:-/tmp}/r2d2_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$ROOT"/.whl/*.whl && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
    && echo "carried wheels installed: $(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')"
fi
OUT="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/r2d2_session.XXXXXX")"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export R2D2_BENCH_RUN="session-$(date -u +%Y%m%dT%H%M%SZ)"  # one run: ratios pair its rows
T0=$SECONDS
DEV=cuda
if [ "$MODE" = cpu ]; then
  DEV=cpu
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

# results file name: the harness's date + device slug (e.g. 2026-12-01_nvidia-h200)
if [ "$MODE" = dry ]; then
  STEM="$(date -u +%Y-%m-%d)_<device>"
elif [ "$DEV" = cpu ]; then
  STEM="$(date -u +%Y-%m-%d)_cpu"           # what harness.default_out_path names a CPU run
else
  STEM="$("$PY" benchmarks/harness.py outpath --device "$DEV" 2>/dev/null | xargs -r basename | sed 's/\.jsonl$//')"
  STEM="${STEM:-$(date -u +%Y-%m-%d)_unknown-$DEV}"
fi
JSONL="$OUT/$STEM.jsonl"
SUMMARY="$OUT/session.md"
: >"$LOGS/phases.tsv"

# ---------------------------------------------------------------- phase runner
want() { [ -z "$PHASES" ] || [[ ",$PHASES," == *",$1,"* ]]; }

write_summary() {
  {
    echo "# gpu_session.sh ($MODE) — $STEM"
    echo
    echo "budget ${BUDGET} s, elapsed $((SECONDS - T0)) s, run id $R2D2_BENCH_RUN"
    echo
    echo "| phase | status | exit | seconds | cap s |"
    echo "|---|---|---:|---:|---:|"
    awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}' "$LOGS/phases.tsv"
    echo
    [ -f "$LOGS/env.log" ] && { echo '## env'; echo '```'; cat "$LOGS/env.log"; echo '```'; }
    while IFS=$'\t' read -r name status rc secs cap; do
      if [ "$status" != ok ] && [ -f "$LOGS/$name.log" ]; then
        echo; echo "## $name ($status): last lines"; echo '```'; tail -25 "$LOGS/$name.log"; echo '```'
      fi
    done <"$LOGS/phases.tsv"
  } >"$SUMMARY"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}

record() {  # name status rc seconds cap
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$LOGS/phases.tsv"
  [ "$MODE" = dry ] || write_summary
}

# phase NAME CAP MIN CMD...: run CMD under min(CAP, what is left) seconds, output to the
# terminal and $LOGS/NAME.log; skip when less than MIN is left. R2D2_SESSION_CAP_<NAME> and
# R2D2_SESSION_MIN_<NAME> override CAP and MIN (the tests use them).
phase() {
  local name="$1" cap="$2" min="$3"; shift 3
  local var="R2D2_SESSION_CAP_${name^^}" mvar="R2D2_SESSION_MIN_${name^^}"
  cap="${!var:-$cap}"
  min="${!mvar:-$min}"
  [ "$min" -ge 1 ] || min=1               # `timeout 0` would mean no limit at all
  want "$name" || return 0
  if [ -z "$PHASES" ] && [[ " $OPT_IN " == *" $name "* ]]; then
    [ "$MODE" = dry ] && printf '%-19s (only with --phases %s)  %s\n' "$name" "$name" "$*"
    return 0
  fi
  local left=$((BUDGET - (SECONDS - T0) - RESERVE))
  [ "$name" = report ] && left=$((BUDGET - (SECONDS - T0)))
  local t=$((cap < left ? cap : left))
  if [ "$MODE" = dry ]; then
    printf '%-19s cap %4ss  min %3ss  %s\n' "$name" "$cap" "$min" "$*"
    record "$name" planned - - "$cap"
    PLANNED=$((PLANNED + cap))
    return 0
  fi
  if [ "$t" -lt "$min" ]; then
    echo "== $name: skipped, ${left}s left of the budget (needs ${min}s)"
    record "$name" "skipped (budget)" - 0 "$cap"
    return 0
  fi
  echo "== $name (timeout ${t}s, $((SECONDS - T0))s into the ${BUDGET}s budget)"
  local start=$SECONDS
  # functions run in a child bash (timeout execs a program); they and their variables are exported
  timeout -s INT -k 15 "$t" bash -c '"$@"' _ "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout
  elif [ "$rc" -ne 0 ]; then status=failed; fi
  echo "== $name: $status (exit $rc) in $((SECONDS - start))s"
  record "$name" "$status" "$rc" "$((SECONDS - start))" "$cap"
}

skip_phase() {  # name why
  want "$1" || return 0
  echo "== $1: skipped ($2)"
  record "$1" "skipped ($2)" - 0 -
}

# ---------------------------------------------------------------- the phases
bench() { "$PY" "benchmarks/$1" --device "$DEV" --out "$JSONL" "${@:2}"; }

env_info() {
  if [ "$DEV" = cuda ]; then nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; fi
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not importable")
for m in ("xformers", "apex", "xdist"):
    try:
        __import__(m); print(m, "importable")
    except ImportError:
        print(m, "absent")
EOF
}

build() {
  local arch
  arch="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')" || return 1
  echo "building r2d2._C for sm_$arch with MAX_JOBS=${MAX_JOBS:-16}"
  time R2D2_CUDA_ARCHS="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return 1
  "$PY" -c 'import r2d2, r2d2._C; print("r2d2._C:", r2d2._C.__file__)'
}

gpu_tests() {  # junit name, then test paths (none: every file but the kernels')
  local name="$1"; shift
  local par=() paths=("$@") ignore=()
  local workers="${R2D2_GPU_TEST_WORKERS:-4}"
  if [ "$workers" != 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then par=(-n "$workers"); fi
  if [ ${#paths[@]} -eq 0 ]; then
    paths=(tests); for f in $KERNEL_TESTS; do ignore+=(--ignore "$f"); done
  fi
  [ "$MODE" = cpu ] && { par=(); paths=(tests/bench/test_bench_harness.py); ignore=(); }  # gpu cases skip: plumbing
  # the runner first: a missing plugin would otherwise be one usage error with no test run
  "$PY" -m pytest --version || return 1
  "$PY" -c 'import pytest_timeout' 2>/dev/null || { echo "pytest-timeout is not installed"; return 1; }
  # SIGINT restored first: a program started in the background without job control inherits it
  # ignored, and pytest writes its junit on the interrupt the phase timeout sends
  "$PY" -c 'import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)
import pytest; sys.exit(pytest.main(sys.argv[1:]))' \
    -m gpu -q -rfEs -p no:cacheprovider --timeout 120 "${par[@]}" \
    --junitxml "$OUT/$name.xml" "${ignore[@]}" "${paths[@]}"
}

step_batch() {  # the batch the step phase measured at (so compile rows pair with its eager row)
  "$PY" - "$JSONL" <<'EOF'
import json, sys
b = None
try:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r.get("op") == "train_step" and r.get("provider") == "eager" and r.get("status") == "ok":
            b = r["shape"]["batch"]
except OSError:
    pass
print(b or "")
EOF
}

step_compile() {
  local b batch=(--batch-max 128)
  b="$(step_batch)"
  if [ -n "$b" ]; then batch=(--batch "$b"); else echo "no eager step row to pair with: --batch-max 128"; fi
  bench bench_step.py --preset base "${batch[@]}" --configs eager+compile ours+compile \
    --no-max-batch --rep-ms 1500
}
KERNEL_TESTS="tests/kernels/test_distill_kl.py tests/kernels/test_distill_kl_edges.py
  tests/kernels/test_contrastive.py tests/kernels/test_attention.py tests/kernels/test_attention_causal.py
  tests/kernels/test_kernels_gpu_limits.py tests/kernels/test_kernel_edges.py"
OPT_IN="step_compile"                       # phases that run only when --phases names them
PLANNED=0
export -f env_info build gpu_tests bench step_batch step_compile
export PY DEV JSONL OUT MODE KERNEL_TESTS

if [ "$MODE" = cpu ]; then
  phase env 30 5 env_info
  skip_phase build "--cpu: the package in place is used"
  phase doctor 60 10 "$PY" -m r2d2 doctor
  phase gpu_kernels 60 20 gpu_tests gpu_kernels $KERNEL_TESTS
  phase step 90 20 bench bench_step.py --preset tiny --batch 2 --configs eager ours apex --rep-ms 20 --no-max-batch
  phase kernels_distill_kl 60 15 bench bench_distill_kl.py --quick
  skip_phase kernels_contrastive "--cpu: the Triton interpreter takes minutes here"
  skip_phase kernels_attention "--cpu: the Triton interpreter takes minutes here"
  phase max_batch 60 15 bench bench_step.py --preset tiny --max-batch-only --max-batch-start 2 --max-batch-cap 4
  phase gpu_rest 60 20 gpu_tests gpu_rest
  skip_phase step_compile "--cpu: inductor's C++ build takes minutes here"
else
  phase env 15 5 env_info
  phase build 150 60 build
  phase doctor 15 5 "$PY" -m r2d2 doctor
  phase gpu_kernels 90 30 gpu_tests gpu_kernels $KERNEL_TESTS
  phase step 90 40 bench bench_step.py --preset base --batch-max 256 --configs eager ours apex --no-max-batch --rep-ms 1000 --budget 75
  phase kernels_distill_kl 25 10 bench bench_distill_kl.py --quick
  phase kernels_contrastive 35 15 bench bench_contrastive.py --quick
  phase kernels_attention 45 20 bench bench_attention.py --quick
  phase max_batch 30 15 bench bench_step.py --preset base --max-batch-only --max-batch-budget 22 --max-batch-start 256 --max-batch-granularity 256
  phase gpu_rest 20 10 gpu_tests gpu_rest
  phase step_compile 200 60 step_compile
fi
if [ "$MODE" = dry ] || [ -f "$JSONL" ]; then
  phase report 15 5 "$PY" benchmarks/report.py "$JSONL"
else
  skip_phase report "no rows were written"
fi

if [ "$MODE" = dry ]; then
  echo "caps of the planned phases: ${PLANNED}s"
  echo "budget ${BUDGET}s (reserve ${RESERVE}s for the report); results would go to $OUT/$STEM.{jsonl,md,png}"
  rm -rf "$LOGS"
  exit 0
fi
write_summary
rm -rf "$LOGS"
echo
cat "$SUMMARY" | sed -n '1,/^## /p' | grep -v '^## '
echo "results: $OUT/$STEM.{jsonl,md,png} (commit under benchmarks/results/), $SUMMARY, $OUT/gpu_kernels.xml, $OUT/gpu_rest.xml, $OUT/logs.tar.gz"
[ "$DEV" = cpu ] && echo "(CPU run: plumbing check; its figures are not GPU results)"
if grep -qE '\| (failed|timeout) \|' "$SUMMARY"; then exit 1; fi
if grep -q 'skipped (budget)' "$SUMMARY"; then exit 3; fi
exit 0
