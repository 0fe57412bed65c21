"""Attention, the plain-PyTorch reference: the spec, the test oracle and the eager backend.

    out[b, h, i] = sum_j dropout(softmax_j(scale * q[b,h,i] . k[b,h,j] + mask[b,j])) v[b,h,j]

Computed in fp32 and rounded once to q's dtype. The mask rules every backend follows are the
package docstring's (masked keys never read, fully masked queries give zeros, ``causal`` aligned
bottom-right: query i sees key j iff ``j <= i + (Lk - Lq)``).
"""

from __future__ import annotations

import math

import torch


def default_scale(q) -> float:
    """``1/sqrt(D)``; 1.0 for D = 0, where the output is empty and the scale is never used."""
    D = q.shape[-1]
    return 1.0 / math.sqrt(D) if D > 0 else 1.0


def zero_masked_keys(k, v, key_padding_mask):
    """k and v with the rows of masked keys set to 0 (their gradients are then exactly 0), so that
    a NaN or inf there cannot reach a score, an output or a gradient."""
    if key_padding_mask is None:
        return k, v
    drop = ~key_padding_mask[:, None, :, None]
    return k.masked_fill(drop, 0), v.masked_fill(drop, 0)


def causal_mask(Lq: int, Lk: int, device=None) -> torch.Tensor:
    """Bool ``[Lq, Lk]``, True = query i may attend key j: ``j <= i + (Lk - Lq)``, the causal mask
    aligned to the bottom-right corner (flash-attention >= 2.1, torch's ``causal_lower_right``).
    Lq == Lk is the usual lower triangle; one query against Lk cached keys sees them all; with
    Lq > Lk the first ``Lq - Lk`` queries see no key."""
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return j <= i + (Lk - Lq)


def allowed_mask(key_padding_mask, causal: bool, Lq: int, Lk: int, device=None):
    """Bool mask broadcastable to ``[B, H, Lq, Lk]`` (True = attend): the key padding mask AND
    the causal mask, or None when neither is given."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask[:, None, None, :]
    if causal:
        c = causal_mask(Lq, Lk, device)[None, None]
        allowed = c if allowed is None else allowed & c
    return allowed


def attention_ref(
    q,
    k,
    v,
    key_padding_mask=None,
    dropout_p=0.0,
    scale=None,
    generator=None,
    dropout_mask=None,
    causal=False,
):
    """Plain-PyTorch attention in fp32; the spec and the test oracle.

    ``dropout_mask`` (bool ``[B, H, Lq, Lk]``, True = keep) replaces the random draw, so a
    kernel's own dropout mask can be checked exactly. ``causal``: bottom-right aligned (see
    ``causal_mask``), combined with the padding mask; a query with no key left gives zeros with
    zero gradients.
    """
    scale = default_scale(q) if scale is None else scale
    k, v = zero_masked_keys(k, v, key_padding_mask)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    allowed = allowed_mask(key_padding_mask, causal, q.shape[2], k.shape[2], q.device)
    if allowed is not None:
        # finfo.min (not -inf) keeps fully masked rows finite; they are zeroed below.
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    if allowed is not None:
        p = p * allowed.any(-1, keepdim=True).to(p.dtype)
    if dropout_p > 0.0:
        keep = dropout_mask
        if keep is None:
            keep = torch.rand(p.shape, device=p.device, generator=generator) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    return torch.matmul(p, v.float()).to(q.dtype)
