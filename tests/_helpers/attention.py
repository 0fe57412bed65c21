"""Attention test helpers shared by the kernels' tests: random inputs and key masks, the check
of one backend's output and q/k/v gradients against the fp32 reference, and flash-attention's
low-precision error rule."""

from __future__ import annotations

import torch

from r2d2.kernels import attention, attention_ref
from r2d2.kernels.attention.reference import allowed_mask

FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def make_inputs(
    B, H, Lq, Lk, D, *, dtype=torch.float32, device="cpu", mask="random", layout="bhld"
):
    """Fresh random q/k/v (never zeros) and a key padding mask.

    mask: None | "random" (keys dropped at random, the last batch row fully padded when B > 1)
    | "lengths" (prefix-valid like padded captions, one row fully padded when B > 1).
    layout "blhd" returns [B, H, L, D] views of [B, L, H, D] storage (what a model's head split
    gives without a copy).
    """

    def make(L):
        if layout == "blhd":
            x = torch.randn(B, L, H, D, device=device).transpose(1, 2)
        else:
            x = torch.randn(B, H, L, D, device=device)
        return x.to(dtype).requires_grad_()

    q, k, v = make(Lq), make(Lk), make(Lk)
    m = None
    if mask == "random":
        m = torch.rand(B, Lk, device=device) > 0.35
        m[:, 0] = True  # every row but the last attends to something
        if B > 1:
            m[-1] = False
    elif mask == "lengths":
        lens = torch.randint(1, Lk + 1, (B,), device=device)
        m = torch.arange(Lk, device=device)[None, :] < lens[:, None]
        if B > 1:
            m[0] = False
    return q, k, v, m


def tile_mask(B, Lk, tile, device="cpu"):
    """A key mask exercising the padding skip at ``tile`` keys per tile: row 0 attends to its
    first tile + 5 keys (one partly padded tile, then only fully padded ones), row 1 has random
    holes and its whole second tile padded, row 2 is fully padded, others random."""
    m = torch.rand(B, Lk, device=device) > 0.3
    m[0] = torch.arange(Lk, device=device) < tile + 5
    m[1, 0], m[1, tile : 2 * tile] = True, False
    if B > 2:
        m[2] = False
    return m


def grads(out, do, *xs):
    return torch.autograd.grad(out, xs, do)


def check_against_ref(q, k, v, m, backend, scale=None, tol=FP32_TOL, causal=False):
    out = attention(q, k, v, key_padding_mask=m, causal=causal, scale=scale, backend=backend)
    ref = attention_ref(q, k, v, m, scale=scale, causal=causal)
    do = torch.randn_like(ref)
    got = grads(out, do, q, k, v)
    want = grads(ref, do, q, k, v)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, **tol)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda s, n=name: f"d{n}: {s}")
    return out, got


def plain_low_precision(q, k, v, m, dropout_p=0.0, keep=None, causal=False):
    """Plain PyTorch attention computed in q's (low) precision: the baseline error of the rule."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = allowed_mask(m, causal, q.shape[2], k.shape[2], q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)
    if allowed is not None:
        p = p * allowed.any(-1, keepdim=True).to(p.dtype)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return p @ v


def assert_fa_rule(out, got, q, k, v, m, do, dropout_p=0.0, keep=None, causal=False):
    """flash-attention's rule for ``out`` and its gradients ``got`` (computed from leaves q, k, v
    in a low precision, or from poisoned copies of them): each max error against the fp32 oracle
    is <= 2 x that of plain PyTorch in the same precision on q, k, v, + 1e-3."""
    # fp32 oracle on fp32 leaves, so its gradients are not rounded to dtype on the way back.
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref32 = attention_ref(q32, k32, v32, m, dropout_p=dropout_p, dropout_mask=keep, causal=causal)
    lowpt = plain_low_precision(q, k, v, m, dropout_p, keep, causal)  # plain PyTorch in dtype
    want = grads(ref32, do.float(), q32, k32, v32)
    base = grads(lowpt, do, q, k, v)
    assert torch.isfinite(out).all()
    assert (out.float() - ref32).abs().max() <= 2 * (lowpt.float() - ref32).abs().max() + 1e-3
    for name, g, w, b_ in zip("qkv", got, want, base):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        err = (g.float() - w).abs().max()
        bound = 2 * (b_.float() - w).abs().max() + 1e-3
        assert err <= bound, f"d{name}: {err} > {bound}"
