"""Benchmark attention at R2D2's shapes: every provider that runs on the device, in one run.

GPU (bf16, D = 64, batch 256, H in {12, 16}; --quick: batch 64, H 12):
  text self     64 x 64, key padding ~40% (caption lengths uniform in [13, 64]: 39.8% expected;
                the drawn fraction is stored per row as ``key_padding``)
  image self    197 x 197 and 257 x 257, no mask
  cross t->i    64 x 257 (text queries, image keys), no mask
  cross i->t    257 x 64 (image queries, text keys), text key padding ~40%
  decoder self  causal (``causal=True``, the captioning decoder): 32 x 32 and 64 x 64 unpadded,
                where the ``sdpa`` providers run torch SDPA's own ``is_causal=True`` (flash
                included), and 64 x 64 with caption padding (SDPA then needs the combined
                boolean mask); --quick: 64 x 64 unpadded only
Modes: fwd, bwd (backward of one retained forward, the forward not timed) and fwd+bwd.
Providers: eager; sdpa (torch's own pick) and each SDPA backend forced through
torch.nn.attention.sdpa_kernel (flash, efficient, cudnn, math; one that refuses the case, e.g.
flash with a mask, is reported and skipped); xformers when installed; ours triton and cuda; and
auto (what ``backend="auto"`` picks for the case's class, stored as ``auto_pick``).
CPU (--device cpu, fp32, tiny shapes, a causal one among them): eager vs sdpa vs triton under
TRITON_INTERPRET=1. The
interpreter is a correctness tool; its times say nothing about GPU speed. Never read CPU rows as
GPU results, and never write them into benchmarks/results (pass --no-out or --out /tmp/...).

FLOPs count only unmasked work, the same for every provider of a case: with v_b valid keys and
u_b useful queries of batch row b (valid queries for padded self-attention, all queries
otherwise), fwd = 4 H D sum_b u_b v_b (two matmuls; causal: 4 H D x the (query, key) pairs
that are visible and unpadded, about half); bwd = 2.5 x fwd (five matmuls: the score
recompute, dV, dP, dQ, dK); fwd+bwd = 3.5 x fwd. Columns: "x eager" from the harness, plus
"x best sdpa" printed below the table and stored as ``ratio_best_sdpa`` (best SDPA backend's
median / row's median, > 1 = faster).

    python benchmarks/bench_attention.py [--quick] [--device cuda|cpu] [--out PATH | --no-out]
"""

from __future__ import annotations

import math
import os
import sys

import torch

if not torch.cuda.is_available():  # the Triton interpreter must be chosen before triton imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

from r2d2.bench import harness
from r2d2.kernels import attention
from r2d2.kernels.attention.reference import causal_mask
from r2d2.kernels.dispatch import why_unavailable

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
PAD_LO = 0.2  # caption lengths uniform in [ceil(0.2 L), L]: ~40% of the keys are padding


def cases(device: str, quick: bool) -> tuple[list[dict], torch.dtype]:
    """Shapes as dicts: name, B, H, Lq, Lk, D, qmask (queries padded like the keys), kmask."""
    if device == "cuda":
        B, D = (64, 64) if quick else (256, 64)
        heads = (12,) if quick else (12, 16)
        base = [
            dict(name="text_self", Lq=64, Lk=64, kmask=True, qmask=True),
            dict(name="image_self", Lq=197, Lk=197, kmask=False, qmask=False),
            dict(name="image_self", Lq=257, Lk=257, kmask=False, qmask=False),
            dict(name="cross_t2i", Lq=64, Lk=257, kmask=False, qmask=False),
            dict(name="cross_i2t", Lq=257, Lk=64, kmask=True, qmask=False),
        ]
        # The captioning decoder's causal self-attention (D = 64 like every GPU preset).
        base += [dict(name="decoder_self", Lq=64, Lk=64, kmask=False, qmask=False, causal=True)]
        if not quick:
            base += [
                dict(name="decoder_self", Lq=32, Lk=32, kmask=False, qmask=False, causal=True),
                dict(name="decoder_self", Lq=64, Lk=64, kmask=True, qmask=True, causal=True),
            ]
        return [dict(c, B=B, H=h, D=D) for h in heads for c in base], torch.bfloat16
    # The interpreter's time grows with programs x tiles (16 x 16 each): --quick keeps one case
    # of two key tiles and one head, and a causal one of a single tile.
    if quick:
        return [
            dict(name="text_self", Lq=24, Lk=24, kmask=True, qmask=True, B=2, H=1, D=16),
            dict(name="decoder_self", Lq=16, Lk=16, kmask=False, qmask=False, B=1, H=1, D=16)
            | dict(causal=True),
        ], torch.float32
    base = [
        dict(name="text_self", Lq=32, Lk=32, kmask=True, qmask=True),
        dict(name="cross_i2t", Lq=37, Lk=64, kmask=True, qmask=False),
        dict(name="decoder_self", Lq=32, Lk=32, kmask=False, qmask=False, causal=True),
    ]
    return [dict(c, B=2, H=2, D=32) for c in base], torch.float32


