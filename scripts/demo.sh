#!/usr/bin/env bash
# The README's first command: set up the venv, pre-train the tiny R2D2 on the embedded synthetic
# image-text set (CPU, a few minutes), then zero-shot retrieval on held-out synthetic pairs, printed
# as R@1/5/10 against chance. Idempotent: a finished run is not retrained (it is resumed at its
# last step, which only re-exports and re-evaluates); an interrupted one continues where it stopped.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh --train.max_steps=100`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${R2D2_VENV:-$ROOT/.venv}"
OUT="${R2D2_DEMO_OUT:-$ROOT/runs/demo}"
cd "$ROOT"
RESUME=()
if [ -f "$OUT/checkpoints/latest" ]; then
  echo "demo: $OUT has a run; resuming it (a finished run is only re-evaluated)"
  RESUME=(--resume)
fi
start=$(date +%s)
"$VENV/bin/python" -m r2d2 pretrain --config tiny --out "$OUT" "${RESUME[@]}" "$@"
echo "demo: done in $(( $(date +%s) - start )) s; run folder $OUT (log.jsonl, loss.png, tb/, model/, eval.json)"
# The check the demo exists for: retrieval must be far above chance on pairs never trained on.
"$VENV/bin/python" - "$OUT/eval.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
chance = max(e["chance_r1_i2t"], e["chance_r1_t2i"])
ok = min(e["i2t_r1"], e["t2i_r1"]) > 5 * chance
print(f"demo: R@1 i2t {e['i2t_r1']:.1f} / t2i {e['t2i_r1']:.1f} vs chance {chance:.1f} -> "
      f"{'well above chance' if ok else 'NOT above chance'}")
sys.exit(0 if ok else 1)
PY
