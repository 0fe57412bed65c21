"""Causal attention (``causal=True``, bottom-right aligned: query i sees key j iff
``j <= i + (Lk - Lq)``): the reference against a row-by-row oracle, every backend's outputs and
q/k/v gradients against the reference on fresh random inputs (Lq == Lk, the KV-cache shapes
Lq < Lk, Lq > Lk, odd lengths, padding combined with causality, queries left with no key), the
tile skip of the fused kernels, and the causal ``auto`` classes.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest) with 16 x 16 tiles, in fp32 and
fp16 (bf16 dots are wrong in the interpreter: GPU only); the CUDA kernels and bf16 run in the
``gpu``-marked cases.
"""

from __future__ import annotations

import pytest
import torch

from _helpers.attention import (
    FP32_TOL,
    assert_fa_rule,
    check_against_ref,
    grads,
    make_inputs,
)
from r2d2.kernels import attention, attention_ref
from r2d2.kernels.attention import auto_class
from r2d2.kernels.attention.reference import causal_mask
from r2d2.kernels.attention.tuning import AttentionTuning, class_key, class_str
from r2d2.kernels.dispatch import triton_importable

needs_triton = pytest.mark.skipif(not triton_importable(), reason="triton not installed")

# (B, H, Lq, Lk, D, mask): the usual triangle, KV-cache decoding (one and three new queries
# against 17 cached keys), Lq > Lk (the first Lq - Lk queries see nothing), odd lengths that end
# mid-tile, and padding on top of causality.
CASES = [
    (2, 2, 7, 7, 32, None),
    (2, 1, 33, 33, 16, "lengths"),
    (2, 2, 1, 17, 32, None),
    (2, 2, 3, 17, 32, "random"),
    (2, 1, 9, 4, 16, "random"),
    (1, 2, 65, 65, 16, None),
    (2, 1, 1, 1, 8, None),
    (2, 1, 20, 37, 16, "random"),
]


