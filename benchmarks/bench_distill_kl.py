"""Benchmark distill_kl: every backend that runs on the device, against eager, in the same run.

GPU: eager vs triton vs cuda in bf16 at (4096, 4096) and (8192, 32768).
CPU: eager vs cpp in fp32 at (256, 4096) (so the script and the C++ path are exercised in CI);
      never read these as GPU numbers.

Modes (the student requires grad in all of them, as in training):
  fwd      the loss; the fused backends also write d loss / d student here
  bwd      backward only, from one retained forward (gradients reset, not accumulated, per rep)
  fwd+bwd  both

GB/s is computed from the fused algorithm's minimum traffic for every provider, so its ratios
compare like with like (eager moves more bytes than this; that is the point of fusing):
  fwd      read student + teacher, write the gradient  = 3 * R * C * elt_size
  bwd      read the saved gradient, write d student    = 2 * R * C * elt_size
  fwd+bwd  5 * R * C * elt_size
(per-row losses, 4 * R bytes, are ignored). Peak memory is measured for fwd+bwd.

    python benchmarks/bench_distill_kl.py [--quick] [--device cuda|cpu] [--out PATH | --no-out]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
from benchmarks import harness  # noqa: E402
from r2d2.kernels import distill_kl  # noqa: E402
from r2d2.kernels.dispatch import why_unavailable  # noqa: E402

TEMPERATURE = 2.0
BYTES_PER_ELEMENT = {"fwd": 3, "bwd": 2, "fwd+bwd": 5}  # times R * C * elt_size (see above)


def cases(device: str, quick: bool) -> tuple[list[tuple[int, int]], torch.dtype, list[str]]:
    """(shapes, dtype, providers) for the device."""
    if device == "cuda":
        shapes = [(4096, 4096)] if quick else [(4096, 4096), (8192, 32768)]
        return shapes, torch.bfloat16, ["eager", "triton", "cuda"]
    shapes = [(256, 4096)] if quick else [(256, 4096), (64, 32768)]
    return shapes, torch.float32, ["eager", "cpp"]


def run(device: str, quick: bool) -> list[dict]:
    shapes, dtype, providers = cases(device, quick)
    rows: list[dict] = []
    for n_rows, n_cols in shapes:
        torch.manual_seed(0)
        student = (torch.randn(n_rows, n_cols, device=device) * 3).to(dtype).requires_grad_(True)
        teacher = (torch.randn(n_rows, n_cols, device=device) * 3).to(dtype)
        elt = student.element_size()
        for backend in providers:
            why = why_unavailable("distill_kl", backend, device)
            if why is not None:
                print(f"[skip] distill_kl backend={backend}: {why}", file=sys.stderr)
                continue

            def fwd(backend=backend):
                return distill_kl(student, teacher, temperature=TEMPERATURE, backend=backend)

            for mode, (fn, grad_to_none) in harness.modes(fwd, [student]).items():
                timing = harness.measure(fn, device=device, grad_to_none=grad_to_none)
                peak = harness.peak_memory_bytes(fn, device) if mode == "fwd+bwd" else None
                student.grad = None
                rows.append(harness.make_row(
                    op="distill_kl", provider=backend, mode=mode,
                    shape={"rows": n_rows, "cols": n_cols}, timing=timing,
                    nbytes=BYTES_PER_ELEMENT[mode] * n_rows * n_cols * elt, peak_mem=peak,
                    device=device, dtype=str(dtype).removeprefix("torch."),
                    temperature=TEMPERATURE))
    return harness.add_ratios(rows, baseline="eager")


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = run(args.device, args.quick)
    harness.print_table(rows)
    if args.out:
        print(f"rows appended to {harness.write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
