"""Benchmark the GCPR contrastive loss: eager (materialised b x B logits) vs the fused backends.

GPU (bf16): b = B in {4k, 16k, 64k} x d in {512, 768, 1024}, modes fwd / bwd / fwd+bwd, time
and peak memory (above the inputs), every provider with the R2D2 targets (ids in pairs, a
teacher mixed in at alpha = 0.4) unless said:
  eager       open_clip-style eager in the input dtype: ``contrastive_loss_ref(...,
              compute_dtype=bf16)``: the [b, B] logits of both directions (two matmuls), the
              targets, log-softmax and their gradients, all bf16 (what open_clip's ClipLoss
              does under autocast). The baseline of the ratios ("x eager").
  eager_fp32  the reference as ``backend="eager"`` runs it: features upcast to fp32, every
              [b, B] buffer fp32 (twice eager's memory; the spec, not a fair speed baseline).
  triton      the fused Triton kernels (tensor-core dots); same semantics.
  cuda        the fused CUDA kernels (CUDA cores, fp32 math); same semantics.
  inf_cl      Inf-CL's ``cal_inf_loss`` when the ``inf_cl`` package is importable, once per
              direction: one-hot diagonal labels, no teacher, fp32 inside. A different, easier
              loss, listed as the memory / speed reference the issue names, not as equal work.
Then, per provider, the largest b = B (doubling from 4k up to a cap of 2^19) whose fwd+bwd fits
at d = 768: capacity rows (``max_batch``; ``search_complete`` false when the cap or a probe
slower than 30 s stopped the search before an OOM, ``search_ended`` says which; ``batch_ratio``
against eager's).
CPU (--quick or --device cpu): small sizes, fp32, eager vs triton under TRITON_INTERPRET=1;
these rows are labelled with the CPU device and say nothing about GPU speed.

FLOPs (useful work, the same for every provider so that TFLOP/s compare like with like, units
of 2 b B d): fwd 2 (the similarity and the teacher's), bwd 2 (the dI and dT products), fwd+bwd
4. Eager spends 4 forward (two matmuls per similarity) and 4 backward; the fused kernels 2
forward and 6 backward (2 + 2 recomputed similarities and the 2 products).

    python benchmarks/bench_contrastive.py [--quick] [--device cuda|cpu] [--out PATH | --no-out]
"""

from __future__ import annotations

import os
import sys
import time

if "TRITON_INTERPRET" not in os.environ:
    import torch as _t

    if not _t.cuda.is_available():  # the interpreter must be chosen before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

from r2d2.bench import harness
from r2d2.kernels.contrastive import contrastive_loss, contrastive_loss_ref
from r2d2.kernels.dispatch import why_unavailable

ALPHA = 0.4
SCALE = 1 / 0.07
MAX_B_START, MAX_B_CAP, MAX_B_DIM = 4096, 1 << 19, 768
OP = "contrastive"
MODES = ("fwd", "bwd", "fwd+bwd")
PROBE_LIMIT_S = 30.0  # a fitting probe slower than this ends the capacity search (next is ~4x)


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
    ids = torch.arange(b, device=device) // 2  # pairs of captions per image
    s = torch.tensor(SCALE, device=device, requires_grad=True)
    return img, txt, s, ids, f(), f()


def _loss_fn(provider, img, txt, s, ids, t_img, t_txt):
    if provider == "inf_cl":
        cal = _inf_cl()

        def fwd():
            return 0.5 * (cal(img, txt, scale=s) + cal(txt, img, scale=s))

        return fwd
    kw = dict(image_ids=ids, teacher_image_feat=t_img, teacher_text_feat=t_txt, distill_alpha=ALPHA)
    if provider in ("eager", "eager_fp32"):
        dt = img.dtype if provider == "eager" else torch.float32

        def fwd():
            return contrastive_loss_ref(img, txt, s, compute_dtype=dt, **kw)

        return fwd

    def fwd():
        return contrastive_loss(img, txt, s, backend=provider, **kw)

    return fwd


def _available(provider, device):
    if provider == "inf_cl":
        if device != "cuda":
            return "inf_cl runs on CUDA only"
        return None if _inf_cl() is not None else "the inf_cl package is not installed"
    if provider == "eager_fp32":
        return None
    return why_unavailable(OP, provider, device)


