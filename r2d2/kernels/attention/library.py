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

from r2d2.kernels.attention.reference import zero_masked_keys


def attention_sdpa(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None):
    """torch SDPA with the contract's mask semantics (fully masked queries -> zeros, masked keys
    never read)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    valid = key_padding_mask.any(-1)
    k, v = zero_masked_keys(k, v, key_padding_mask)
    # Rows with no key attend everywhere (to zeros), then are zeroed (where(), not a product:
    # their gradients are exactly 0 too).
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
        k, v = zero_masked_keys(k, v, key_padding_mask)
        keep = key_padding_mask | ~valid[:, None]  # fully masked rows: attend all, zeroed below
        # xformers needs the bias's last dim allocated at a multiple of 8: slice a padded buffer.
        lk_pad = (Lk + 7) // 8 * 8
        buf = torch.zeros((B, 1, Lq, lk_pad), device=q.device, dtype=q.dtype)
        buf[..., :Lk].masked_fill_(~keep[:, None, None, :], float("-inf"))
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
        out = torch.where(valid[:, None, None, None], out, out.new_zeros(()))
    return out