def providers(device: str) -> list[tuple[str, str, object]]:
    """(label, attention backend, sdpa_kernel backend or None)."""
    out = [("eager", "eager", None), ("sdpa", "sdpa", None)]
    if device == "cuda":
        from torch.nn.attention import SDPBackend

        out += [
            (f"sdpa-{name}", "sdpa", getattr(SDPBackend, member))
            for name, member in (
                ("flash", "FLASH_ATTENTION"),
                ("efficient", "EFFICIENT_ATTENTION"),
                ("cudnn", "CUDNN_ATTENTION"),
                ("math", "MATH"),
            )
            if hasattr(SDPBackend, member)
        ]
        out += [("xformers", "xformers", None), ("cuda", "cuda", None)]
    out.append(("triton", "triton", None))
    if device == "cuda":
        out.append(("auto", "auto", None))
    return out


def make_inputs(c: dict, dtype: torch.dtype, device: str):
    """q, k, v leaves, the key mask (or None), forward FLOPs of the unmasked work, and the
    fraction of keys that are padding."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, D, Lk = c["B"], c["H"], c["D"], c["Lk"]
    q = torch.randn(B, H, c["Lq"], D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, Lk, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, Lk, D, generator=g).to(device, dtype).requires_grad_()
    mask = None
    valid_k = torch.full((B,), Lk)
    if c["kmask"]:
        lo = math.ceil(PAD_LO * Lk)  # 13 for L = 64
        valid_k = torch.randint(lo, Lk + 1, (B,), generator=g)
        mask = (torch.arange(Lk)[None, :] < valid_k[:, None]).to(device)
    useful_q = valid_k if c["qmask"] else torch.full((B,), c["Lq"])
    if c.get("causal"):  # the (query, key) pairs that are visible (bottom-right) and unpadded
        vis = causal_mask(c["Lq"], Lk)[None]
        vis = vis & (torch.arange(Lk)[None, None, :] < valid_k[:, None, None])
        vis = vis & (torch.arange(c["Lq"])[None, :, None] < useful_q[:, None, None])
        fwd_flops = 4.0 * H * D * float(vis.sum())
    else:
        fwd_flops = 4.0 * H * D * float((useful_q * valid_k).sum())
    return q, k, v, mask, fwd_flops, 1.0 - float(valid_k.sum()) / (B * Lk)


def run(device: str, quick: bool, out: str | None = None) -> list[dict]:
    """Every case x provider x mode; each row is appended to ``out`` as soon as it is measured
    (a run killed by a time limit keeps its rows), a provider that cannot run or refuses the case
    gets a "skipped" row (an OOM an "oom" row) saying why."""
    shape_list, dtype = cases(device, quick)
    sink = harness.RowWriter(out)
    dt = str(dtype).removeprefix("torch.")
    for c in shape_list:
        q, k, v, mask, fwd_flops, pad = make_inputs(c, dtype, device)
        shape = {k_: c[k_] for k_ in ("name", "B", "H", "Lq", "Lk", "D")}
        shape["padded"] = c["kmask"]
        causal = bool(c.get("causal"))
        if causal:  # only then: the other cases' shape strings (and stored rows) read as before
            shape["causal"] = True
        extra = {"key_padding": round(pad, 4), "dtype": dt}

        def no_timing(label, status, error, shape=shape, extra=extra):
            print(f"[{status}] {shape_str(shape)} {label}: {error}", file=sys.stderr)
            for mode in MODES:
                sink.add(
                    harness.status_row(
                        op="attention",
                        provider=label,
                        mode=mode,
                        shape=shape,
                        status=status,
                        error=error,
                        device=device,
                        **extra,
                    )
                )

        for label, backend, sdp in providers(device):
            why = None if backend == "auto" else why_unavailable("attention", backend, device)
            if why is not None:
                no_timing(label, "skipped", why)
                continue

            def fwd(backend=backend, sdp=sdp, q=q, k=k, v=v, mask=mask, causal=causal):
                kw = dict(key_padding_mask=mask, causal=causal, backend=backend)
                if sdp is None:
                    return attention(q, k, v, **kw)
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel(sdp):
                    return attention(q, k, v, **kw)

            try:  # an SDPA backend that refuses the case (flash + mask) raises here
                fwd().sum().backward()
            except torch.cuda.OutOfMemoryError as e:
                no_timing(label, "oom", f"OutOfMemoryError: {str(e).splitlines()[0][:200]}")
                continue
            except RuntimeError as e:
                no_timing(label, "skipped", f"refused: {str(e).splitlines()[0][:200]}")
                continue
            finally:
                q.grad = k.grad = v.grad = None
            row_extra = dict(extra)
            if backend == "auto":
                row_extra["auto_pick"] = auto_pick_of(q, k, mask, causal)
            for mode, (fn, grad_to_none) in harness.modes(fwd, [q, k, v], which=MODES).items():
                timing = harness.measure(fn, device=device, grad_to_none=grad_to_none)
                peak = harness.peak_memory_bytes(fn, device) if mode == "fwd+bwd" else None
                q.grad = k.grad = v.grad = None
                row = harness.make_row(
                    op="attention",
                    provider=label,
                    mode=mode,
                    shape=shape,
                    timing=timing,
                    flops=fwd_flops * FLOP_FACTOR[mode],
                    peak_mem=peak,
                    device=device,
                    **row_extra,
                )
                # SDPA providers come first, so the ratio is final when this row is written.
                row["ratio_best_sdpa"] = best_sdpa_ratio(row, sink.rows)
                sink.add(row)
    rows = sink.rows
    for r in rows:  # the SDPA rows themselves, now that every SDPA backend of a case is in
        r["ratio_best_sdpa"] = best_sdpa_ratio(r, rows)
    return rows


def auto_pick_of(q: torch.Tensor, k: torch.Tensor, mask, causal: bool = False) -> str | None:
    """The backend auto chose for this case's training class (measured in the warm-up call)."""
    from r2d2.kernels.attention import auto_class, auto_picks

    pick = auto_picks().get(auto_class(q, k, mask, grad=True, causal=causal))
    return pick.backend if pick else None


