"""Attention for R2D2's shapes: padded text self-attention, image self-attention, cross-attention.

    out[b, h, i] = sum_j dropout(softmax_j(scale * q[b,h,i] . k[b,h,j] + mask[b,j])) v[b,h,j]

q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` (Lq != Lk allowed), ``key_padding_mask`` ``[B, Lk]``
bool with True = attend. A query whose keys are all masked returns zeros with zero gradients
(eager softmax would return NaN; padded rows of a batch must not poison the batch).

Masked keys are never read, on every backend: whatever k and v hold where ``key_padding_mask`` is
False (NaN, inf, garbage) changes neither the output nor any gradient, and their own gradients are
exactly zero. The fused kernels load them as zeros; eager, sdpa and xformers zero them first (one
copy of k and v per masked call), since SDPA would otherwise turn ``NaN + -inf`` into NaN for the
whole row and ``0 * NaN`` into NaN for every query.

Empty inputs: any of B, H, Lq, D equal to 0 gives an empty ``[B, H, Lq, D]`` output (as torch
SDPA; the default scale ``1/sqrt(D)`` is not evaluated for D = 0) and empty gradients on every
backend; Lk = 0 (no key at all) gives zeros, like a fully masked query.

Backends (see dispatch.py):
  eager     ``attention_ref``: fp32 math, the spec and the test oracle.
  sdpa      torch SDPA with a boolean mask (fully masked rows attend everywhere, then are zeroed).
  xformers  ``memory_efficient_attention`` with an additive bias whose rows are 8-aligned.
  triton    attention_triton.py: flash-style forward with per-tile padding skip, LSE-recompute
            backward, Philox dropout.
  cuda      csrc/attention: torch.ops.r2d2.attention_fwd / attention_bwd (CUDA builds only).
  auto      CPU (and any non-CUDA device): sdpa, never the Triton interpreter.
            CUDA: per shape class, the fastest of the runnable candidates (cuda, triton, xformers,
            sdpa) measured on the first call of the class; see below.

How auto picks on CUDA. A class is (device, dtype, Lq and Lk rounded up to a power of two >= 16,
D rounded up to a multiple of 32, masked or not, dropout or not, and fwd+bwd when autograd
records the call (grad enabled, an input requires grad) else fwd only). So padded text 64 x 64,
image 197 (bucket 256) and 257 (bucket 512), cross 64 x 257 and their training and no-grad
variants are each measured once per device and process. The first call of a class times every
candidate on fresh random inputs shaped like that call (its Lq, Lk, D, H, its mask rows and
dropout p; B cut so B*H*Lq*Lk <= 2^24): 2 untimed warm-up calls, then 3 to 10 timed calls until
~2 ms is measured, median kept: a few ms per candidate, ~10 ms per class once kernels are
compiled (Triton's first compile and autotune of a shape, seconds, comes on top, once per
process). It runs on a
fresh thread (so a first call inside activation checkpointing, or under no_grad/inference_mode,
does not leak into the timing), under enable_grad, on new leaves, with the RNG state restored
afterwards. Each process measures for itself: under DDP two ranks may pick different backends for
a class (their results agree to rounding; set ``R2D2_ATTENTION_AUTO`` to pin one everywhere). The result is logged once per class at INFO on the ``r2d2.kernels``
logger: ``attention auto: <class> -> <backend> (<timings>; at <shape>)``; a candidate that
raises is logged at WARNING and not picked; if none runs, the call raises (nothing is cached).
``R2D2_ATTENTION_AUTO=<backend>`` replaces the measurement for every class. ``auto_picks()``
returns what was picked; ``auto_timings_clear()`` forgets it; ``export_picks()`` /
``load_picks()`` carry the picks through a training checkpoint (a resumed run, on every rank,
keeps the backends the run trained with). ``auto_backend("attention", dev)``
(``r2d2 doctor``) knows no shape and reports the reference class: R2D2 text self-attention in
training (B 32, H 12, 64 tokens with ~40% padding, D 64, bf16). Under torch.compile the first
call of a class is a graph break (the measurement runs eagerly); do not let it happen inside CUDA
graph capture (it then uses sdpa for that call and measures later).

Dropout RNG differs by backend (eager and sdpa use torch's generator; triton and cuda share one
Philox stream seeded from torch's CPU generator); each backend's backward reuses its forward's
mask.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r2d2 import _ext
from r2d2.kernels.dispatch import (BackendUnavailable, OpSpec, register_op, resolve,
                                   why_unavailable)

log = logging.getLogger("r2d2.kernels")
EXT_OP = "attention_fwd"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, key_padding_mask):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(x).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, L, D]; got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"attention: k and v must be [B={B}, H={H}, Lk, D={D}] and equal; got "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if not (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype):
        raise TypeError(f"attention: q, k, v must share one floating dtype; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, "
                         f"{v.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"attention: key_padding_mask must be a bool tensor or None, got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_padding_mask must be bool (True = attend), got "
                            f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be [B={B}, Lk={k.shape[2]}], got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on "
                             f"{q.device}")


def _default_scale(q) -> float:
    """``1/sqrt(D)``; 1.0 for D = 0, where the output is empty and the scale is never used."""
    D = q.shape[-1]
    return 1.0 / math.sqrt(D) if D > 0 else 1.0


def _zero_masked_keys(k, v, key_padding_mask):
    """k and v with the rows of masked keys set to 0 (their gradients are then exactly 0), so that
    a NaN or inf there cannot reach a score, an output or a gradient."""
    if key_padding_mask is None:
        return k, v
    drop = ~key_padding_mask[:, None, :, None]
    return k.masked_fill(drop, 0), v.masked_fill(drop, 0)


def attention_ref(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, generator=None,
                  dropout_mask=None):
    """Plain-PyTorch attention in fp32; the spec and the test oracle.

    ``dropout_mask`` (bool ``[B, H, Lq, Lk]``, True = keep) replaces the random draw, so a
    kernel's own dropout mask can be checked exactly.
    """
    scale = _default_scale(q) if scale is None else scale
    k, v = _zero_masked_keys(k, v, key_padding_mask)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        m = key_padding_mask[:, None, None, :]
        # finfo.min (not -inf) keeps fully masked rows finite; they are zeroed below.
        s = s.masked_fill(~m, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    if key_padding_mask is not None:
        p = p * key_padding_mask.any(-1).to(p.dtype)[:, None, None, None]
    if dropout_p > 0.0:
        keep = dropout_mask
        if keep is None:
            keep = torch.rand(p.shape, device=p.device, generator=generator) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    return torch.matmul(p, v.float()).to(q.dtype)


def attention_sdpa(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None):
    """torch SDPA with the contract's mask semantics (fully masked queries -> zeros, masked keys
    never read)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    valid = key_padding_mask.any(-1)
    # SDPA adds -inf to masked scores (NaN + -inf = NaN) and multiplies masked values by 0
    # (0 * NaN = NaN): zero the masked keys and values first.
    k, v = _zero_masked_keys(k, v, key_padding_mask)
    # SDPA returns NaN for a row with no key; let such rows attend everywhere (to zeros), then
    # zero them (where(), not a product: their gradients are exactly 0 too).
    m = (key_padding_mask | ~valid[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, scale=scale)
    return torch.where(valid[:, None, None, None], out, out.new_zeros(()))


def attention_xformers(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None):
    """xformers memory_efficient_attention ([B, L, H, D] layout) with an additive key bias."""
    import xformers.ops as xops

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    bias = None
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask.any(-1)
        # -inf bias plus a NaN score is NaN, and 0 * a NaN value is NaN: zero masked keys/values.
        k, v = _zero_masked_keys(k, v, key_padding_mask)
        keep = key_padding_mask | ~valid[:, None]  # fully masked rows: attend all, zeroed below
        # xformers needs the bias's last dim allocated at a multiple of 8: slice a padded buffer.
        lk_pad = (Lk + 7) // 8 * 8
        buf = torch.zeros((B, 1, Lq, lk_pad), device=q.device, dtype=q.dtype)
        buf[..., :Lk].masked_fill_(~keep[:, None, None, :], float("-inf"))
        bias = buf[..., :Lk].expand(B, H, Lq, Lk)  # broadcast over heads: stride 0, no copy
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p,
        scale=scale).transpose(1, 2)
    if valid is not None:
        out = torch.where(valid[:, None, None, None], out, out.new_zeros(()))
    return out


