#!/usr/bin/env bash
# Build r2d2._C with its CUDA part against the CUDA build of the same torch version, on a machine
# without a GPU, import it and check that every r2d2:: op has a CUDA kernel registered.
#
#   1. The CUDA torch lives in its own venv in a cache folder outside the checkout, made once and
#      reused: ${R2D2_CUDA_TORCH_CACHE:-$HOME/.cache/r2d2/cuda-torch-<version>}. <version> is the
#      checkout venv's torch version without its local tag (2.13.0+cpu -> 2.13.0), or
#      R2D2_CUDA_TORCH_VERSION. The wheel comes from pip's default index (PyPI's Linux torch is
#      the CUDA build), with the nvidia-* runtime packages it depends on: without them
#      `import torch` fails (libcudart & co. are loaded at import); the first run shows that.
#   2. The sources (setup.py, pyproject.toml, csrc/, r2d2/ without any built _C) are copied to a
#      temporary folder and built there with `setup.py build_ext --inplace`: the checkout's CPU
#      r2d2/_C*.so, build/ and .venv are never touched. CUDA_HOME is left as the caller has it,
#      so setup.py's own toolkit discovery is what is exercised.
#   3. `import r2d2._C` in the CUDA venv (no GPU needed to import), r2d2._C.cuda_built() is true,
#      and for every op whose schema is registered under r2d2:: (listed from the registry, so a
#      new op is checked without editing this script) a CUDA kernel is registered.
#
# Environment: R2D2_CUDA_TORCH_CACHE, R2D2_CUDA_TORCH_VERSION, MAX_JOBS (default 2),
# R2D2_CUDA_ARCHS (setup.py's, default "80;90"), R2D2_KEEP_BUILD=1 keeps the temp build folder.
set -euo pipefail
quiet_pip() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T0=$(date +%s)
say() { echo "[cuda-build +$(( $(date +%s) - T0 ))s] $*"; }

if ! command -v nvcc >/dev/null 2>&1; then
  echo "[cuda-build] no nvcc on PATH: nothing to build the CUDA part with" >&2
  exit 1
