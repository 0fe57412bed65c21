"""Benchmark distill_kl: every backend that runs on the device, against eager, in the same run.

GPU: eager vs triton vs cuda in bf16 at (4096, 4096) and (8192, 32768): the first takes the
      kernels' one-pass path (the row fits one tile / the block's registers), the second their
      two-pass path (see distill_kl/triton.py and csrc/distill_kl/distill_kl_kernel.cu).
CPU: eager vs cpp in fp32 at (256, 4096) (so the script and the C++ path are exercised in CI);
      never read these as GPU numbers.
``--shape RxC`` (repeatable) and ``--dtype`` replace those defaults.

Modes (the student requires grad in all of them, as in training):
  fwd      the loss; the fused backends also write d loss / d student here
  bwd      backward only, from one retained forward (gradients reset, not accumulated, per rep)
  fwd+bwd  both

GB/s is computed from the fused algorithm's minimum traffic for every provider, so its ratios
compare like with like (eager moves more bytes than this; that is the point of fusing). With
``e`` the input element size and ``g`` the saved gradient's (``e``, but 4 for float16 inputs):
  fwd      read student + teacher, write the saved gradient     = (2e + g) * R * C
  bwd      read the saved gradient, write d student             = (g + e) * R * C
  fwd+bwd  the sum                                              = (3e + 2g) * R * C
(per-row losses, 4 * R bytes, are ignored). Peak memory is measured for fwd+bwd.

    python benchmarks/bench_distill_kl.py [--quick] [--device cuda|cpu] [--shape RxC ...]
        [--dtype bfloat16|float16|float32] [--out PATH | --no-out]
"""

from __future__ import annotations

import argparse
import sys

import torch

from r2d2.bench import harness
from r2d2.kernels import distill_kl
from r2d2.kernels.dispatch import why_unavailable
from r2d2.kernels.distill_kl import saved_grad_dtype

TEMPERATURE = 2.0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def nbytes(mode: str, rows: int, cols: int, dtype: torch.dtype) -> int:
    """The fused algorithm's minimum traffic for ``mode`` (formula in the module docstring)."""
    e = torch.empty((), dtype=dtype).element_size()
    g = torch.empty((), dtype=saved_grad_dtype(dtype)).element_size()
    per_element = {"fwd": 2 * e + g, "bwd": g + e, "fwd+bwd": 3 * e + 2 * g}[mode]
    return per_element * rows * cols


def cases(device: str, quick: bool) -> tuple[list[tuple[int, int]], torch.dtype, list[str]]:
    """(shapes, dtype, providers) for the device."""
    if device == "cuda":
        shapes = [(4096, 4096)] if quick else [(4096, 4096), (8192, 32768)]
        return shapes, torch.bfloat16, ["eager", "triton", "cuda"]
    shapes = [(256, 4096)] if quick else [(256, 4096), (64, 32768)]
    return shapes, torch.float32, ["eager", "cpp"]


def run(
    device: str,
    quick: bool,
    shapes: list[tuple[int, int]] | None = None,
    dtype: torch.dtype | None = None,
    sink: harness.RowWriter | None = None,
) -> list[dict]:
    """Every (shape, backend, mode) row, each written to ``sink`` as soon as it is measured (a
    backend that cannot run here leaves a ``skipped`` row saying why)."""
    default_shapes, default_dtype, providers = cases(device, quick)
    shapes = shapes or default_shapes
    dtype = dtype or default_dtype
    sink = sink if sink is not None else harness.RowWriter(None)
    for n_rows, n_cols in shapes:
        torch.manual_seed(0)
        student = (torch.randn(n_rows, n_cols, device=device) * 3).to(dtype).requires_grad_(True)
        teacher = (torch.randn(n_rows, n_cols, device=device) * 3).to(dtype)
        for backend in providers:
            why = why_unavailable("distill_kl", backend, device)
            if why is not None:
                print(f"[skip] distill_kl backend={backend}: {why}", file=sys.stderr)
                sink.add(
                    harness.status_row(
                        op="distill_kl",
                        provider=backend,
                        mode="fwd+bwd",
                        shape={"rows": n_rows, "cols": n_cols},
                        status="skipped",
                        error=why,
                        device=device,
                        dtype=str(dtype).removeprefix("torch."),
                    )
                )
                continue

            def fwd(backend=backend, student=student, teacher=teacher):
                return distill_kl(student, teacher, temperature=TEMPERATURE, backend=backend)

            for mode, (fn, grad_to_none) in harness.modes(fwd, [student]).items():
                timing = harness.measure(fn, device=device, grad_to_none=grad_to_none)
                peak = harness.peak_memory_bytes(fn, device) if mode == "fwd+bwd" else None
                student.grad = None
                sink.add(
                    harness.make_row(
                        op="distill_kl",
                        provider=backend,
                        mode=mode,
                        shape={"rows": n_rows, "cols": n_cols},
                        timing=timing,
                        nbytes=nbytes(mode, n_rows, n_cols, dtype),
                        peak_mem=peak,
                        device=device,
                        dtype=str(dtype).removeprefix("torch."),
                        temperature=TEMPERATURE,
                    )
                )
    return harness.add_ratios(sink.rows, baseline="eager")


def _shape(text: str) -> tuple[int, int]:
    try:
        r, c = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape {text!r}: expected ROWSxCOLS, e.g. 4096x4096"
        ) from None
    if r < 1 or c < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: rows and cols must be >= 1")
    return r, c


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        type=_shape,
        action="append",
        metavar="RxC",
        help="rows x cols to run instead of the device's defaults (repeatable)",
    )
    ap.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="input dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    args = ap.parse_args(argv)
    sink = harness.RowWriter(args.out)
    rows = run(args.device, args.quick, args.shape, DTYPES.get(args.dtype), sink=sink)
    harness.print_table(rows)
    if args.out:
        print(f"rows appended to {args.out} as measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
