"""Benchmark the GCPR contrastive loss: eager (materialised b x B logits) vs the fused backends.

GPU (bf16): b = B in {4k, 16k, 64k} x d in {512, 768, 1024}, fwd+bwd time and peak memory for
  eager      r2d2.kernels.contrastive_loss_ref: open_clip-style logits + log_softmax, with the
             R2D2 targets (ids with repeats, teacher softmax mixed in, alpha = 0.4)
  triton     the fused Triton kernels, same semantics
  cuda       the fused CUDA kernels (CUDA cores, no tensor cores), same semantics
  inf_cl     Inf-CL's ``cal_inf_loss`` when the ``inf_cl`` package is importable. It computes a
             different, easier loss (one-hot diagonal labels, no teacher), called once per
             direction; listed as the memory/speed reference the issue names, not as equal work.
  then, per provider, the largest B (doubling from 4k) whose fwd+bwd fits in GPU memory.
CPU (--quick or --device cpu): small sizes, fp32, eager vs triton under TRITON_INTERPRET=1; these
  rows are labelled with the CPU device and say nothing about GPU speed.

FLOPs (useful work, the same for every provider so ratios compare like with like): forward
2 directions x 2bBd for the student (+ the same for the teacher), backward 2 directions x 2
matmuls x 2bBd; the fused backends also recompute the similarity in backward (not counted).

    python benchmarks/bench_contrastive.py [--quick] [--device cuda|cpu] [--out PATH]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "TRITON_INTERPRET" not in os.environ:
    import torch as _t

    if not _t.cuda.is_available():  # the interpreter must be chosen before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (benchmarks/harness.py)

from r2d2.kernels.contrastive import contrastive_loss  # noqa: E402
from r2d2.kernels.dispatch import why_unavailable  # noqa: E402

ALPHA = 0.4
SCALE = 1 / 0.07


def _inf_cl():
    try:
        from inf_cl import cal_inf_loss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return cal_inf_loss


def _inputs(b, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)

    def f():
        return F.normalize(torch.randn(b, d, device=device, generator=g), dim=1).to(dtype)

    img, txt = f().requires_grad_(), f().requires_grad_()
    ids = torch.arange(b, device=device) // 2          # pairs of captions per image
    s = torch.tensor(SCALE, device=device, requires_grad=True)
    return img, txt, s, ids, f(), f()


def _fwd(provider, img, txt, s, ids, t_img, t_txt):
    if provider == "inf_cl":
        cal = _inf_cl()
        labels = torch.arange(img.shape[0], device=img.device)

        def fwd():
            return 0.5 * (cal(img.float(), txt.float(), labels, scale=s) +
                          cal(txt.float(), img.float(), labels, scale=s))
        return fwd

    def fwd():
        return contrastive_loss(img, txt, s, image_ids=ids, teacher_image_feat=t_img,
                                teacher_text_feat=t_txt, distill_alpha=ALPHA, backend=provider)
    return fwd


def _available(provider, device):
    if provider == "inf_cl":
        if device != "cuda":
            return "inf_cl runs on CUDA only"
        return None if _inf_cl() is not None else "the inf_cl package is not installed"
    return why_unavailable("contrastive", provider, device)


def _flops(b, d):
    return (4 + 4 + 8) * b * b * d


def _fits(provider, b, d, dtype, device) -> bool:
    try:
        img, txt, s, ids, ti, tt = _inputs(b, d, dtype, device)
        _fwd(provider, img, txt, s, ids, ti, tt)().backward()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(provider, d, dtype, device, start=4096, limit=1 << 18) -> int | None:
    b, best = start, None
    while b <= limit and _fits(provider, b, d, dtype, device):
        best, b = b, b * 2
    return best


def run(device: str, quick: bool) -> list[dict]:
    if device == "cuda":
        sizes = [4096] if quick else [4096, 16384, 65536]
        dims = [512] if quick else [512, 768, 1024]
        dtype, providers = torch.bfloat16, ["eager", "triton", "cuda", "inf_cl"]
    else:
        sizes, dims = ([64], [32]) if quick else ([64, 256], [32, 64])
        dtype, providers = torch.float32, ["eager", "triton"]
    live = []
    for p in providers:
        why = _available(p, device)
        if why is None:
            live.append(p)
        else:
            print(f"[skip] contrastive provider={p}: {why}", file=sys.stderr)
    rows = []
    for b in sizes:
        for d in dims:
            for p in live:
                img, txt, s, ids, ti, tt = _inputs(b, d, dtype, device)
                fwd = _fwd(p, img, txt, s, ids, ti, tt)
                shape = {"b": b, "B": b, "d": d}
                try:
                    fn, grad_to_none = harness.modes(fwd, [img, txt, s], ("fwd+bwd",))["fwd+bwd"]
                    timing = harness.measure(fn, device=device, grad_to_none=grad_to_none)
                    peak = harness.peak_memory_bytes(fn, device)
                except torch.OutOfMemoryError:
                    print(f"[oom] {p} at {shape}", file=sys.stderr)
                    torch.cuda.empty_cache()
                    continue
                rows.append(harness.make_row(
                    op="contrastive", provider=p, mode="fwd+bwd", shape=shape, timing=timing,
                    flops=_flops(b, d), peak_mem=peak, device=device,
                    dtype=str(dtype).removeprefix("torch."),
                    semantics="one-hot, no teacher" if p == "inf_cl" else
                    f"ids (pairs) + teacher alpha={ALPHA}"))
                del img, txt, s, fwd
    rows = harness.add_ratios(rows, baseline="eager")
    if device == "cuda" and not quick:
        for p in live:
            best = largest_batch(p, 768, dtype, device)
            print(f"largest b = B that fits, d=768 bf16, {p}: {best}")
            for r in rows:
                if r["provider"] == p:
                    r["largest_B_d768"] = best
    return rows


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = run(args.device, args.quick)
    harness.print_table(rows)
    if args.out:
        print(f"rows appended to {harness.write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
