"""Attention for R2D2's shapes: padded text self-attention, image self-attention, cross-attention.

    out[b, h, i] = sum_j softmax_j(scale * q[b,h,i] . k[b,h,j] + mask[b,j]) v[b,h,j]

q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` (Lq != Lk allowed), ``key_padding_mask`` ``[B, Lk]``
bool with True = attend. A query whose keys are all masked returns zeros with zero gradients
(eager softmax would return NaN; padded rows of a batch must not poison the batch).

Backends: eager (fp32 reference, the spec), sdpa (torch SDPA); Triton/CUDA kernels live in
``attention_triton.py`` / ``csrc/attention`` and are dispatched here when present.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from r2d2.kernels.dispatch import OpSpec, register_op, resolve


def _check(q, k, v, key_padding_mask):
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
        raise ValueError(f"attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"attention: key_padding_mask must be bool (True = attend), got "
                            f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be [B={B}, Lk={k.shape[2]}], got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")


def attention_ref(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, generator=None):
    """Plain-PyTorch attention in fp32; the spec and the test oracle."""
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
        keep = torch.rand(p.shape, device=p.device, generator=generator) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    return torch.matmul(p, v.float()).to(q.dtype)


def attention_sdpa(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None):
    """torch SDPA with the contract's mask semantics (fully masked queries -> zeros)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    valid = key_padding_mask.any(-1)
    # SDPA returns NaN for a row with no key; let such rows attend everywhere, then zero them.
    m = (key_padding_mask | ~valid[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, scale=scale)
    return out * valid.to(out.dtype)[:, None, None, None]


SPEC = register_op(OpSpec(
    name="attention",
    backends=("eager", "sdpa"),
    auto_cuda=("sdpa", "eager"),
    auto_cpu=("sdpa", "eager"),
))


def attention(q, k, v, *, key_padding_mask=None, dropout_p=0.0, scale=None, backend="auto"):
    """Multi-head attention with a key padding mask; see the module docstring."""
    _check(q, k, v, key_padding_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    b = resolve("attention", backend, q.device)
    if b == "sdpa":
        return attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale)
    return attention_ref(q, k, v, key_padding_mask, dropout_p, scale)
