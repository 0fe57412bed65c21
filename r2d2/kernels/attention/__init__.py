"""Attention for R2D2's shapes: padded text self-attention, image self-attention, cross-attention.

    out[b, h, i] = sum_j dropout(softmax_j(scale * q[b,h,i] . k[b,h,j] + mask[b,j])) v[b,h,j]

q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` (Lq != Lk allowed), ``key_padding_mask`` ``[B, Lk]``
bool with True = attend; float16/bfloat16/float32 (the fused backends), output in q's dtype. A
query whose keys are all masked returns zeros with zero gradients (eager softmax would return NaN;
padded rows of a batch must not poison the batch).

``causal=True`` adds a causal mask aligned to the bottom-right corner (flash-attention >= 2.1,
torch's ``causal_lower_right``): query i (0-based, of Lq) may attend key j iff
``j <= i + (Lk - Lq)``. Lq == Lk is the usual lower triangle; one new query against Lk cached keys
(KV-cache decoding) attends every cached key, Lq = 3 queries the last 3 positions of Lk keys; with
Lq > Lk the first ``Lq - Lk`` queries see no key. It is ANDed with ``key_padding_mask``; a query
left with no key (those first rows, or all its visible keys padded) gives zeros with zero
gradients like any fully masked query. Causality is a score mask, not a "never read" promise:
every key is visible to the last query, so non-finite values anywhere in k/v (outside padding)
reach the output. The fused kernels (triton, cuda) skip K/V tiles wholly above the diagonal of a
query tile (no load, no math; the backward likewise) and mask elementwise on diagonal tiles only,
so causal self-attention costs about half the non-causal FLOPs.

Masked keys are never read, on every backend: whatever k and v hold where ``key_padding_mask`` is
False (NaN, inf, garbage) changes neither the output nor any gradient, and their own gradients are
exactly zero. The fused kernels load them as zeros; eager, sdpa and xformers zero them first.

Empty inputs: any of B, H, Lq, D equal to 0 gives an empty ``[B, H, Lq, D]`` output (as torch
SDPA; the default scale ``1/sqrt(D)`` is not evaluated for D = 0) and empty gradients on every
backend; Lk = 0 (no key at all) gives zeros, like a fully masked query.

Backends (see dispatch.py), one module each:
  eager     reference.py ``attention_ref``: fp32 math, the spec and the test oracle.
  sdpa      library.py: torch SDPA with a boolean mask (``is_causal`` when causal, Lq == Lk and
            unpadded; SDPA's own is_causal is top-left aligned, so not otherwise).
  xformers  library.py: ``memory_efficient_attention`` with an additive bias.
  triton    attention/triton.py: flash-style forward with per-tile padding and causal skips,
            LSE-recompute backward, Philox dropout.
  cuda      cuda.py over csrc/attention (CUDA builds only), the same skips.
  auto      CPU (and any non-CUDA device): sdpa, never the Triton interpreter. CUDA: per shape
            class, the fastest of the runnable candidates (cuda, triton, xformers, sdpa),
            measured on the first call of the class (autotune.py; the class and the timed inputs
            are tuning.py's). ``R2D2_ATTENTION_AUTO=<backend>`` pins one for every class.

Dropout RNG differs by backend (eager and sdpa use torch's generator; triton and cuda share one
Philox stream seeded from torch's CPU generator); each backend's backward reuses its forward's
mask.
"""

from __future__ import annotations

import math

import torch

from r2d2.kernels import autotune
from r2d2.kernels.attention import cuda as cuda_impl
from r2d2.kernels.attention.library import attention_sdpa, attention_xformers
from r2d2.kernels.attention.reference import attention_ref, default_scale
from r2d2.kernels.attention.tuning import AttentionTuning, class_key, class_str
from r2d2.kernels.dispatch import OpSpec, register_op, resolve

__all__ = [
    "attention",
    "attention_ref",
    "attention_sdpa",
    "attention_xformers",
    "auto_class",
    "auto_picks",
    "auto_timings_clear",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, key_padding_mask, causal=False):
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(x).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be [B, H, L, D]; got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(
            f"attention: k and v must be [B={B}, H={H}, Lk, D={D}] and equal; got "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if not (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype):
        raise TypeError(
            f"attention: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(
                f"attention: key_padding_mask must be a bool tensor or None, got "
                f"{type(key_padding_mask).__name__}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"attention: key_padding_mask must be bool (True = attend), got "
                f"{key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(
                f"attention: key_padding_mask must be [B={B}, Lk={k.shape[2]}], got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}"
            )


# ----------------------------------------------------------------------------------------------
# Fused kernels (triton, cuda): one autograd.Function, two pairs of (fwd, bwd) launchers.


def _triton_fns():
    # Imports triton: only when this backend runs, so the package works without triton.
    from r2d2.kernels.attention import triton as triton_impl

    return triton_impl.fwd, triton_impl.bwd


def _cuda_fns():
    return cuda_impl.fwd, cuda_impl.bwd


_FNS = {"triton": _triton_fns, "cuda": _cuda_fns}


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, dropout_p, seed, offset, causal, fns):
        fwd, bwd = fns
        o, lse = fwd(q, k, v, mask, scale, dropout_p, seed, offset, causal)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.args = (scale, dropout_p, seed, offset, causal, bwd)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not differentiable
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        scale, dropout_p, seed, offset, causal, bwd = ctx.args
        dq, dk, dv = bwd(do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset, causal)
        return dq, dk, dv, None, None, None, None, None, None, None