def flops(mode: str, b: int, d: int) -> int:
    """Useful work of the R2D2 semantics (module docstring), the same for every provider."""
    return {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[mode] * 2 * b * b * d


def _semantics(provider):
    if provider == "inf_cl":
        return "one-hot, no teacher (2 cal_inf_loss calls)"
    return f"ids (pairs) + teacher alpha={ALPHA}"


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _fits(provider, b, d, dtype, device) -> bool:
    try:
        img, txt, s, ids, ti, tt = _inputs(b, d, dtype, device)
        _loss_fn(provider, img, txt, s, ids, ti, tt)().backward()
        torch.cuda.synchronize()
        return True
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _oom(e):
            raise
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(provider, d, dtype, device) -> tuple[int | None, int | None, str]:
    """(largest b = B that fits, smallest that failed or None, why the search ended)."""
    b, best = MAX_B_START, None
    while b <= MAX_B_CAP:
        t0 = time.monotonic()
        if not _fits(provider, b, d, dtype, device):
            return best, b, "out of memory"
        best, b = b, b * 2
        if time.monotonic() - t0 > PROBE_LIMIT_S and b <= MAX_B_CAP:
            return best, None, f"a probe took over {PROBE_LIMIT_S:.0f} s"
    return best, None, f"cap {MAX_B_CAP}"


def cases(device: str, quick: bool):
    """(sizes, dims, dtype, providers) for the device."""
    if device == "cuda":
        sizes = [4096] if quick else [4096, 16384, 65536]
        dims = [512] if quick else [512, 768, 1024]
        return sizes, dims, torch.bfloat16, ["eager", "eager_fp32", "triton", "cuda", "inf_cl"]
    # fp32 inputs: eager_fp32 would repeat eager exactly, so it is left out.
    sizes, dims = ([48], [16]) if quick else ([64, 200], [32, 64])
    return sizes, dims, torch.float32, ["eager", "triton"]


def run(device: str, quick: bool, sink: harness.RowWriter) -> list[dict]:
    sizes, dims, dtype, providers = cases(device, quick)
    dt_name = str(dtype).removeprefix("torch.")
    live = []
    for p in providers:
        why = _available(p, device)
        if why is None:
            live.append(p)
            continue
        print(f"[skip] {OP} provider={p}: {why}", file=sys.stderr)
        sink.add(
            harness.status_row(
                op=OP,
                provider=p,
                mode="fwd+bwd",
                shape={},
                status="skipped",
                error=why,
                device=device,
                dtype=dt_name,
            )
        )
    for b in sizes:
        for d in dims:
            shape = {"b": b, "B": b, "d": d}
            for p in live:
                _bench_case(p, b, d, dtype, device, shape, sink)
    if device == "cuda" and not quick:
        _capacity(live, dtype, device, sink)
    return sink.rows


def _bench_case(p, b, d, dtype, device, shape, sink) -> None:
    common = dict(
        op=OP,
        provider=p,
        shape=shape,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        semantics=_semantics(p),
    )
    for mode in MODES:
        # One mode at a time: bwd retains a forward graph (for eager at 64k, tens of GB) that
        # must be gone before the next mode is measured.
        try:
            img, txt, s, ids, ti, tt = _inputs(b, d, dtype, device)
            fn, grad_to_none = harness.modes(
                _loss_fn(p, img, txt, s, ids, ti, tt), [img, txt, s], (mode,)
            )[mode]
            timing = harness.measure(fn, device=device, grad_to_none=grad_to_none)
            peak = harness.peak_memory_bytes(fn, device)
            sink.add(
                harness.make_row(
                    mode=mode, timing=timing, flops=flops(mode, b, d), peak_mem=peak, **common
                )
            )
        except Exception as e:  # noqa: BLE001
            status = "oom" if _oom(e) else "failed"
            print(f"[{status}] {p} {mode} at {shape}: {e}", file=sys.stderr)
            sink.add(harness.status_row(mode=mode, status=status, error=e, **common))
        fn = grad_to_none = img = txt = s = ti = tt = None
        _free(device)


def _free(device):
    if device == "cuda":
        torch.cuda.empty_cache()


def _capacity(live, dtype, device, sink) -> None:
    found = {}
    for p in live:
        shape = {"d": MAX_B_DIM}
        try:
            best, fails, ended = largest_batch(p, MAX_B_DIM, dtype, device)
        except Exception as e:  # noqa: BLE001
            sink.add(
                harness.status_row(
                    op="max_batch",
                    provider=p,
                    mode="fwd+bwd",
                    shape=shape,
                    status="failed",
                    error=e,
                    device=device,
                )
            )
            continue
        complete = fails is not None
        print(
            f"largest b = B that fits, d={MAX_B_DIM} {dtype}, {p}: {best}"
            + ("" if complete else f" (search stopped: {ended}; it may fit more)")
        )
        found[p] = sink.add(
            harness.make_row(
                op="max_batch",
                provider=p,
                mode="fwd+bwd",
                shape=shape,
                timing=None,
                device=device,
                dtype=str(dtype).removeprefix("torch."),
                max_batch=best,
                max_batch_fails=fails,
                max_batch_cap=MAX_B_CAP,
                search_complete=complete,
                search_ended=ended,
                semantics=_semantics(p),
            )
        )
    base = found.get("eager")
    for r in found.values():
        if base is not None and base.get("max_batch") and r.get("max_batch"):
            r["batch_ratio"] = r["max_batch"] / base["max_batch"]


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    sink = harness.RowWriter(args.out)
    rows = run(args.device, args.quick, sink)
    harness.print_table(rows)
    if args.out:
        print(f"rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
