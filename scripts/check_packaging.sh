#!/usr/bin/env bash
# Packaging check (CI): r2d2-engine installs as a user would install it and works from outside the
# checkout, without pip ever fetching a second torch.
#
#   1. The working tree (tracked + untracked-but-not-ignored files: what a fresh clone plus local
#      edits holds, no build outputs) is copied to a temporary folder.
#   2. An sdist (`python -m build --sdist`) and a wheel (`pip wheel .`) are built from it with
#      pip's build isolation: no torch there, so both are pure Python plus the C++ sources.
#   3. Each is installed into a fresh venv that already has torch, the README's way
#      (`pip install torch==2.13.0`: the CPU wheel on this machine's find-links), then, from a
#      folder outside the checkout: `import r2d2._C` (compiled on first use into the extension
#      cache, or found there), `r2d2 doctor`, `r2d2 presets`, 3 steps of
#      `r2d2 pretrain --config tiny`, `r2d2 bench kernels --quick`. Each install's log must
#      show torch already satisfied (no "Downloading torch", no other torch version).
#
# Environment:
#   R2D2_PKG_WORK       work folder (default: a new /tmp/r2d2-pkg.XXXX, removed on success)
#   R2D2_PKG_EXT_CACHE  the first-use build's cache (default ~/.cache/r2d2/pkgcheck-ext: it
#                       compiles when torch or csrc/ changed, ~3-5 min on 2 cores, else loads)
#   R2D2_PKG_AOT=1      also install the sdist with --no-build-isolation (builds r2d2._C at
#                       install time, ~3-5 min more)
#   R2D2_TORCH          the torch requirement preinstalled in the venvs (default torch==2.13.0)
set -euo pipefail
quiet_pip() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T0=$(date +%s)
say() { echo "[packaging +$(( $(date +%s) - T0 ))s] $*"; }
PY="${PYTHON:-python3}"
TORCH_REQ="${R2D2_TORCH:-torch==2.13.0}"
WORK="${R2D2_PKG_WORK:-$(mktemp -d /tmp/r2d2-pkg.XXXX)}"
export R2D2_EXT_CACHE="${R2D2_PKG_EXT_CACHE:-$HOME/.cache/r2d2/pkgcheck-ext}"
mkdir -p "$WORK"

say "copying the working tree to $WORK/src"
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
   | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
   | xargs -0 cp --parents -t "$WORK/src")

TOOLS="$WORK/tools"
if [ ! -x "$TOOLS/bin/python" ]; then
  "$PY" -m venv "$TOOLS"
  quiet_pip "$TOOLS/bin/pip" install -q build
fi
say "sdist (python -m build --sdist, isolated)"
rm -rf "$WORK/dist"
quiet_pip "$TOOLS/bin/python" -m build --sdist --outdir "$WORK/dist" "$WORK/src" >"$WORK/sdist.log" 2>&1 \
  || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/r2d2_engine-*.tar.gz)
tar tzf "$SDIST" >"$WORK/sdist.txt"  # listed first: grep -q closing a pipe early trips pipefail
for need in csrc/module.cpp csrc/distill_kl/distill_kl.h r2d2/configs/tiny.yaml r2d2/bench/harness.py; do
  grep -q "/$need\$" "$WORK/sdist.txt" || { echo "sdist lacks $need" >&2; exit 1; }
done
say "wheel (pip wheel ., isolated)"
quiet_pip "$TOOLS/bin/pip" wheel -q --no-deps -w "$WORK/dist" "$WORK/src" >"$WORK/wheel.log" 2>&1 \
  || { cat "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/r2d2_engine-*.whl)
"$TOOLS/bin/python" -m zipfile -l "$WHEEL" >"$WORK/wheel.txt"
for need in r2d2/csrc/module.cpp r2d2/configs/tiny.yaml r2d2/bench/bench_distill_kl.py r2d2/_C.py; do
  grep -q "^$need " "$WORK/wheel.txt" || { echo "wheel lacks $need" >&2; exit 1; }
done
if grep -q "r2d2/_C[^/]*\.so" "$WORK/wheel.txt"; then
  echo "the isolated wheel holds a compiled r2d2._C (built against some other torch)" >&2; exit 1
fi

try_install() {  # try_install NAME ARTIFACT [pip args...]
  local name="$1" art="$2" venv="$WORK/venv-$1"
  shift 2
  say "[$name] fresh venv + $TORCH_REQ (the README's way)"
  rm -rf "$venv" && "$PY" -m venv "$venv"
  quiet_pip "$venv/bin/pip" install -q "$TORCH_REQ"
  if [ "$name" = "sdist-aot" ]; then  # --no-build-isolation builds with the venv's own tools
    quiet_pip "$venv/bin/pip" install -q setuptools wheel ninja
  fi
  local before
  before=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
  say "[$name] pip install $* $(basename "$art")"
  local t=$(date +%s)
  quiet_pip "$venv/bin/pip" install "$@" "$art" >"$WORK/install-$name.log" 2>&1 \
    || { cat "$WORK/install-$name.log"; return 1; }
  say "[$name] installed in $(( $(date +%s) - t ))s"
  if grep -Ei "(Downloading|Collecting) torch[-=]" "$WORK/install-$name.log"; then
    echo "[$name] pip fetched a torch while installing r2d2-engine" >&2; return 1
  fi
  local after
  after=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
  [ "$before" = "$after" ] || { echo "[$name] torch changed: $before -> $after" >&2; return 1; }

  local out="$WORK/outside-$name"
  rm -rf "$out" && mkdir -p "$out"
  (
    cd "$out"
    export PATH="$venv/bin:$PATH" TRITON_INTERPRET=1 OMP_NUM_THREADS=1
    unset PYTHONPATH
    t=$(date +%s)
    python -c "import r2d2, r2d2._C; assert '$venv' in r2d2.__file__, r2d2.__file__; print('r2d2._C:', r2d2._C.__file__)"
    say "[$name] import r2d2._C: $(( $(date +%s) - t ))s"
    r2d2 doctor | tee doctor.txt
    grep -Eq "^r2d2._C +CPU" doctor.txt || { echo "[$name] doctor: r2d2._C not loaded" >&2; exit 1; }
    r2d2 presets >presets.txt && grep -q "^  tiny " presets.txt
    t=$(date +%s)
    r2d2 pretrain --config tiny --train.max_steps=3 --logging.progress=false --out run
    test -f run/config.yaml
    say "[$name] pretrain --config tiny, 3 steps: $(( $(date +%s) - t ))s"
    t=$(date +%s)
    r2d2 bench kernels --quick --device cpu --out bench/rows.jsonl
    test -s bench/rows.jsonl
    say "[$name] bench kernels --quick: $(( $(date +%s) - t ))s"
  )
}

try_install wheel "$WHEEL"
try_install sdist "$SDIST"
if [ "${R2D2_PKG_AOT:-0}" = "1" ]; then
  try_install sdist-aot "$SDIST" --no-build-isolation  # needs setuptools/wheel in the venv
fi
say "all passed (sdist $(basename "$SDIST"), wheel $(basename "$WHEEL"))"
[ -n "${R2D2_PKG_WORK:-}" ] || rm -rf "$WORK"