def _fused(backend, q, k, v, key_padding_mask, dropout_p, scale, causal=False):
    scale = default_scale(q) if scale is None else float(scale)
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"attention (backend={backend!r}): dtype {q.dtype} unsupported; expected "
            f"one of {[str(d) for d in _DTYPES]}"
        )
    seed = offset = 0
    if dropout_p > 0.0:
        # Drawn from torch's CPU generator, so torch.manual_seed makes the mask reproducible.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    fns = _FNS[backend]()
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Nothing saved for a backward.
        return fns[0](q, k, v, mask, scale, float(dropout_p), seed, offset, causal)[0]
    return _FusedAttention.apply(
        q, k, v, mask, scale, float(dropout_p), seed, offset, bool(causal), fns
    )


def attention(
    q, k, v, *, key_padding_mask=None, causal=False, dropout_p=0.0, scale=None, backend="auto"
):
    """Multi-head attention with a key padding mask and an optional causal mask; see the module
    docstring.

    Args:
        q: ``[B, H, Lq, D]`` float16/bfloat16/float32 (any strides).
        k, v: ``[B, H, Lk, D]``, same dtype and device.
        key_padding_mask: ``[B, Lk]`` bool, True = attend; None = every key.
        causal: query i attends key j only if ``j <= i + (Lk - Lq)`` (bottom-right aligned:
            the lower triangle when Lq == Lk, every cached key for one decoding query).
        dropout_p: probability of dropping an attention weight, in [0, 1).
        scale: multiplier of q.k; default ``1/sqrt(D)``.
        backend: ``auto | eager | sdpa | xformers | triton | cuda``.

    Returns:
        ``[B, H, Lq, D]`` in q's dtype. Keys masked out are never read (NaN there is harmless,
        their gradients are 0); an empty output (B, H, Lq or D = 0) is an empty tensor on every
        backend (see the module docstring).
    """
    _check(q, k, v, key_padding_mask, causal)
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, (int, float))
        or not (0.0 <= dropout_p < 1.0)
    ):
        raise ValueError(f"attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and (
        isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale))
    ):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    b = resolve("attention", backend, q.device, call=(q, k, v, key_padding_mask, dropout_p, causal))
    if q.numel() == 0:
        # Nothing to compute (B, H, Lq or D is 0): the same empty result, with empty gradients,
        # whichever backend was asked for (after checking that it can run here).
        return attention_ref(q, k, v, key_padding_mask, dropout_p, scale, causal=causal)
    if b == "sdpa":
        return attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale, causal)
    if b == "xformers":
        return attention_xformers(q, k, v, key_padding_mask, dropout_p, scale, causal)
    if b in _FNS:
        return _fused(b, q, k, v, key_padding_mask, dropout_p, scale, causal)
    return attention_ref(q, k, v, key_padding_mask, dropout_p, scale, causal=causal)


TUNING = AttentionTuning(attention)

SPEC = register_op(
    OpSpec(
        name="attention",
        backends=("eager", "sdpa", "xformers", "triton", "cuda"),
        ext_op=cuda_impl.EXT_OP,
        auto_cuda=("sdpa", "eager"),
        auto_cpu=("sdpa", "eager"),
        tuning=TUNING,
    )
)


def auto_class(
    q,
    k,
    key_padding_mask=None,
    dropout_p: float = 0.0,
    grad: bool | None = None,
    causal: bool = False,
) -> str:
    """The class description ``auto`` files a call with these arguments under (the key of
    ``auto_picks()``); ``grad=None`` takes it from the current grad mode and q/k's requires_grad
    (v is taken to be like k). Causal calls are classes of their own (" causal" in the
    description)."""
    if grad is None:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return class_str(
        class_key(
            q.device,
            q.dtype,
            q.shape[2],
            k.shape[2],
            q.shape[3],
            key_padding_mask is not None,
            dropout_p > 0.0,
            grad,
            causal,
        )
    )


def auto_picks() -> dict[str, autotune.AutoPick]:
    """Every class ``auto`` has picked for so far (class description -> AutoPick)."""
    return autotune.picks("attention")


def auto_timings_clear() -> None:
    """Forget every pick (tests, or after changing R2D2_ATTENTION_AUTO)."""
    autotune.clear("attention")