def shape_str(shape: dict) -> str:
    return harness.shape_str(shape)


def best_sdpa_ratio(row: dict, rows: list[dict]) -> float | None:
    """The fastest timed SDPA row of ``row``'s (shape, mode) among ``rows``, divided by ``row``'s
    median (> 1 = ``row`` is faster)."""
    key = (harness.shape_str(row["shape"]), row["mode"])
    best = min(
        (
            r["median_ms"]
            for r in rows
            if r["provider"].startswith("sdpa")
            and r.get("median_ms")
            and (harness.shape_str(r["shape"]), r["mode"]) == key
        ),
        default=None,
    )
    return best / row["median_ms"] if best and row.get("median_ms") else None


def print_summary(rows: list[dict]) -> None:
    ours = [
        r
        for r in rows
        if r["provider"] in ("triton", "cuda", "xformers", "auto") and r.get("median_ms")
    ]
    if not ours:
        return
    print(
        "\nours vs the best SDPA backend and vs eager (median ratios, > 1 = faster; TFLOP/s of "
        "the unmasked work):"
    )
    for r in ours:
        pick = f" (-> {r['auto_pick']})" if r.get("auto_pick") else ""
        print(
            f"  {harness.shape_str(r['shape']):<52} {r['mode']:<8} {r['provider']:<8} "
            f"x best sdpa {r['ratio_best_sdpa'] or float('nan'):.2f}   "
            f"x eager {r.get('ratio') or float('nan'):.2f}   "
            f"{(r.get('tflops') or 0):.1f} TFLOP/s   pad {r['key_padding']:.1%}{pick}"
        )


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = run(args.device, args.quick, args.out)
    harness.print_table(rows)
    print_summary(rows)
    if args.out:
        print(f"rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
