"""Attention: every backend against the fp32 reference, outputs and all three gradients.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest) in fp32; sizes are small
because the interpreter is slow. bf16/fp16 cases and the CUDA kernels run only on a GPU machine,
with flash-attention's rule: kernel error <= 2 x (error of plain PyTorch in the same precision vs
the fp32 reference) + atol. The padding skip is asserted through the kernels' tile counters and
NaN/Inf planted in every padded key; dropout against the shared Philox mask replay and
statistically. ``auto`` is tested in test_attention_auto.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from _helpers.attention import (
    FP32_TOL,
    assert_fa_rule,
    check_against_ref,
    grads,
    make_inputs,
    tile_mask,
)
from r2d2.kernels import BackendUnavailable, attention, attention_ref
from r2d2.kernels.dispatch import triton_importable

HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton not installed")


def _poison(x, m):
    """A detached copy of k or v ``[B, H, Lk, D]`` whose padded keys (``~m``) hold NaN, +Inf and
    -Inf in turn: a kernel that reads a padding slot into its math returns non-finite values."""
    x = x.detach().clone()
    b, j = (~m).nonzero(as_tuple=True)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], device=x.device)
    x[b, :, j] = bad[torch.arange(len(b), device=x.device) % 3].to(x.dtype)[:, None, None]
    return x


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU, fp32)

TRITON_CASES = [  # (B, H, Lq, Lk, D, mask)
    (2, 2, 1, 7, 32, "random"),
    (2, 1, 7, 63, 64, "random"),
    (2, 2, 63, 7, 80, "lengths"),
    (3, 1, 17, 33, 32, None),
    (2, 1, 64, 64, 64, "lengths"),
]


@needs_triton
@pytest.mark.parametrize("B,H,Lq,Lk,D,mask", TRITON_CASES)
def test_triton_fp32_matches_ref(B, H, Lq, Lk, D, mask):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask=mask)
    check_against_ref(q, k, v, m, "triton")


@needs_triton
@pytest.mark.parametrize("Lq,Lk", [(197, 23), (23, 197)])
def test_triton_fp32_long_side(Lq, Lk):
    # A ViT-length side (197 = 196 patches + CLS), kept to one batch row, one head, D = 32.
    q, k, v, m = make_inputs(2, 1, Lq, Lk, 32, mask="random")
    check_against_ref(q, k, v, m, "triton")


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("Lq,Lk,D", [(257, 257, 64), (64, 257, 80), (577, 64, 128)])
def test_triton_fp32_r2d2_lengths_slow(Lq, Lk, D):
    q, k, v, m = make_inputs(2, 1, Lq, Lk, D, mask="lengths")
    check_against_ref(q, k, v, m, "triton")


@needs_triton
def test_triton_strided_inputs_and_scale():
    q, k, v, m = make_inputs(2, 3, 9, 21, 32, mask="random", layout="blhd")
    assert not q.is_contiguous()
    check_against_ref(q, k, v, m, "triton", scale=0.37)


def _check_fully_masked_rows(backend, Lq, Lk, D, **kw):
    q, k, v, m = make_inputs(3, 2, Lq, Lk, D, mask="random", **kw)
    m[1] = False
    out = attention(q, k, v, key_padding_mask=m, backend=backend)
    dq, dk, dv = grads(out, torch.randn_like(out), q, k, v)
    for b in (1, 2):  # row 2 (the last) is fully padded by make_inputs too
        assert torch.equal(out[b], torch.zeros_like(out[b]))
        assert torch.equal(dq[b], torch.zeros_like(dq[b]))
        assert torch.equal(dk[b], torch.zeros_like(dk[b]))
        assert torch.equal(dv[b], torch.zeros_like(dv[b]))
    # Masked keys of a live row get exactly zero dk/dv; live rows have real gradients.
    dead = ~m[0]
    assert dead.any() and torch.equal(dk[0][:, dead], torch.zeros_like(dk[0][:, dead]))
    assert torch.equal(dv[0][:, dead], torch.zeros_like(dv[0][:, dead]))
    assert dq[0].abs().sum() > 0 and dv[0][:, m[0]].abs().sum() > 0
    assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))


@needs_triton
def test_triton_fully_masked_rows_are_zero_with_zero_grads():
    _check_fully_masked_rows("triton", 7, 19, 32)


@needs_triton
def test_triton_writes_every_output_element():
    from r2d2.kernels.attention import triton as at

    q, k, v, m = make_inputs(2, 2, 19, 37, 80, mask="random")
    q, k, v = q.detach(), k.detach(), v.detach()
    scale = 80**-0.5
    poison = lambda x: torch.full(x.shape, float("nan"))  # noqa: E731
    o, lse = at.fwd(q, k, v, m, scale, out=poison(q))
    torch.testing.assert_close(o, attention_ref(q, k, v, m), **FP32_TOL)
    do = torch.randn_like(o)
    dq, dk, dv = at.bwd(do, q, k, v, o, lse, m, scale, dq=poison(q), dk=poison(k), dv=poison(v))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


@needs_triton
def test_triton_skips_padding_tiles_and_ignores_padding_slots():
    """Deleting the padding skip, or reading a padded key's K/V into the math, fails here."""
    from r2d2.kernels.attention import triton as at

    (cfg,) = at._configs("fwd")  # the interpreter's single config
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    B, H, Lq, Lk, D = 3, 2, 21, 3 * bn + 5, 32
    q, k, v, _ = make_inputs(B, H, Lq, Lk, D, mask=None)
    m = tile_mask(B, Lk, bn)
    kp, vp = (_poison(x, m).requires_grad_() for x in (k, v))
    # NaN/Inf in every padded key (whole padded tiles and the padded keys of partial tiles):
    # outputs and all gradients as if those slots held clean values.
    ref = attention_ref(q, k, v, m)
    out = attention(q, kp, vp, key_padding_mask=m, backend="triton")
    do = torch.randn_like(ref)
    got = grads(out, do, q, kp, vp)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for name, g, w in zip("qkv", got, grads(ref, do, q, k, v)):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda s_, n=name: f"d{n}: {s_}")
    # Tiles processed, per (batch, head): only those with an attended key.
    live = torch.stack([m[:, j : j + bn].any(-1) for j in range(0, Lk, bn)], -1).sum(-1)
    live = live.to(torch.int32).repeat_interleave(H)
    n_m = -(-Lq // bm)
    assert live.tolist()[::H] == [2, 3, 0]  # the mask really has padded tiles to skip
    count = lambda: torch.zeros(B * H, dtype=torch.int32)  # noqa: E731
    c_fwd, c_kv, c_q = count(), count(), count()
    qd, scale = q.detach(), D**-0.5
    o, lse = at.fwd(qd, kp.detach(), vp.detach(), m, scale, tile_count=c_fwd)
    at.bwd(do, qd, kp.detach(), vp.detach(), o, lse, m, scale, tile_count=(c_kv, c_q))
    assert torch.equal(c_fwd, live * n_m)
    assert torch.equal(c_kv, live * n_m)  # every query tile for each live key tile
    assert torch.equal(c_q, live * n_m)
    c_all = count()  # no mask: every tile is processed
    at.fwd(qd, k.detach(), v.detach(), None, scale, tile_count=c_all)
    assert torch.equal(c_all, torch.full_like(c_all, n_m * -(-Lk // bn)))


@needs_triton
def test_triton_dropout_keep_fraction_and_exact_backward():
    from r2d2.kernels.attention import triton as at

    B, H, Lq, Lk, D, p = 2, 2, 23, 45, 32, 0.3
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask="random")
    torch.manual_seed(123)
    out = attention(q, k, v, key_padding_mask=m, dropout_p=p, backend="triton")
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the draw _fused makes
    keep = at.dropout_keep_mask(B, H, Lq, Lk, p, seed, 0, q.device)
    # Statistical: the dropped fraction over B*H*Lq*Lk = 4140 draws is within 5 sigma of p.
    frac = 1.0 - keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(frac - p) < 5 * sigma, (frac, p)
    # Exact: the kernel's output and gradients equal the reference under the same keep mask.
    ref = attention_ref(q, k, v, m, dropout_p=p, dropout_mask=keep)
    do = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for g, w in zip(grads(out, do, q, k, v), grads(ref, do, q, k, v)):
        torch.testing.assert_close(g, w, **FP32_TOL)
    # A different seed draws a different mask.
    assert not torch.equal(keep, at.dropout_keep_mask(B, H, Lq, Lk, p, seed + 1, 0, q.device))


@needs_triton
def test_triton_dropout_weight_mass_matches_p():
    # With v = identity-like one-hot values, out row sums are the kept, rescaled probability mass:
    # its mean over many rows is 1 (unbiased), and the dropped mass fraction is about p.
    # q is scaled down so each row's softmax is near uniform: the kept mass then varies little
    # per row and the mean over 128 rows is within 0.05 of 1 - p with > 5 sigma margin.
    B, H, Lq, Lk, p = 2, 2, 32, 16, 0.25
    q = 0.1 * torch.randn(B, H, Lq, 16)
    k = torch.randn(B, H, Lk, 16)
    v = torch.eye(Lk, 16).expand(B, H, Lk, 16).contiguous()
    out = attention(q, k, v, dropout_p=p, backend="triton")
    mass = out.sum(-1) * (1 - p)  # kept probability mass per row
    assert abs((1 - mass.mean().item()) - p) < 0.05


# ---------------------------------------------------------------------------------------------
# sdpa, eager, xformers, errors (auto: test_attention_auto.py)


@pytest.mark.parametrize(
    "B,H,Lq,Lk,D,mask",
    [(3, 2, 7, 63, 32, "random"), (2, 2, 1, 7, 80, "lengths"), (2, 1, 197, 64, 64, None)],
)
def test_sdpa_matches_ref(B, H, Lq, Lk, D, mask):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask=mask)
    out, (_dq, dk, _dv) = check_against_ref(
        q, k, v, m, "sdpa", scale=0.2, tol=dict(atol=1e-5, rtol=1e-5)
    )
    if m is not None:
        dead = ~m.any(-1)
        assert dead.any() or B == 1
        assert torch.equal(out[dead], torch.zeros_like(out[dead]))
        assert torch.equal(dk[dead], torch.zeros_like(dk[dead]))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dropout_torch_backends_unbiased_and_zero_rows(backend):
    # v = 1 makes each output element the kept probability mass / (1 - p): mean 1 (unbiased).
    # q is scaled down so softmax rows are near uniform: per-row std ~0.26, the mean over 128
    # rows has std ~0.023, so 0.12 is a > 5 sigma bound.
    _, k, _, m = make_inputs(2, 2, 64, 24, 8, mask="random")
    q = 0.1 * torch.randn(2, 2, 64, 8)
    v = torch.ones(2, 2, 24, 8)
    out = attention(q, k, v, key_padding_mask=m, dropout_p=0.5, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # fully masked row stays zero
    assert abs(out[0].mean().item() - 1.0) < 0.12
    assert (out[0] - 1.0).abs().max() > 0.05  # something was dropped


def test_xformers_unavailable_is_clear():
    q, k, v, m = make_inputs(1, 1, 3, 5, 8)
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed: its unavailable path cannot be reached")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailable, match="xformers"):
        attention(q, k, v, key_padding_mask=m, backend="xformers")


def test_cuda_backend_on_cpu_is_clear():
    q, k, v, m = make_inputs(1, 1, 3, 5, 8)
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        attention(q, k, v, key_padding_mask=m, backend="cuda")


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), ValueError, r"\[B, H, L, D\]"),
        (lambda q, k, v, m: (q, k[:, :1], v[:, :1], None), ValueError, "k and v must be"),
        (lambda q, k, v, m: (q, k, v[..., :4], m), ValueError, "k and v must be"),
        (lambda q, k, v, m: (q, k.double(), v, m), TypeError, "one floating dtype"),
        (lambda q, k, v, m: (q, k, v, m.int()), TypeError, "key_padding_mask must be bool"),
        (
            lambda q, k, v, m: (q, k, v, m[:, :3]),
            ValueError,
            r"key_padding_mask must be \[B=2, Lk=5\]",
        ),
        (lambda q, k, v, m: (q, k, v, m.to("meta")), ValueError, "key_padding_mask on meta"),
        (lambda q, k, v, m: (q, k.to("meta"), v.to("meta"), m), ValueError, "different devices"),
    ],
)
def test_bad_input_errors(make, exc, match):
    args = make(*make_inputs(2, 2, 3, 5, 8))
    with pytest.raises(exc, match=match):
        attention(*args[:3], key_padding_mask=args[3], backend="eager")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(dropout_p=-0.1), "dropout_p"),
        (dict(scale=float("nan")), "scale"),
        (dict(backend="nope"), "unknown backend"),
    ],
)
def test_bad_argument_errors(kw, match):
    q, k, v, m = make_inputs(1, 1, 3, 5, 8)
    with pytest.raises((ValueError, BackendUnavailable), match=match):
        attention(q, k, v, key_padding_mask=m, **kw)