# ----------------------------------------------------------------------------------------------
# Fused kernels (triton, cuda): one autograd.Function, two pairs of (fwd, bwd) launchers.


def _triton_fns():
    from r2d2.kernels import attention_triton  # imports triton: only when this backend runs

    return attention_triton.fwd, attention_triton.bwd


def _cuda_fns():
    def fwd(q, k, v, mask, scale, dropout_p, seed, offset):
        return torch.ops.r2d2.attention_fwd(q, k, v, mask, scale, dropout_p, seed, offset)

    def bwd(do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset):
        return torch.ops.r2d2.attention_bwd(do, q, k, v, o, lse, mask, scale, dropout_p, seed,
                                            offset)

    return fwd, bwd


_FNS = {"triton": _triton_fns, "cuda": _cuda_fns}


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, dropout_p, seed, offset, fns):
        fwd, bwd = fns
        o, lse = fwd(q, k, v, mask, scale, dropout_p, seed, offset)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.args = (scale, dropout_p, seed, offset, bwd)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not differentiable
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        scale, dropout_p, seed, offset, bwd = ctx.args
        dq, dk, dv = bwd(do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset)
        return dq, dk, dv, None, None, None, None, None, None


def _fused(backend, q, k, v, key_padding_mask, dropout_p, scale):
    scale = _default_scale(q) if scale is None else float(scale)
    if q.dtype not in _DTYPES:
        raise TypeError(f"attention (backend={backend!r}): dtype {q.dtype} unsupported; expected "
                        f"one of {[str(d) for d in _DTYPES]}")
    seed = offset = 0
    if dropout_p > 0.0:
        # Drawn from torch's CPU generator, so torch.manual_seed makes the mask reproducible.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    fns = _FNS[backend]()
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return fns[0](q, k, v, mask, scale, float(dropout_p), seed, offset)[0]  # nothing saved
    return _FusedAttention.apply(q, k, v, mask, scale, float(dropout_p), seed, offset, fns)