fi
VER="${R2D2_CUDA_TORCH_VERSION:-}"
if [ -z "$VER" ] && [ -x "$ROOT/.venv/bin/python" ]; then
  VER=$("$ROOT/.venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
fi
VER="${VER:-2.13.0}"
CACHE="${R2D2_CUDA_TORCH_CACHE:-$HOME/.cache/r2d2/cuda-torch-$VER}"
VENV="$CACHE/venv"
VPY="$VENV/bin/python"
STAMP="$CACHE/ready"
case "$CACHE/" in
  "$ROOT"/*) echo "[cuda-build] the cache $CACHE is inside the checkout; put it elsewhere" >&2; exit 1 ;;
esac

# ---- 1. the CUDA torch venv, made once ---------------------------------------------------------
if [ -f "$STAMP" ] && [ -x "$VPY" ] && "$VPY" -c "import torch" >/dev/null 2>&1; then
  say "reusing the CUDA torch in $VENV ($(cat "$STAMP"))"
else
  say "no usable CUDA torch $VER in $CACHE: installing it there (a few GB, once)"
  rm -rf "$VENV" "$STAMP"
  mkdir -p "$CACHE"
  "${PYTHON:-python3}" -m venv "$VENV"
  quiet_pip "$VPY" -m pip install -q --upgrade pip setuptools wheel ninja
  # "===" is an exact string match: it rules out this machine's local 2.13.0+cpu wheel (pip's
  # find-links), which "==2.13.0" would accept and prefer.
  say "pip install --no-deps torch===$VER (the CUDA wheel from the default index)"
  quiet_pip "$VPY" -m pip install -q --no-deps "torch===$VER"
  # Its pure-Python dependencies first, so that the import below can only fail for want of the
  # CUDA runtime libraries.
  mapfile -t PYDEPS < <("$VPY" - <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for r in map(Requirement, requires("torch") or []):
    if (r.marker is None or r.marker.evaluate({"extra": ""})) and not r.name.startswith(("nvidia-", "cuda-")):
        print(str(r).split(";")[0].strip())
PY
)
  [ "${#PYDEPS[@]}" -gt 0 ] && quiet_pip "$VPY" -m pip install -q "${PYDEPS[@]}"
  if "$VPY" -c "import torch" >"$CACHE/import-without-nvidia.log" 2>&1; then
    say "note: import torch works without the nvidia-* packages"
  else
    say "as expected, import torch fails without the nvidia-* runtime packages:" \
      "$(grep -E 'Error|error' "$CACHE/import-without-nvidia.log" | tail -1)"
  fi
  say "pip install torch===$VER with its dependencies (nvidia-* runtime packages)"
  quiet_pip "$VPY" -m pip install -q "torch===$VER" numpy
  "$VPY" - <<'PY'
import sys, torch
from importlib.metadata import distributions
if torch.version.cuda is None:
    sys.exit(f"[cuda-build] {torch.__version__} is not a CUDA build")
nv = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].startswith("nvidia-"))
print(f"[cuda-build] torch {torch.__version__}, CUDA {torch.version.cuda}; {len(nv)} nvidia-* packages")
PY
  "$VPY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)" > "$STAMP"
  say "CUDA torch ready: $(cat "$STAMP"); $(du -sh "$VENV" | cut -f1) in $VENV"
fi
TORCH_CUDA=$("$VPY" -c "import torch; print(torch.version.cuda or '')")
[ -n "$TORCH_CUDA" ] || { echo "[cuda-build] $VENV has no CUDA torch" >&2; exit 1; }

# ---- 2. build a copy of the sources ------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/r2d2-cuda-build.XXXXXX")"
if [ "${R2D2_KEEP_BUILD:-0}" = "1" ]; then
  say "build folder kept: $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
cp "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/"
[ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$WORK/"
cp -r "$ROOT/csrc" "$WORK/csrc"
(cd "$ROOT" && tar cf - --exclude='__pycache__' --exclude='_C*.so' --exclude='_C*.pyd' r2d2) \
  | (cd "$WORK" && tar xf -)
say "building r2d2._C with CUDA $TORCH_CUDA in $WORK (MAX_JOBS=${MAX_JOBS:-2}, sm ${R2D2_CUDA_ARCHS:-80;90})"
B0=$(date +%s)
if ! (cd "$WORK" && env -u R2D2_FORCE_CPU -u R2D2_SKIP_EXT MAX_JOBS="${MAX_JOBS:-2}" \
        "$VPY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1); then
  tail -n 60 "$WORK/build.log" >&2
  echo "[cuda-build] FAILED: the CUDA build of r2d2._C (log above)" >&2
  exit 1
fi
grep -E "^r2d2: " "$WORK/build.log" || true
say "built in $(( $(date +%s) - B0 ))s: $(cd "$WORK" && ls r2d2/_C*.so)"

# ---- 3. import it and check the registrations --------------------------------------------------
(cd "$WORK" && env -u TRITON_INTERPRET PYTHONPATH="$WORK" "$VPY" - <<'PY'
import os, sys
import torch
import r2d2._C as C
assert C.__file__.startswith(os.getcwd()), C.__file__
if not C.cuda_built():
    sys.exit("[cuda-build] FAILED: r2d2._C was built without its CUDA part")
names = sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("r2d2::")})
if not names:
    sys.exit("[cuda-build] FAILED: no r2d2:: op schema is registered")
missing = []
print(f"[cuda-build] torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
print(f"[cuda-build] {'op':<40} CPU  CUDA")
for n in names:
    cpu = torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
    print(f"[cuda-build] {n:<40} {'yes' if cpu else 'no ':<4} {'yes' if cuda else 'NO'}")
    if not cuda:
        missing.append(n)
if missing:
    sys.exit(f"[cuda-build] FAILED: no CUDA kernel registered for {', '.join(missing)}")
print(f"[cuda-build] OK: all {len(names)} r2d2:: ops have a CUDA kernel")
PY
)
say "done"
