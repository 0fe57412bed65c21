"""Attention backends provided by other libraries: torch SDPA (``sdpa``) and xformers'
``memory_efficient_attention`` (``xformers``), wrapped to the package's contract.

Both are told to attend everywhere on a fully masked query and the row is zeroed afterwards
(SDPA would return NaN there), and both get k and v with the masked keys zeroed first: SDPA and
xformers add -inf to masked scores (``NaN + -inf = NaN``) and multiply masked values by 0
(``0 * NaN = NaN``), so a NaN in a masked key would otherwise reach the whole row. The cost is one
copy of k and v per masked call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r2d2.kernels.attention.reference import allowed_mask, zero_masked_keys


def attention_sdpa(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, causal=False):
    """torch SDPA with the contract's mask semantics (fully masked queries -> zeros, masked keys
    never read, ``causal`` aligned bottom-right).

    SDPA's own ``is_causal`` is aligned top-left (query i sees keys j <= i), which is the
    contract's only when Lq == Lk, so it is used only then and without a padding mask (its
    fastest path: no mask tensor). Every other causal call gets the combined boolean mask."""
    Lq, Lk = q.shape[2], k.shape[2]
    if key_padding_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, scale=scale, is_causal=causal
        )
    k, v = zero_masked_keys(k, v, key_padding_mask)
    allowed = allowed_mask(key_padding_mask, causal, Lq, Lk, q.device)  # [B or 1, 1, Lq or 1, Lk]
    valid = allowed.any(-1, keepdim=True)
    # Rows with no key attend everywhere (to zeros), then are zeroed (where(), not a product:
    # their gradients are exactly 0 too).
    m = allowed | ~valid
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, scale=scale)
    return torch.where(valid, out, out.new_zeros(()))


def attention_xformers(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, causal=False):
    """xformers memory_efficient_attention ([B, L, H, D] layout) with an additive bias built from
    the same combined (padding AND bottom-right causal) mask as SDPA's, so the causal convention
    is the contract's by construction (no reliance on which corner an xformers mask class aligns
    to)."""
    import xformers.ops as xops

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    bias = None
    valid = None
    allowed = allowed_mask(key_padding_mask, causal, Lq, Lk, q.device)
    if allowed is not None:
        valid = allowed.any(-1, keepdim=True)
        k, v = zero_masked_keys(k, v, key_padding_mask)
        keep = allowed | ~valid  # fully masked rows: attend all, zeroed below
        # xformers needs the bias's last dim allocated at a multiple of 8: slice a padded buffer.
        lk_pad = (Lk + 7) // 8 * 8
        buf = torch.zeros((keep.shape[0], 1, Lq, lk_pad), device=q.device, dtype=q.dtype)
        buf[..., :Lk].masked_fill_(~keep.expand(-1, -1, Lq, -1), float("-inf"))
        bias = buf[..., :Lk].expand(B, H, Lq, Lk)  # broadcast over heads: stride 0, no copy
    out = xops.memory_efficient_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_bias=bias,
        p=dropout_p,
        scale=scale,
    ).transpose(1, 2)
    if valid is not None:
        out = torch.where(valid, out, out.new_zeros(()))
    return out
