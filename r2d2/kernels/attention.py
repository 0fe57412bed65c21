"""Attention for R2D2's shapes: padded text self-attention, image self-attention, cross-attention.

    out[b, h, i] = sum_j dropout(softmax_j(scale * q[b,h,i] . k[b,h,j] + mask[b,j])) v[b,h,j]

q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` (Lq != Lk allowed), ``key_padding_mask`` ``[B, Lk]``
bool with True = attend. A query whose keys are all masked returns zeros with zero gradients
(eager softmax would return NaN; padded rows of a batch must not poison the batch).

Backends (see dispatch.py):
  eager     ``attention_ref``: fp32 math, the spec and the test oracle.
  sdpa      torch SDPA with a boolean mask (fully masked rows attend everywhere, then are zeroed).
  xformers  ``memory_efficient_attention`` with an additive bias whose rows are 8-aligned.
  triton    attention_triton.py: flash-style forward with per-tile padding skip, LSE-recompute
            backward, Philox dropout.
  cuda      csrc/attention: torch.ops.r2d2.attention_fwd / attention_bwd (CUDA builds only).
  auto      CPU: sdpa (never the Triton interpreter). CUDA: the fastest of the runnable backends
            measured once per device by a small fwd+bwd micro-benchmark at an R2D2 shape (see
            ``_auto_pick``), or the backend named by ``R2D2_ATTENTION_AUTO``.

Dropout RNG differs by backend (eager and sdpa use torch's generator, triton its own Philox
stream seeded from torch's CPU generator); each backend's backward reuses its forward's mask.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time

import torch
import torch.nn.functional as F

from r2d2 import _ext
from r2d2.kernels.dispatch import OpSpec, register_op, resolve, why_unavailable

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


def attention_ref(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, generator=None,
                  dropout_mask=None):
    """Plain-PyTorch attention in fp32; the spec and the test oracle.

    ``dropout_mask`` (bool ``[B, H, Lq, Lk]``, True = keep) replaces the random draw, so a
    kernel's own dropout mask can be checked exactly.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
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
    """torch SDPA with the contract's mask semantics (fully masked queries -> zeros)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    valid = key_padding_mask.any(-1)
    # SDPA returns NaN for a row with no key; let such rows attend everywhere, then zero them
    # (the product by 0 also zeroes their gradients).
    m = (key_padding_mask | ~valid[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, scale=scale)
    return out * valid.to(out.dtype)[:, None, None, None]


def attention_xformers(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None):
    """xformers memory_efficient_attention ([B, L, H, D] layout) with an additive key bias."""
    import xformers.ops as xops

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    bias = None
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask.any(-1)
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
        out = out * valid.to(out.dtype)[:, None, None, None]
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
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        scale, dropout_p, seed, offset, bwd = ctx.args
        dq, dk, dv = bwd(do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset)
        return dq, dk, dv, None, None, None, None, None, None


def _fused(backend, q, k, v, key_padding_mask, dropout_p, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
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
# auto: measured, not guessed.

_AUTO_CANDIDATES = ("cuda", "triton", "xformers", "sdpa")
_AUTO_SHAPE = dict(B=32, H=12, Lq=64, Lk=64, D=64)  # R2D2 text self-attention, 40% padding


def _time_backend(backend: str, device: torch.device, iters: int = 10) -> float:
    """Median ms of fwd+bwd at ``_AUTO_SHAPE`` in bf16 (the training dtype)."""
    s = _AUTO_SHAPE
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (s["B"], s["H"], s["Lq"], s["D"])
    q, k, v = (torch.randn(shape, generator=g).to(device, torch.bfloat16).requires_grad_()
               for _ in range(3))
    lens = torch.randint(s["Lk"] // 3, s["Lk"] + 1, (s["B"],), generator=g)
    mask = (torch.arange(s["Lk"])[None, :] < lens[:, None]).to(device)
    do = torch.randn(shape, generator=g).to(device, torch.bfloat16)
    times = []
    for i in range(iters + 3):  # 3 warm-up runs (Triton compiles/autotunes here)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        attention(q, k, v, key_padding_mask=mask, backend=backend).backward(do)
        torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _device_label(device: torch.device) -> str:
    try:
        return f"{device} ({torch.cuda.get_device_name(device)})"
    except (RuntimeError, AssertionError, AttributeError):
        return str(device)


@functools.lru_cache(maxsize=None)
def _auto_pick_cached(device_key: str) -> str | None:
    device = torch.device(device_key)
    env = os.environ.get("R2D2_ATTENTION_AUTO")
    if env:
        if env not in SPEC.backends:
            raise ValueError(f"R2D2_ATTENTION_AUTO={env!r} is not an attention backend; expected "
                             f"one of {SPEC.backends}")
        return env
    timings = {}
    for b in _AUTO_CANDIDATES:
        if why_unavailable("attention", b, device) is not None:
            continue
        try:
            timings[b] = _time_backend(b, device)
        except Exception as e:  # a backend that fails here is not picked; say why
            log.warning("r2d2.kernels: attention auto skipped backend=%r on %s: %s", b, device, e)
    if not timings:
        return None
    pick = min(timings, key=timings.get)
    log.info("r2d2.kernels: attention auto on %s measured fwd+bwd ms %s at %s bf16 -> %r",
             _device_label(device), {b: round(t, 3) for b, t in timings.items()}, _AUTO_SHAPE,
             pick)
    return pick


def _auto_pick(device: torch.device) -> str | None:
    """CPU: sdpa. CUDA: the backend with the lowest measured fwd+bwd time, once per device.

    The measurement runs on the first auto call for a device (a few ms; do not let that first call
    happen inside CUDA-graph capture or torch.compile tracing: pass an explicit backend there, or
    set ``R2D2_ATTENTION_AUTO``).
    """
    if device.type != "cuda":
        return "sdpa"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _auto_pick_cached(f"cuda:{index}")


def auto_timings_clear() -> None:
    """Forget the per-device measurements (tests, or after changing R2D2_ATTENTION_AUTO)."""
    _auto_pick_cached.cache_clear()


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
        ``[B, H, Lq, D]`` in q's dtype.
    """
    _check(q, k, v, key_padding_mask)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (
            0.0 <= dropout_p < 1.0):
        raise ValueError(f"attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    b = resolve("attention", backend, q.device)
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