# ----------------------------------------------------------------------------------------------
# auto: measured per shape class, not guessed.
#
# The fastest backend depends on the shape (64-token padded text, 197/257-token images, 64 x 257
# cross-attention differ), on whether autograd records (training wants the fastest fwd+bwd, an
# eval loop the fastest forward) and on mask and dropout. So a pick is kept per class: the first
# call of a class times every runnable candidate on fresh inputs shaped like that call, and every
# later call of the class reuses the winner.

_AUTO_CANDIDATES = ("cuda", "triton", "xformers", "sdpa")
_MEASURED_DEVICE_TYPES = ("cuda",)  # elsewhere auto is sdpa (never the Triton interpreter)
_AUTO_MAX_SCORES = 1 << 24  # B is cut so that one timed call computes at most this many scores
_AUTO_WARMUP = 2  # untimed calls per candidate (Triton compiles and autotunes in these)
_AUTO_REPS = (3, 10)  # timed calls per candidate: at least, at most ...
_AUTO_BUDGET_MS = 2.0  # ... stopping once this much has been timed
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class AutoPick:
    """What ``auto`` chose for one shape class, and why."""

    backend: str
    timings_ms: dict[str, float]  # median ms per candidate that ran
    failed: dict[str, str]  # candidate -> the error it raised (never picked)
    unavailable: dict[str, str]  # candidate -> why it cannot run here
    measured_at: str  # the shape timed, e.g. "B=21 H=12 Lq=257 Lk=257 D=64"
    source: str  # "measured", "checkpoint" (load_picks) or "R2D2_ATTENTION_AUTO"


