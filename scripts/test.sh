#!/usr/bin/env bash
# The test command of the README and of CI: set up the venv, lint and format-check with ruff (the
# pyproject settings; stops at the first failure), compile-check the CUDA sources when nvcc is
# present, run the suite (slow cases deselected unless R2D2_SLOW=1). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${R2D2_VENV:-$ROOT/.venv}"
cd "$ROOT"
"$VENV/bin/ruff" check . ||
  { echo "test.sh: ruff check failed (ruff check --fix fixes some findings)" >&2; exit 1; }
"$VENV/bin/ruff" format --check . ||
  { echo "test.sh: ruff format --check failed (ruff format rewrites those files)" >&2; exit 1; }
if command -v nvcc >/dev/null 2>&1 && [ "${R2D2_SKIP_NVCC:-0}" != "1" ]; then
  PYTHON="$VENV/bin/python" bash csrc/check_nvcc.sh
fi
# Triton kernels run on CPU tensors through the interpreter; it must be set before triton imports.
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
MARK="not slow"
[ "${R2D2_SLOW:-0}" = "1" ] && MARK=""
exec "$VENV/bin/python" -m pytest -q -m "$MARK" "$@"