@needs_triton
def test_triton_rejects_float64():
    q, k, v, m = make_inputs(1, 1, 3, 5, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        attention(q, k, v, key_padding_mask=m, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU: low precision with flash-attention's error rule, dropout, padding, the CUDA kernels

GPU_CASES = [
    (4, 3, 64, 64, 64, "lengths"),
    (2, 4, 197, 197, 64, None),
    (2, 2, 257, 257, 80, "random"),
    (3, 2, 64, 257, 64, "random"),
    (3, 2, 257, 64, 128, "lengths"),
    (2, 2, 1, 7, 32, "random"),
    (2, 2, 577, 577, 64, "lengths"),
]


def _fa_rule(backend, B, H, Lq, Lk, D, mask, dtype):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, dtype=dtype, device="cuda", mask=mask)
    out = attention(q, k, v, key_padding_mask=m, backend=backend)
    do = torch.randn_like(out)
    assert_fa_rule(out, grads(out, do, q, k, v), q, k, v, m, do)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Lq,Lk,D,mask", GPU_CASES)
def test_gpu_low_precision_flash_rule(backend, dtype, B, H, Lq, Lk, D, mask):
    _fa_rule(backend, B, H, Lq, Lk, D, mask, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "sdpa"])
def test_gpu_fp32_matches_ref(backend):
    q, k, v, m = make_inputs(3, 2, 65, 129, 64, device="cuda", mask="random")
    check_against_ref(q, k, v, m, backend, tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_dropout_exact_against_shared_philox_mask(backend, dtype):
    # Both fused backends draw the keep mask from one Philox stream (checked on the host below),
    # so the Triton mask generator gives the exact mask the CUDA kernels used, too. fp16/bf16 run
    # the CUDA kernels' WMMA path (fp32 runs their FMA fallback); D = 64, Lk = 70 spans a full
    # and a partial 64-key tile.
    from r2d2.kernels.attention import triton as at

    B, H, Lq, Lk, D, p = 2, 2, 33, 70, 64, 0.2
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, dtype=dtype, device="cuda", mask="random")
    torch.manual_seed(7)
    out = attention(q, k, v, key_padding_mask=m, dropout_p=p, backend=backend)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    keep = at.dropout_keep_mask(B, H, Lq, Lk, p, seed, 0, "cuda")
    do = torch.randn_like(out)
    got = grads(out, do, q, k, v)
    if dtype != torch.float32:
        assert_fa_rule(out, got, q, k, v, m, do, dropout_p=p, keep=keep)
        return
    ref = attention_ref(q, k, v, m, dropout_p=p, dropout_mask=keep)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for g, w in zip(got, grads(ref, do, q, k, v)):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_dropout_rate_and_unbiased(backend, dtype):
    # v = one-hot keys: out[..., j] = p_ij * keep_ij / (1 - p), zero exactly where the kernel
    # dropped (i, j) (q is scaled down so every p_ij ~ 1/64 is far from underflow). 131072 draws:
    # the dropped fraction has sigma 0.0012, so 0.006 is 5 sigma; each row's kept mass has std
    # ~0.054, the mean over 2048 rows ~0.0012, so 0.01 is > 5 sigma too.
    B, H, Lq, Lk, p = 4, 4, 128, 64, 0.25
    q = (0.1 * torch.randn(B, H, Lq, 64, device="cuda")).to(dtype)
    k = torch.randn(B, H, Lk, 64, device="cuda").to(dtype)
    v = torch.eye(Lk, 64, device="cuda").expand(B, H, Lk, 64).contiguous().to(dtype)
    out = attention(q, k, v, dropout_p=p, backend=backend).float()
    dropped = (out[..., :Lk] == 0).float().mean().item()
    assert abs(dropped - p) < 0.006, dropped
    assert abs(out.sum(-1).mean().item() - 1.0) < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_padding_slots_cannot_leak(backend, dtype):
    # 64-key tiles (CUDA's; Triton's 32/64/128 autotuned ones) fully and partly padded, NaN/Inf in
    # every padded key of K and V: outputs and gradients as if the padding held clean values.
    B, H, Lq, Lk, D = 3, 2, 70, 3 * 64 + 5, 64
    q, k, v, _ = make_inputs(B, H, Lq, Lk, D, dtype=dtype, device="cuda", mask=None)
    m = tile_mask(B, Lk, 64, device="cuda")
    kp, vp = (_poison(x, m).requires_grad_() for x in (k, v))
    out = attention(q, kp, vp, key_padding_mask=m, backend=backend)
    do = torch.randn_like(out)
    got = grads(out, do, q, kp, vp)
    if dtype != torch.float32:
        assert_fa_rule(out, got, q, k, v, m, do)
        return
    ref = attention_ref(q, k, v, m)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for g, w in zip(got, grads(ref, do, q, k, v)):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fully_masked_rows_are_zero_with_zero_grads(backend, dtype):
    # The CUDA outputs come from torch.empty: a skipped row or key block that is never written
    # shows here as garbage (an error bound against the reference may not catch it).
    _check_fully_masked_rows(backend, 70, 133, 64, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,layout", [(33, "bhld"), (100, "blhd"), (8, "misaligned")])
def test_gpu_odd_head_dims_and_layouts(backend, dtype, D, layout):
    # D = 33 and 100 are no multiple of the CUDA kernels' 16-byte vector width for fp16/bf16
    # (scalar loads), D = 8 pads to DP = 32; "blhd" are strided views the binding must copy;
    # "misaligned" tensors are contiguous but start 1 element past a 16-byte boundary, so the
    # vector-load alignment check must fall back (a wrong check faults: misaligned address).
    q, k, v, m = make_inputs(
        2,
        3,
        37,
        45,
        D,
        dtype=dtype,
        device="cuda",
        mask="random",
        layout="blhd" if layout == "blhd" else "bhld",
    )
    if layout == "misaligned":

        def shift(x):
            buf = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
            return buf[1:].view(x.shape).copy_(x.detach()).requires_grad_()

        q, k, v = map(shift, (q, k, v))
        assert q.is_contiguous() and q.data_ptr() % 16 != 0
    if dtype == torch.float32:
        check_against_ref(q, k, v, m, backend, tol=dict(atol=1e-4, rtol=1e-4))
        return
    out = attention(q, k, v, key_padding_mask=m, backend=backend)
    do = torch.randn_like(out)
    assert_fa_rule(out, grads(out, do, q, k, v), q, k, v, m, do)


@pytest.mark.gpu
def test_gpu_cuda_ext_opcheck():
    if not hasattr(torch.ops.r2d2, "attention_fwd"):
        pytest.fail("r2d2._C has no attention_fwd: rebuild the extension with CUDA")
    q, k, v, m = make_inputs(2, 2, 7, 19, 64, dtype=torch.float16, device="cuda", mask="random")
    args = (q.detach(), k.detach(), v.detach(), m, 0.125, 0.0, 0, 0)
    torch.library.opcheck(torch.ops.r2d2.attention_fwd.default, args)


@needs_triton
def test_cuda_dropout_stream_equals_triton_on_host(tmp_path):
    """The CUDA kernels' Philox draw (attention_kernel.h), replayed on the host, keeps exactly the
    scores the Triton kernels keep for the same seed and offset."""
    import shutil
    import subprocess
    from pathlib import Path

    from r2d2.kernels.attention import triton as at

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parents[2]
    exe = tmp_path / "attention_philox"
    subprocess.run(
        [
            cxx,
            "-std=c++17",
            "-O2",
            "-I",
            str(root / "csrc"),
            str(root / "tests/cpp/attention_philox.cc"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    B, H, Lq, Lk, p = 2, 3, 9, 37, 0.3
    for seed, offset in ((12345, 0), (2**31 - 2, 77)):
        run = subprocess.run(
            [str(exe), *map(str, (B, H, Lq, Lk, p, seed, offset))],
            capture_output=True,
            text=True,
            check=True,
        )
        host = torch.tensor([c == "1" for c in run.stdout.strip()]).view(B, H, Lq, Lk)
        tri = at.dropout_keep_mask(B, H, Lq, Lk, p, seed, offset, "cpu")
        assert 0.2 < 1 - host.float().mean().item() < 0.4
        assert torch.equal(host, tri)


@needs_triton
def test_triton_inference_path_without_grad():
    q, k, v, m = make_inputs(2, 2, 7, 19, 32, mask="lengths")
    with torch.no_grad():
        out = attention(q, k, v, key_padding_mask=m, backend="triton")
    assert out.grad_fn is None
    torch.testing.assert_close(out, attention_ref(q, k, v, m).detach(), **FP32_TOL)


@pytest.mark.gpu
def test_gpu_xformers_matches_ref():
    pytest.importorskip("xformers", reason="xformers not installed on this GPU machine")
    q, k, v, m = make_inputs(3, 2, 65, 129, 64, dtype=torch.float16, device="cuda", mask="random")
    out = attention(q, k, v, key_padding_mask=m, backend="xformers")
    torch.testing.assert_close(
        out.float(), attention_ref(q.float(), k.float(), v.float(), m), atol=2e-3, rtol=2e-3
    )
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # the fully padded batch row


@pytest.mark.gpu
def test_gpu_cuda_bwd_opcheck():
    if not hasattr(torch.ops.r2d2, "attention_bwd"):
        pytest.fail("r2d2._C has no attention_bwd: rebuild the extension with CUDA")
    q, k, v, m = make_inputs(2, 2, 7, 19, 64, dtype=torch.float16, device="cuda", mask="random")
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = torch.ops.r2d2.attention_fwd(q, k, v, m, 0.125, 0.0, 0, 0)
    args = (torch.randn_like(o), q, k, v, o, lse, m, 0.125, 0.0, 0, 0)
    torch.library.opcheck(torch.ops.r2d2.attention_bwd.default, args)