@dataclass(frozen=True)
class _Probe:
    """The inputs a measurement times: shaped like the first call of a class."""

    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    dtype: torch.dtype
    device: torch.device
    mask: torch.Tensor | None  # [B, Lk] bool (the caller's rows; copied before use)
    dropout_p: float
    grad: bool


_PICKS: dict[tuple, AutoPick] = {}
_PICKS_LOCK = threading.RLock()


def _bucket(n: int, lo: int = 16) -> int:
    """Smallest power of two >= n (at least ``lo``): 64 -> 64, 197 -> 256, 257 -> 512."""
    e = lo
    while e < n:  # comparisons only, so torch.compile can trace it with symbolic sizes
        e *= 2
    return e


def _bucket_d(d: int) -> int:
    """D rounded up to a multiple of 32 (the CUDA kernel's padding): 64 -> 64, 80 -> 96."""
    e = 32
    while e < d:
        e += 32
    return e


def _class_key(device: torch.device, dtype, Lq, Lk, D, masked: bool, dropout: bool,
               grad: bool) -> tuple:
    # A plain tuple (not a dataclass) so a compiled caller's lookup traces without a graph break.
    return (device.type, device.index, dtype, _bucket(Lq), _bucket(Lk), _bucket_d(D), masked,
            dropout, grad)


def _class_str(key: tuple) -> str:
    dev_type, index, dtype, lq, lk, d, masked, dropout, grad = key
    dev = dev_type if index is None else f"{dev_type}:{index}"
    return (f"{dev} {_DTYPE_NAMES.get(dtype, str(dtype))} Lq<={lq} Lk<={lk} D<={d} "
            f"{'masked' if masked else 'unmasked'}{' dropout' if dropout else ''} "
            f"{'fwd+bwd' if grad else 'fwd'}")


