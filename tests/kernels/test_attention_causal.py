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