def _oracle(q, k, v, m, scale=None):
    """Row by row in fp64: each query's softmax over exactly the keys it may see (none: zeros)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    for b in range(B):
        for i in range(Lq):
            keys = [j for j in range(Lk) if j <= i + (Lk - Lq) and (m is None or bool(m[b, j]))]
            if not keys:
                continue
            s = (q[b, :, i : i + 1].double() @ k[b, :, keys].double().transpose(-1, -2)) * scale
            out[b, :, i] = (torch.softmax(s, -1) @ v[b, :, keys].double())[:, 0]
    return out


def test_causal_mask_is_bottom_right():
    for Lq, Lk in ((5, 5), (1, 6), (3, 8), (7, 3)):
        c = causal_mask(Lq, Lk)
        for i in range(Lq):
            assert c[i].tolist() == [j <= i + (Lk - Lq) for j in range(Lk)]
    assert causal_mask(1, 9).all()  # one decoding query sees every cached key
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("B,H,Lq,Lk,D,mask", CASES)
def test_reference_matches_row_by_row_oracle(B, H, Lq, Lk, D, mask):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask=mask)
    got = attention_ref(q, k, v, m, causal=True)
    torch.testing.assert_close(got.double(), _oracle(q, k, v, m), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,H,Lq,Lk,D,mask", CASES)
def test_sdpa_causal_matches_ref(B, H, Lq, Lk, D, mask):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask=mask)
    check_against_ref(q, k, v, m, "sdpa", causal=True, tol=dict(atol=1e-5, rtol=1e-5))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_causal_false_is_unchanged(backend):
    q, k, v, m = make_inputs(2, 2, 5, 9, 16, mask="random")
    a = attention(q, k, v, key_padding_mask=m, backend=backend)
    b = attention(q, k, v, key_padding_mask=m, causal=False, backend=backend)
    assert torch.equal(a, b)
    # and causal really changes something where Lq > 1
    c = attention(q, k, v, key_padding_mask=m, causal=True, backend=backend)
    assert not torch.allclose(a, c)


def _check_rows_without_keys(backend, dtype=torch.float32, device="cpu"):
    """Queries with no key: Lq > Lk leaves the first Lq - Lk without one, and padding the first
    keys leaves the first queries of an Lq == Lk batch row without one. Zeros, zero gradients,
    finite everything; the other rows have real gradients."""
    B, H, D = 3, 2, 16
    for Lq, Lk in ((13, 6), (19, 19)):
        q, k, v, _ = make_inputs(B, H, Lq, Lk, D, dtype=dtype, device=device, mask=None)
        m = torch.ones(B, Lk, dtype=torch.bool, device=device)
        m[1, :4] = False  # row 1: queries 0..3 (+ Lq - Lk) see only padding
        m[2] = False  # row 2: fully padded
        out = attention(q, k, v, key_padding_mask=m, causal=True, backend=backend)
        dq, dk, dv = grads(out, torch.randn_like(out), q, k, v)
        dead = ~(causal_mask(Lq, Lk, device)[None] & m[:, None, :]).any(-1)  # [B, Lq]
        assert dead[0].sum() == max(0, Lq - Lk) and dead[1].sum() == max(0, Lq - Lk) + 4
        for x in (out, dq):
            sel = x.transpose(1, 2)[dead]  # [n_dead, H, D]
            assert torch.equal(sel, torch.zeros_like(sel))
        assert torch.equal(dk[2], torch.zeros_like(dk[2]))
        assert torch.equal(dv[1][:, :4], torch.zeros_like(dv[1][:, :4]))  # padded keys
        assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))
        live = ~dead
        assert dq.transpose(1, 2)[live].abs().sum() > 0 and dv[0].abs().sum() > 0


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_rows_without_keys_are_zero_with_zero_grads(backend):
    _check_rows_without_keys(backend)


def test_dropout_with_causal_keeps_hidden_keys_out():
    # v = one-hot keys: out[..., j] is query i's (dropped, rescaled) weight on key j, which must
    # be exactly 0 for every key it may not see, whatever dropout drew.
    B, H, Lq, Lk = 2, 2, 9, 12
    q, k = torch.randn(B, H, Lq, 16), torch.randn(B, H, Lk, 16)
    v = torch.eye(Lk, 16).expand(B, H, Lk, 16).contiguous()
    hidden = ~causal_mask(Lq, Lk)
    for backend in ("eager", "sdpa"):
        out = attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
        assert torch.equal(out[..., :Lk][..., hidden], torch.zeros_like(out[..., :Lk][..., hidden]))


def test_causal_must_be_bool():
    q, k, v, _ = make_inputs(1, 1, 3, 5, 8, mask=None)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention(q, k, v, causal=1, backend="eager")


# ---------------------------------------------------------------------------------------------
# auto: causal calls are classes of their own; records written before causal existed load


def test_auto_class_separates_causal():
    q, k, _, _ = make_inputs(2, 2, 32, 32, 64, mask=None)
    plain = auto_class(q, k, grad=True)
    causal = auto_class(q, k, grad=True, causal=True)
    assert plain == "cpu fp32 Lq<=32 Lk<=32 D<=64 unmasked fwd+bwd"  # the old description
    assert causal == "cpu fp32 Lq<=32 Lk<=32 D<=64 unmasked causal fwd+bwd"
    t = AttentionTuning(attention)
    key = t.class_key(q, k, k, None, 0.0, True)
    assert class_str(key) == causal and key != t.class_key(q, k, k, None, 0.0, False)
    assert key[-1] is torch.is_grad_enabled()  # grad stays the last item (probe reads it there)
    probe = t.probe(key, (q, k, k, None, 0.0, True))
    assert probe.causal and "causal" in t.probe_str(probe)


def test_auto_records_round_trip_and_old_records_load():
    t = AttentionTuning(attention)
    dev = torch.device("cpu")
    for causal in (False, True):
        key = class_key(dev, torch.bfloat16, 64, 64, 64, True, False, True, causal)
        rec = t.to_record(key)
        assert rec["causal"] is causal and t.from_record(rec, dev) == key
    old = t.to_record(class_key(dev, torch.bfloat16, 64, 64, 64, True, False, True))
    del old["causal"]  # a checkpoint written before causal classes
    assert t.from_record(old, dev) == class_key(dev, torch.bfloat16, 64, 64, 64, True, False, True)


def test_auto_measures_causal_class_separately(monkeypatch):
    from r2d2.kernels import autotune
    from r2d2.kernels.attention import SPEC, auto_picks, auto_timings_clear

    tuning = SPEC.tuning
    timed = []

    def fake_time(backend, probe):
        timed.append((backend, probe.causal))
        return {"sdpa": 1.0, "eager": 2.0}.get(backend, 3.0)

    monkeypatch.setattr(tuning, "device_types", ("cpu",))
    monkeypatch.setattr(tuning, "candidates", ("sdpa", "eager"))
    monkeypatch.setattr(tuning, "time", fake_time)
    monkeypatch.delenv(autotune.env_name("attention"), raising=False)
    auto_timings_clear()
    try:
        q, k, v, _ = make_inputs(2, 2, 16, 16, 32, mask=None)
        out = attention(q, k, v, causal=True)
        torch.testing.assert_close(out, attention_ref(q, k, v, causal=True), **FP32_TOL)
        attention(q, k, v)
        assert sorted(set(timed)) == [
            ("eager", False),
            ("eager", True),
            ("sdpa", False),
            ("sdpa", True),
        ]
        picks = auto_picks()
        assert "cpu fp32 Lq<=16 Lk<=16 D<=32 unmasked causal fwd+bwd" in picks
        assert "cpu fp32 Lq<=16 Lk<=16 D<=32 unmasked fwd+bwd" in picks
    finally:
        auto_timings_clear()


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU: one 16 x 16 config)


@needs_triton
@pytest.mark.parametrize("B,H,Lq,Lk,D,mask", CASES)
def test_triton_causal_fp32_matches_ref(B, H, Lq, Lk, D, mask):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask=mask)
    check_against_ref(q, k, v, m, "triton", causal=True)


@needs_triton
@pytest.mark.parametrize(
    "B,H,Lq,Lk,D,mask",
    [(2, 2, 33, 33, 32, "lengths"), (2, 2, 3, 17, 32, None), (2, 1, 37, 20, 16, "random")],
)
def test_triton_causal_fp16_flash_rule(B, H, Lq, Lk, D, mask):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, dtype=torch.float16, mask=mask)
    out = attention(q, k, v, key_padding_mask=m, causal=True, backend="triton")
    do = torch.randn_like(out)
    assert_fa_rule(out, grads(out, do, q, k, v), q, k, v, m, do, causal=True)


@needs_triton
def test_triton_causal_strided_inputs_and_scale():
    q, k, v, m = make_inputs(2, 3, 19, 21, 32, mask="random", layout="blhd")
    assert not q.is_contiguous()
    check_against_ref(q, k, v, m, "triton", scale=0.37, causal=True)


@needs_triton
def test_triton_rows_without_keys_are_zero_with_zero_grads():
    _check_rows_without_keys("triton")


@needs_triton
def test_triton_causal_dropout_exact_against_keep_mask():
    from r2d2.kernels.attention import triton as at

    B, H, Lq, Lk, D, p = 2, 2, 23, 30, 16, 0.3
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask="random")
    torch.manual_seed(5)
    out = attention(q, k, v, key_padding_mask=m, causal=True, dropout_p=p, backend="triton")
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the draw _fused makes
    keep = at.dropout_keep_mask(B, H, Lq, Lk, p, seed, 0, q.device)
    ref = attention_ref(q, k, v, m, dropout_p=p, dropout_mask=keep, causal=True)
    do = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for g, w in zip(grads(out, do, q, k, v), grads(ref, do, q, k, v)):
        torch.testing.assert_close(g, w, **FP32_TOL)


def _interp_tiles():
    from r2d2.kernels.attention import triton as at

    blocks = set()
    for kind in ("fwd", "dkdv", "dq"):
        (cfg,) = at._configs(kind)  # the interpreter's single config
        blocks.add((cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]))
    (bm_bn,) = blocks  # the tests below assume one tile shape for the three kernels
    return bm_bn


# (Lq, Lk) with 16 x 16 tiles: square with a partial last tile, Lq < Lk with the diagonal off the
# tile grid, Lq > Lk (the first query tile sees no key at all).
SKIP_SHAPES = [(40, 40), (33, 45), (37, 20)]


def _last_key_seen(i, Lq, Lk):
    return i + (Lk - Lq)  # bottom-right alignment; < 0: row i sees no key


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over NaN rows
@pytest.mark.parametrize("Lq,Lk", SKIP_SHAPES)
def test_triton_forward_and_dq_never_read_tiles_above_the_diagonal(Lq, Lk):
    """For each query tile: NaN in every K/V tile that starts after the last key the tile's last
    row may see. Those tiles are never loaded, so the tile's outputs and dq equal the clean
    reference; a kernel that computes them and masks the scores fails here (p = 0 times a NaN
    value is NaN in p @ v, and ds = 0 times a NaN key is NaN in ds @ k)."""
    bm, bn = _interp_tiles()
    B, H, D = 2, 2, 16
    q, k, v, _ = make_inputs(B, H, Lq, Lk, D, mask=None)
    ref = attention_ref(q, k, v, causal=True)
    do = torch.randn_like(ref)
    want_dq = grads(ref, do, q)[0]
    planted = 0
    for m0 in range(0, Lq, bm):
        last = _last_key_seen(min(m0 + bm, Lq) - 1, Lq, Lk)
        cut = 0 if last < 0 else (last // bn + 1) * bn  # first tile no row here sees
        if cut >= Lk:
            continue
        planted += 1
        kp, vp = (x.detach().clone() for x in (k, v))
        kp[:, :, cut:] = float("nan")
        vp[:, :, cut:] = float("nan")
        qq = q.detach().clone().requires_grad_()
        out = attention(qq, kp, vp, causal=True, backend="triton")
        (dq,) = grads(out, do, qq)
        rows = slice(m0, min(m0 + bm, Lq))
        torch.testing.assert_close(out[:, :, rows], ref[:, :, rows], **FP32_TOL)
        torch.testing.assert_close(dq[:, :, rows], want_dq[:, :, rows], **FP32_TOL)
    assert planted > 0  # the shape really has tiles above the diagonal


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("Lq,Lk", SKIP_SHAPES)
def test_triton_dkdv_never_reads_query_tiles_before_the_diagonal(Lq, Lk):
    """For each key tile: NaN in q and dO of every query tile that ends before the first query
    that sees the tile's first key. The dK/dV loop starts after them, so the tile's dk and dv
    equal the clean reference; visiting them with p masked to 0 gives ds = 0 * (dp - NaN) = NaN
    in dk and 0 * NaN = NaN in p^T @ dO."""
    bm, bn = _interp_tiles()
    B, H, D = 2, 2, 16
    q, k, v, _ = make_inputs(B, H, Lq, Lk, D, mask=None)
    ref = attention_ref(q, k, v, causal=True)
    do = torch.randn_like(ref)
    want_dk, want_dv = grads(ref, do, k, v)
    planted = 0
    for n0 in range(0, Lk, bn):
        first = max(n0 - (Lk - Lq), 0)  # first query row that sees key n0
        cut = (first // bm) * bm  # query tiles before it see none of this key tile
        if cut == 0:
            continue
        planted += 1
        qp, dop = q.detach().clone(), do.clone()
        qp[:, :, :cut] = float("nan")
        dop[:, :, :cut] = float("nan")
        kk, vv = (x.detach().clone().requires_grad_() for x in (k, v))
        out = attention(qp, kk, vv, causal=True, backend="triton")
        dk, dv = grads(out, dop, kk, vv)
        keys = slice(n0, min(n0 + bn, Lk))
        torch.testing.assert_close(dk[:, :, keys], want_dk[:, :, keys], **FP32_TOL)
        torch.testing.assert_close(dv[:, :, keys], want_dv[:, :, keys], **FP32_TOL)
    assert planted > 0


@needs_triton
@pytest.mark.parametrize("Lq,Lk", [*SKIP_SHAPES, (65, 65), (3, 40)])
def test_triton_causal_tile_counts(Lq, Lk):
    """The kernels' tile counters: forward and dQ visit, per query tile, only the key tiles up to
    the last key its last row sees; dK/dV visits, per key tile, only the query tiles from the one
    holding the first query that sees it. About half the non-causal count when Lq == Lk."""
    from r2d2.kernels.attention import triton as at

    bm, bn = _interp_tiles()
    B, H, D = 2, 3, 16
    q, k, v, _ = make_inputs(B, H, Lq, Lk, D, mask=None)
    q, k, v = q.detach(), k.detach(), v.detach()
    n_m, n_n = -(-Lq // bm), -(-Lk // bn)
    want_q = sum(
        -(-max(0, min(_last_key_seen(min(m0 + bm, Lq) - 1, Lq, Lk) + 1, Lk)) // bn)
        for m0 in range(0, Lq, bm)
    )
    want_kv = sum(n_m - max(n0 - (Lk - Lq), 0) // bm for n0 in range(0, Lk, bn))
    count = lambda: torch.zeros(B * H, dtype=torch.int32)  # noqa: E731
    c_fwd, c_kv, c_q = count(), count(), count()
    scale = D**-0.5
    o, lse = at.fwd(q, k, v, None, scale, causal=True, tile_count=c_fwd)
    do = torch.randn_like(o)
    at.bwd(do, q, k, v, o, lse, None, scale, causal=True, tile_count=(c_kv, c_q))
    assert c_fwd.tolist() == [want_q] * (B * H)
    assert c_q.tolist() == [want_q] * (B * H)
    assert c_kv.tolist() == [want_kv] * (B * H)
    if Lq > 3:  # 3 queries against 40 keys: one query tile that sees every key tile
        assert want_q < n_m * n_n and want_kv < n_m * n_n  # something was skipped
    if Lq == Lk:
        assert want_q == n_m * (n_m + 1) // 2  # the lower triangle of tiles


@needs_triton
def test_triton_causal_tile_counts_with_padding():
    # Padding and causality skip together: a key tile is visited only if some key in it is both
    # unpadded and visible.
    from r2d2.kernels.attention import triton as at

    bm, bn = _interp_tiles()
    B, H, L, D = 2, 1, 4 * bn, 16
    q, k, v, _ = make_inputs(B, H, L, L, D, mask=None)
    q, k, v = q.detach(), k.detach(), v.detach()
    m = torch.ones(B, L, dtype=torch.bool)
    m[0, bn : 2 * bn] = False  # row 0: key tile 1 fully padded
    c = torch.zeros(B * H, dtype=torch.int32)
    at.fwd(q, k, v, m, D**-0.5, causal=True, tile_count=c)
    n = L // bm
    tri = n * (n + 1) // 2
    assert c.tolist() == [tri - (n - 1), tri]  # tile 1 is seen by query tiles 1..n-1


# ---------------------------------------------------------------------------------------------
# GPU: low precision (flash-attention's rule), fp32, the CUDA kernels, the decoder's shapes

GPU_CASES = [  # (B, H, Lq, Lk, D, mask): decoder self-attention, KV cache, odd and long ones
    (8, 8, 32, 32, 64, "lengths"),
    (4, 12, 64, 64, 64, None),
    (4, 8, 1, 40, 64, None),
    (4, 8, 3, 17, 64, "random"),
    (2, 4, 65, 33, 64, "random"),
    (2, 2, 197, 197, 80, "lengths"),
    (2, 2, 7, 200, 128, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Lq,Lk,D,mask", GPU_CASES)
def test_gpu_causal_low_precision_flash_rule(backend, dtype, B, H, Lq, Lk, D, mask):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, dtype=dtype, device="cuda", mask=mask)
    out = attention(q, k, v, key_padding_mask=m, causal=True, backend=backend)
    do = torch.randn_like(out)
    assert_fa_rule(out, grads(out, do, q, k, v), q, k, v, m, do, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "sdpa", "eager"])
@pytest.mark.parametrize("Lq,Lk", [(65, 65), (1, 129), (3, 17), (70, 33)])
def test_gpu_causal_fp32_matches_ref(backend, Lq, Lk):
    q, k, v, m = make_inputs(3, 2, Lq, Lk, 64, device="cuda", mask="random")
    check_against_ref(q, k, v, m, backend, causal=True, tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "sdpa"])
def test_gpu_causal_rows_without_keys(backend):
    _check_rows_without_keys(backend, dtype=torch.float32, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_causal_never_reads_tiles_above_the_diagonal(backend):
    # Every GPU tile (Triton: 16 to 128 rows, CUDA: 64) starts at a multiple of its size, so the
    # query tiles holding rows < 128 see keys < 128 only and stop before the tiles from key 128
    # on: NaN planted there must leave those rows' outputs and dq as in the clean run.
    B, H, L, D = 2, 2, 256, 64
    q, k, v, _ = make_inputs(B, H, L, L, D, dtype=torch.float16, device="cuda", mask=None)
    out = attention(q, k, v, causal=True, backend=backend)
    do = torch.randn_like(out)
    (dq,) = grads(out, do, q)
    kp, vp = (x.detach().clone() for x in (k, v))
    kp[:, :, 128:] = float("nan")
    vp[:, :, 128:] = float("nan")
    q2 = q.detach().clone().requires_grad_()
    out2 = attention(q2, kp, vp, causal=True, backend=backend)
    (dq2,) = grads(out2, do, q2)
    for got, want in ((out2, out), (dq2, dq)):
        assert torch.isfinite(got[:, :, :128]).all()
        torch.testing.assert_close(got[:, :, :128], want[:, :, :128])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_causal_dropout_exact_against_shared_philox_mask(backend):
    from r2d2.kernels.attention import triton as at

    B, H, Lq, Lk, D, p = 2, 2, 33, 70, 64, 0.2
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, device="cuda", mask="random")
    torch.manual_seed(7)
    out = attention(q, k, v, key_padding_mask=m, causal=True, dropout_p=p, backend=backend)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    keep = at.dropout_keep_mask(B, H, Lq, Lk, p, seed, 0, "cuda")
    ref = attention_ref(q, k, v, m, dropout_p=p, dropout_mask=keep, causal=True)
    do = torch.randn_like(out)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    for g, w in zip(grads(out, do, q, k, v), grads(ref, do, q, k, v)):
        torch.testing.assert_close(g, w, **tol)


@pytest.fixture(scope="module")
def causal_bounds_exe(tmp_path_factory):
    import shutil
    import subprocess
    from pathlib import Path

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parents[2]
    exe = tmp_path_factory.mktemp("cpp") / "attention_causal_bounds"
    src = root / "tests/cpp/attention_causal_bounds.cc"
    cmd = [cxx, "-std=c++17", "-O2", "-I", str(root / "csrc"), str(src), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


# (rows per block, tile) of the CUDA launchers: fp16/bf16 D <= 64 (4 warps, 64-row tiles),
# D > 64 (2 warps), fp32 (2 warps, 32-row tiles).
CUDA_TILES = [(64, 64), (32, 64), (32, 32)]


@pytest.mark.parametrize("rows,tile", CUDA_TILES)
@pytest.mark.parametrize(
    "Lq,Lk", [(65, 65), (128, 128), (1, 129), (3, 17), (70, 33), (200, 7), (7, 200), (97, 130)]
)
def test_cuda_causal_bounds_on_host(causal_bounds_exe, rows, tile, Lq, Lk):
    """The CUDA kernels' causal loops (replayed on the host with attention_kernel.h's bound
    helpers) let through exactly the reference's (query, key) pairs in every kernel and never
    visit a tile without a visible pair; no GPU needed."""
    import subprocess

    run = subprocess.run(
        [str(causal_bounds_exe), *map(str, (Lq, Lk, rows, tile))],
        capture_output=True,
        text=True,
        check=True,
    )
    fwd, kv, counts = run.stdout.split("\n")[:3]
    want = causal_mask(Lq, Lk)
    for name, got in (("fwd/dq", fwd), ("dkdv", kv)):
        got = torch.tensor([c == "1" for c in got]).view(Lq, Lk)
        assert torch.equal(got, want), name
    visits_fwd, visits_kv, wasted = map(int, counts.split())
    assert wasted == 0
    n_all = -(-Lq // rows) * -(-Lk // tile)
    if Lq == Lk == 128 and rows == tile:
        n = 128 // rows
        assert visits_fwd == visits_kv == n * (n + 1) // 2 < n_all


def test_old_checkpoint_picks_load_as_non_causal(monkeypatch):
    """A checkpoint's attention picks written before causal classes existed (no "causal" in the
    record) load through kernels.load_state_dict as the non-causal class; a causal call of the
    same shape is a class of its own and is measured."""
    from r2d2.kernels import autotune, load_state_dict, state_dict
    from r2d2.kernels.attention import SPEC, auto_picks, auto_timings_clear

    monkeypatch.setattr(SPEC.tuning, "device_types", ("cpu",))
    monkeypatch.delenv(autotune.env_name("attention"), raising=False)
    auto_timings_clear()
    try:
        old = {
            "device": "cpu",
            "dtype": "fp32",
            "lq": 32,
            "lk": 32,
            "d": 32,
            "masked": False,
            "dropout": False,
            "grad": True,
            "backend": "eager",
        }
        assert load_state_dict({"attention": [old]}, "cpu") == 1
        plain = "cpu fp32 Lq<=32 Lk<=32 D<=32 unmasked fwd+bwd"
        assert auto_picks()[plain].source == "checkpoint"
        timed = []
        monkeypatch.setattr(SPEC.tuning, "candidates", ("sdpa",))
        monkeypatch.setattr(SPEC.tuning, "time", lambda b, p: timed.append(p.causal) or 1.0)
        q, k, v, _ = make_inputs(2, 2, 20, 20, 32, mask=None)
        attention(q, k, v)  # the restored pick: nothing measured
        assert timed == []
        attention(q, k, v, causal=True)
        assert timed == [True]
        saved = {r["causal"]: r["backend"] for r in state_dict()["attention"]}
        assert saved == {False: "eager", True: "sdpa"}  # both written back, causal marked
    finally:
        auto_timings_clear()