def _reference_probe(device: torch.device) -> _Probe:
    """R2D2 text self-attention for training: B 32, H 12, 64 tokens, D 64, bf16, caption lengths
    uniform in [13, 64] (39.8% padding on average)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = torch.randint(13, 65, (32,), generator=g)
    mask = (torch.arange(64)[None, :] < lens[:, None]).to(device)
    return _Probe(32, 12, 64, 64, 64, torch.bfloat16, device, mask, 0.0, True)


def _call_probe(q, k, mask, dropout_p: float, grad: bool) -> _Probe:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    b = max(1, min(B, _AUTO_MAX_SCORES // max(1, H * Lq * Lk)))
    m = None if mask is None else mask[:b]  # the caller's padding (tile skipping depends on it)
    return _Probe(b, H, Lq, Lk, D, q.dtype, q.device, m, float(dropout_p), grad)


def _median_ms(call, device: torch.device) -> float:
    for _ in range(_AUTO_WARMUP):
        call()
    times: list[float] = []
    while len(times) < _AUTO_REPS[1] and (len(times) < _AUTO_REPS[0] or
                                          sum(times) < _AUTO_BUDGET_MS):
        if device.type == "cuda":
            with torch.cuda.device(device):
                start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                call()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_backend(backend: str, probe: _Probe) -> float:
    """Median ms of one call of ``backend`` on fresh random inputs shaped like ``probe``: forward
    and backward if ``probe.grad``, else the forward alone under no_grad.

    Runs under ``inference_mode(False)`` and ``enable_grad`` whatever the caller's mode (the
    first call of an eval loop must still be able to time a training class), on new leaves (never
    the caller's tensors), inside ``fork_rng`` so the caller's random stream is not advanced.
    """
    dev = probe.device
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode(False), torch.random.fork_rng(
            devices=[dev] if dev.type == "cuda" else []):
        q, k, v = (torch.randn((probe.B, probe.H, L, probe.D), generator=g)
                   .to(dev, probe.dtype).requires_grad_(probe.grad)
                   for L in (probe.Lq, probe.Lk, probe.Lk))
        do = torch.randn(q.shape, generator=g).to(dev, probe.dtype)
        # A copy made here is a normal tensor even if the probe's was made in inference mode (the
        # fused backends save the mask for backward, which an inference tensor refuses).
        mask = None if probe.mask is None else probe.mask.clone()

        def call():
            with torch.enable_grad() if probe.grad else torch.no_grad():
                out = attention(q, k, v, key_padding_mask=mask, dropout_p=probe.dropout_p,
                                backend=backend)
                if probe.grad:
                    torch.autograd.grad(out, (q, k, v), do)

        return _median_ms(call, dev)


def _time_candidates(probe: _Probe, device: torch.device, name: str):
    timings, failed, unavailable = {}, {}, {}
    for b in _AUTO_CANDIDATES:
        why = why_unavailable("attention", b, device)
        if why is not None:
            unavailable[b] = why
            continue
        try:
            timings[b] = float(_time_backend(b, probe))
        except Exception as e:  # noqa: BLE001 - any failure disqualifies the candidate
            first = (str(e).strip().splitlines() or [""])[0][:200]
            failed[b] = f"{type(e).__name__}: {first}"
            log.warning("attention auto: %s: candidate %r failed and is not picked: %s", name,
                        b, failed[b])
    return timings, failed, unavailable


def _isolated(fn, *args):
    """Run ``fn(*args)`` on a fresh thread and return its result (or raise its exception).

    Autograd's per-call context is thread-local: grad mode, inference mode, saved-tensor hooks
    and activation checkpointing's recomputation frames. The first call of a class often comes
    from inside a checkpointed block's forward, where the probe's own backward would be taken for
    the checkpoint's recomputation (every candidate then fails); a fresh thread times the
    candidates in a clean context whatever the caller is doing."""
    out: dict = {}

    def run():
        try:
            if args[1].type == "cuda":
                torch.cuda.set_device(args[1])  # the current device is per thread too
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="r2d2-attention-auto", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@torch.compiler.disable  # under torch.compile: one graph break, the first time a class is seen
def _measure(key: tuple, q=None, k=None, mask=None, dropout_p: float = 0.0) -> str:
    """Pick (and remember) the backend for class ``key``; q/k/mask are the first call's (None:
    the reference class of ``_auto_pick``)."""
    with _PICKS_LOCK:
        hit = _PICKS.get(key)
        if hit is not None:
            return hit.backend
        name = _class_str(key)
        device = torch.device(key[0], key[1])
        env = os.environ.get("R2D2_ATTENTION_AUTO")
        if env:
            if env not in SPEC.backends:
                raise ValueError(f"R2D2_ATTENTION_AUTO={env!r} is not an attention backend; "
                                 f"expected one of {SPEC.backends}")
            why = why_unavailable("attention", env, device)
            if why is not None:
                raise BackendUnavailable(f"attention: R2D2_ATTENTION_AUTO={env!r}: {why}")
            _PICKS[key] = AutoPick(env, {}, {}, {}, "", "R2D2_ATTENTION_AUTO")
            log.info("attention auto: %s -> %s (R2D2_ATTENTION_AUTO)", name, env)
            return env
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Timing would sync inside the capture; use sdpa for this call, remember nothing.
            log.warning("attention auto: %s first seen inside CUDA graph capture: not measured, "
                        "sdpa used for this call (warm up outside the capture or pass backend=)",
                        name)
            return "sdpa"
        probe = (_reference_probe(device) if q is None else
                 _call_probe(q, k, mask, dropout_p, grad=key[-1]))
        timings, failed, unavailable = _isolated(_time_candidates, probe, device, name)
        at = f"B={probe.B} H={probe.H} Lq={probe.Lq} Lk={probe.Lk} D={probe.D}"
        if not timings:
            raise RuntimeError(
                f"attention auto: no candidate ran for {name} (at {at}): "
                + "; ".join(f"{b}: {e}" for b, e in {**failed, **unavailable}.items())
                + ". Pass backend= explicitly or set R2D2_ATTENTION_AUTO.")
        pick = min(timings, key=timings.get)
        _PICKS[key] = AutoPick(pick, timings, failed, unavailable, at, "measured")
        parts = [f"{b} {t:.3f} ms" for b, t in sorted(timings.items(), key=lambda x: x[1])]
        parts += [f"{b} failed" for b in failed]
        log.info("attention auto: %s -> %s (%s; at %s)", name, pick, ", ".join(parts), at)
        return pick


def _auto_for_call(q, k, v, key_padding_mask, dropout_p: float) -> str:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if B * H * Lq * Lk * D == 0:
        return "eager"  # nothing to compute, nothing to measure
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = _class_key(q.device, q.dtype, Lq, Lk, D, key_padding_mask is not None, dropout_p > 0.0,
                     grad)
    hit = _PICKS.get(key)
    if hit is not None:
        return hit.backend
    return _measure(key, q, k, key_padding_mask, dropout_p)


def _auto_pick(device: torch.device) -> str | None:
    """dispatch's auto_fn (``auto_backend``, ``describe``, ``r2d2 doctor``), which knows the
    device only: sdpa off CUDA; on CUDA the pick for the reference class (``_reference_probe``,
    text self-attention in training), measured on first use. Calls pick per their own class."""
    if device.type not in _MEASURED_DEVICE_TYPES:
        return "sdpa"
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = _class_key(device, torch.bfloat16, 64, 64, 64, True, False, True)
    hit = _PICKS.get(key)
    return hit.backend if hit is not None else _measure(key)


def auto_class(q, k, key_padding_mask=None, dropout_p: float = 0.0,
               grad: bool | None = None) -> str:
    """The class description ``auto`` files a call with these arguments under (the key of
    ``auto_picks()``); ``grad=None`` takes it from the current grad mode and q/k's requires_grad
    (v is taken to be like k)."""
    if grad is None:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return _class_str(_class_key(q.device, q.dtype, q.shape[2], k.shape[2], q.shape[3],
                                 key_padding_mask is not None, dropout_p > 0.0, grad))


def auto_picks() -> dict[str, AutoPick]:
    """Every class ``auto`` has picked for so far (class description -> AutoPick)."""
    with _PICKS_LOCK:
        return {_class_str(k): p for k, p in _PICKS.items()}


def auto_timings_clear() -> None:
    """Forget every pick (tests, or after changing R2D2_ATTENTION_AUTO)."""
    with _PICKS_LOCK:
        _PICKS.clear()


def export_picks() -> list[dict]:
    """The picks measured (or restored) so far, JSON-able and without the device index: what a
    training checkpoint stores, so that a resumed run keeps each class on the backend it trained
    with (the same rounding) instead of re-timing, which can pick another on a noisy measurement.
    Picks forced by ``R2D2_ATTENTION_AUTO`` are left out: the environment decides them each run."""
    with _PICKS_LOCK:
        return [dict(device=k[0], dtype=_DTYPE_NAMES.get(k[2], str(k[2])), lq=k[3], lk=k[4], d=k[5],
                     masked=k[6], dropout=k[7], grad=k[8], backend=p.backend)
                for k, p in _PICKS.items() if p.source != "R2D2_ATTENTION_AUTO"]


def load_picks(picks: list[dict], device) -> int:
    """Take the picks of :func:`export_picks` (an earlier run of the same job) for ``device``,
    this process's device: every rank takes the saved ones, so after a resume all ranks agree.
    A class already picked here, a pick for another device type or dtype, and a backend that
    cannot run here are left alone (that class is measured as usual). With
    ``R2D2_ATTENTION_AUTO`` set nothing is taken. Returns how many picks were taken."""
    if os.environ.get("R2D2_ATTENTION_AUTO"):
        return 0
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtypes = {v: k for k, v in _DTYPE_NAMES.items()}
    taken = 0
    with _PICKS_LOCK:
        for p in picks:
            try:
                dtype, backend = dtypes[p["dtype"]], p["backend"]
                key = (device.type, device.index, dtype, int(p["lq"]), int(p["lk"]), int(p["d"]),
                       bool(p["masked"]), bool(p["dropout"]), bool(p["grad"]))
            except (KeyError, TypeError, ValueError):
                continue  # a record this version does not read: measure that class instead
            if (p.get("device") != device.type or key in _PICKS or backend not in SPEC.backends
                    or why_unavailable("attention", backend, device) is not None):
                continue
            _PICKS[key] = AutoPick(backend, {}, {}, {}, "", "checkpoint")
            log.info("attention auto: %s -> %s (from the checkpoint)", _class_str(key), backend)
            taken += 1
    return taken


SPEC = register_op(OpSpec(
    name="attention",
    backends=("eager", "sdpa", "xformers", "triton", "cuda"),
    ext_op=EXT_OP,
    auto_cuda=("sdpa", "eager"),
    auto_cpu=("sdpa", "eager"),
    auto_fn=_auto_pick,
))


def attention(q, k, v, *, key_padding_mask=None, dropout_p=0.0, scale=None, backend="auto"):
    """Multi-head attention with a key padding mask; see the module docstring.

    Args:
        q: ``[B, H, Lq, D]`` float16/bfloat16/float32 (any strides).
        k, v: ``[B, H, Lk, D]``, same dtype and device.
        key_padding_mask: ``[B, Lk]`` bool, True = attend; None = every key.
        dropout_p: probability of dropping an attention weight, in [0, 1).
        scale: multiplier of q.k; default ``1/sqrt(D)``.
        backend: ``auto | eager | sdpa | xformers | triton | cuda``.

    Returns:
        ``[B, H, Lq, D]`` in q's dtype. Keys masked out are never read (NaN there is harmless,
        their gradients are 0); an empty output (B, H, Lq or D = 0) is an empty tensor on every
        backend (see the module docstring).
    """
    _check(q, k, v, key_padding_mask)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (
            0.0 <= dropout_p < 1.0):
        raise ValueError(f"attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not (
            isinstance(scale, (int, float)) and math.isfinite(scale))):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    if backend == "auto" and q.device.type in _MEASURED_DEVICE_TYPES:
        b = _auto_for_call(q, k, v, key_padding_mask, dropout_p)
    else:
        b = resolve("attention", backend, q.device)
    if q.numel() == 0:
        # Nothing to compute (B, H, Lq or D is 0): the same empty result, with empty gradients,
        # whichever backend was asked for (after checking that it can run here).
        return attention_ref(q, k, v, key_padding_mask, dropout_p, scale)
    if b == "sdpa":
        return attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale)
    if b == "xformers":
        return attention_xformers(q, k, v, key_padding_mask, dropout_p, scale)
    if b in _FNS:
        return _fused(b, q, k, v, key_padding_mask, dropout_p, scale)
    return attention_ref(q, k, v, key_padding_mask, dropout_p, scale)


def _register_fakes() -> None:
    """Shape functions for the compiled ops so torch.compile (FakeTensor) can trace them."""
    if not _ext.has_op(EXT_OP):
        return

    @torch.library.register_fake("r2d2::attention_fwd")
    def _fwd_fake(q, k, v, mask, scale, dropout_p, seed, offset):
        B, H, Lq, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B * H, Lq), dtype=torch.float32)

    @torch.library.register_fake("r2d2::attention_bwd")
    def _bwd_fake(do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_register_fakes()
