"""Edge contracts shared by every backend of the fused ops (each op's docstring states them):

* distill_kl: a row whose teacher (or student) is not a distribution (a NaN or +inf logit, or all
  -inf) is NaN, loss and gradient, on every backend; an empty batch is 0 for sum/batchmean.
* attention: keys masked out are never read (NaN/inf there changes nothing, their gradients are
  0); an empty output (head dim 0, ...) is an empty tensor on every backend.
* contrastive_loss: an empty batch is a ValueError on every backend.
* non-tensor arguments raise TypeError naming the argument.

Backends that cannot run here (cuda, xformers) are skipped; Triton runs under the interpreter
(TRITON_INTERPRET=1, set by conftest) in fp32.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from r2d2.kernels import attention, attention_ref, contrastive_loss, distill_kl, distill_kl_ref
from r2d2.kernels.attention import attention_xformers
from r2d2.kernels.dispatch import why_unavailable

NAN, INF = float("nan"), float("inf")


def _runnable(op: str, backends, device="cpu"):
    return [
        pytest.param(
            b,
            marks=pytest.mark.skipif(
                why_unavailable(op, b, device) is not None,
                reason=str(why_unavailable(op, b, device)),
            ),
        )
        for b in backends
    ]


# ---------------------------------------------------------------------------------------------
# distill_kl: non-finite logits

KL_BACKENDS = _runnable("distill_kl", ["eager", "cpp", "triton"])

# (name, planter) -> row 1 is not a distribution; rows 0 and 2 are ordinary.
_BAD_ROWS = {
    "teacher_nan": lambda s, t: t[1].__setitem__(5, NAN),
    "teacher_pos_inf": lambda s, t: t[1].__setitem__(5, INF),
    "teacher_all_neg_inf": lambda s, t: t[1].fill_(-INF),
    "student_nan": lambda s, t: s[1].__setitem__(7, NAN),
    "student_pos_inf": lambda s, t: s[1].__setitem__(7, INF),
    "student_all_neg_inf": lambda s, t: s[1].fill_(-INF),
}


def _kl_inputs(case, cols=300, dtype=torch.float32):
    s, t = torch.randn(3, cols) * 3, torch.randn(3, cols) * 3
    _BAD_ROWS[case](s, t)
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("case", sorted(_BAD_ROWS))
def test_distill_kl_non_distribution_row_is_nan_on_every_backend(backend, case):
    """Eager used to give 0 for the teacher cases (a wrong finite number); every backend now gives
    NaN for the row and its whole gradient, and the other rows stay exact."""
    s, t = _kl_inputs(case)
    x = s.clone().requires_grad_()
    out = distill_kl(x, t, temperature=2.0, reduction="none", backend=backend)
    out.backward(torch.ones_like(out))
    assert out[1].isnan(), f"{backend} {case}: row 1 = {out[1].item()}, expected NaN"
    assert x.grad[1].isnan().all()
    good = [0, 2]
    ref = distill_kl_ref(s[good], t[good], 2.0, "none")
    torch.testing.assert_close(out[good], ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad[good]).all()
    for red in ("batchmean", "sum"):
        assert distill_kl(s, t, temperature=2.0, reduction=red, backend=backend).isnan()


@pytest.mark.parametrize("backend", _runnable("distill_kl", ["eager", "cpp"]))
def test_distill_kl_non_distribution_row_is_nan_fp64(backend):
    s, t = _kl_inputs("teacher_pos_inf", dtype=torch.float64)
    out = distill_kl(s, t, reduction="none", backend=backend)
    assert out[1].isnan() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("backend", KL_BACKENDS)
def test_distill_kl_masked_teacher_class_and_student_neg_inf_stay_defined(backend):
    """What is not a NaN row: a -inf teacher class has zero mass (finite loss), a -inf student
    logit where the teacher has mass gives +inf with a finite gradient."""
    s, t = torch.randn(2, 40), torch.randn(2, 40)
    t[0, :30] = -INF
    s[1, 3] = -INF
    x = s.clone().requires_grad_()
    out = distill_kl(x, t, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.isfinite(out[0]) and out[1] == INF
    torch.testing.assert_close(out[0], distill_kl_ref(s[:1], t[:1], 1.0, "none")[0])
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# distill_kl: empty batch


@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_distill_kl_empty_batch(backend, shape, reduction):
    x = torch.randn(shape, requires_grad=True)
    out = distill_kl(x, torch.randn(shape), reduction=reduction, backend=backend)
    if reduction == "none":
        assert out.shape == shape[:-1]
    else:
        assert out.shape == () and out.item() == 0.0, f"{reduction} of no rows = {out.item()}"
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == shape


def test_distill_kl_empty_classes_is_an_error():
    with pytest.raises(ValueError, match="class"):
        distill_kl(torch.randn(3, 0), torch.randn(3, 0))


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_distill_kl_non_tensor_argument_is_a_type_error(which):
    args = {"student_logits": torch.randn(2, 3), "teacher_logits": torch.randn(2, 3)}
    args[which] = [[0.0, 1.0, 2.0]] * 2
    with pytest.raises(TypeError, match=f"distill_kl: {which} must be a tensor, got list"):
        distill_kl(args["student_logits"], args["teacher_logits"])


# ---------------------------------------------------------------------------------------------
# attention: masked keys are never read

ATTN_BACKENDS = _runnable("attention", ["eager", "sdpa", "triton", "xformers"])


def _attn_case(bad: float, where: str):
    """q/k/v [3, 2, Lq, Lk, D] with batch row 1 fully masked and ``bad`` planted in masked keys
    (k or v) of every batch row; plus the same inputs with zeros there."""
    B, H, Lq, Lk, D = 3, 2, 9, 21, 16
    q, k, v = (torch.randn(B, H, L, D) for L in (Lq, Lk, Lk))
    m = torch.ones(B, Lk, dtype=torch.bool)
    m[0, 15:] = False
    m[1] = False
    m[2, [0, 4, 20]] = False
    clean_k, clean_v = k.clone(), v.clone()
    for x in (k,) if where == "k" else (v,) if where == "v" else (k, v):
        x.transpose(1, 2)[~m] = bad
    for x in (clean_k, clean_v):
        x.transpose(1, 2)[~m] = 0.0
    return q, k, v, clean_k, clean_v, m


def _attn_run(backend, q, k, v, m, do, causal=False):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, key_padding_mask=m, causal=causal, backend=backend)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("where", ["k", "v", "kv"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_attention_masked_keys_are_never_read(backend, where, bad):
    """sdpa used to return NaN everywhere for a NaN in a masked key (and eager for one in a masked
    value): the output and gradients must be those of zeros in the masked slots."""
    q, k, v, ck, cv, m = _attn_case(bad, where)
    do = torch.randn(q.shape)
    out, dq, dk, dv = _attn_run(backend, q, k, v, m, do)
    want = _attn_run("eager", q, ck, cv, m, do)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        assert torch.isfinite(got).all(), f"{backend}: non-finite {name}"
        torch.testing.assert_close(
            got, ref, atol=2e-5, rtol=2e-5, msg=lambda s, n=name: f"{backend} {n}: {s}"
        )
    masked = ~m[:, None, :, None].expand_as(dk)
    assert (dk[masked] == 0).all() and (dv[masked] == 0).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all()  # fully masked batch row: zeros


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_attention_masked_keys_are_never_read_causal(backend, bad):
    """Padding stays never-read with ``causal=True`` on top (the masks are ANDed)."""
    q, k, v, ck, cv, m = _attn_case(bad, "kv")
    do = torch.randn(q.shape)
    got = _attn_run(backend, q, k, v, m, do, causal=True)
    want = _attn_run("eager", q, ck, cv, m, do, causal=True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{backend}: non-finite {name}"
        torch.testing.assert_close(
            g, w, atol=2e-5, rtol=2e-5, msg=lambda s, n=name: f"{backend} {n}: {s}"
        )
    assert (got[0][1] == 0).all() and (got[1][1] == 0).all()  # fully masked batch row


class _FakeXops(types.ModuleType):
    """Stands in for ``xformers.ops`` (not installed here): memory_efficient_attention's math in
    [B, L, H, D] layout with an additive bias, so the wrapper's handling of masks is tested."""

    def __init__(self):
        super().__init__("xformers.ops")

    @staticmethod
    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
        s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_bias is not None:
            s = s + attn_bias.float()
        return (torch.softmax(s, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_attention_xformers_wrapper_zeroes_masked_keys(monkeypatch, bad):
    fake = _FakeXops()
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    sys.modules["xformers"].ops = fake
    q, k, v, ck, cv, m = _attn_case(bad, "kv")
    out = attention_xformers(q, k, v, m)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, attention_ref(q, ck, cv, m), atol=2e-5, rtol=2e-5)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("Lq,Lk", [(9, 21), (21, 21), (25, 21), (1, 21)])
def test_attention_xformers_wrapper_causal_is_bottom_right(monkeypatch, Lq, Lk):
    # The wrapper builds the causal bias itself (bottom-right, ANDed with padding): its output
    # under the stand-in equals the reference's, queries with no key included (zeros).
    fake = _FakeXops()
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    sys.modules["xformers"].ops = fake
    q, k, v, ck, cv, m = _attn_case(NAN, "kv")
    q = torch.randn(q.shape[0], q.shape[1], Lq, q.shape[3])
    out = attention_xformers(q, k, v, m, causal=True)
    assert torch.isfinite(out).all()
    ref = attention_ref(q, ck, cv, m, causal=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    out = attention_xformers(q, ck, cv, None, causal=True)
    torch.testing.assert_close(out, attention_ref(q, ck, cv, causal=True), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# attention: empty inputs


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 2, 5, 0), (0, 2, 5, 8), (2, 0, 5, 8), (2, 2, 0, 8)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_empty_output(backend, shape, masked, causal):
    """Head dim 0 used to raise ZeroDivisionError (the default scale 1/sqrt(D))."""
    B, H, _Lq, D = shape
    q = torch.randn(shape, requires_grad=True)
    k = torch.randn(B, H, 6, D, requires_grad=True)
    v = torch.randn(B, H, 6, D, requires_grad=True)
    m = torch.rand(B, 6) > 0.3 if masked else None
    out = attention(q, k, v, key_padding_mask=m, causal=causal, backend=backend)
    assert out.shape == shape and out.dtype == q.dtype
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, x in ((dq, q), (dk, k), (dv, v)):
        assert g is None or (g.shape == x.shape and (g == 0).all())


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_no_keys_gives_zeros(backend, causal):
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8)
    m = torch.zeros(2, 0, dtype=torch.bool)
    out = attention(q, k, v, key_padding_mask=m, causal=causal, backend=backend)
    assert out.shape == q.shape and (out == 0).all()


def test_attention_unavailable_backend_still_refused_for_empty_input():
    if why_unavailable("attention", "cuda", "cpu") is None:
        pytest.skip("cuda backend runs on CPU tensors?")
    q = torch.randn(2, 2, 5, 0)
    with pytest.raises(RuntimeError, match="cuda"):
        attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_attention_non_tensor_argument_is_a_type_error(name):
    args = {n: torch.randn(1, 1, 2, 4) for n in "qkv"}
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=f"attention: {name} must be a tensor, got list"):
        attention(args["q"], args["k"], args["v"])


# ---------------------------------------------------------------------------------------------
# contrastive_loss

CON_BACKENDS = _runnable("contrastive", ["eager", "triton"])


@pytest.mark.parametrize("backend", CON_BACKENDS)
def test_contrastive_empty_batch_is_a_value_error(backend):
    """It used to give NaN (eager) and ZeroDivisionError (triton)."""
    x = torch.randn(0, 8, requires_grad=True)
    with pytest.raises(ValueError, match="0 rows"):
        contrastive_loss(x, torch.randn(0, 8), torch.tensor(10.0), backend=backend)


@pytest.mark.parametrize("backend", CON_BACKENDS)
def test_contrastive_zero_feature_dim_is_log_b(backend):
    loss = contrastive_loss(
        torch.randn(4, 0), torch.randn(4, 0), torch.tensor(10.0), backend=backend
    )
    torch.testing.assert_close(loss, torch.tensor(4.0).log())


@pytest.mark.parametrize(
    "name", ["image_feat", "text_feat", "image_ids", "teacher_image_feat", "teacher_text_feat"]
)
def test_contrastive_non_tensor_argument_is_a_type_error(name):
    kw = dict(
        image_feat=torch.randn(3, 4),
        text_feat=torch.randn(3, 4),
        image_ids=torch.arange(3),
        teacher_image_feat=torch.randn(3, 4),
        teacher_text_feat=torch.randn(3, 4),
    )
    kw[name] = kw[name].tolist()
    with pytest.raises(TypeError, match=f"contrastive_loss: {name} must be a tensor"):
        contrastive_loss(
            kw.pop("image_feat"), kw.pop("text_feat"), torch.tensor(10.0), distill_alpha=0.5, **kw
        )


# ---------------------------------------------------------------------------------------------
# The same contracts on a GPU (the lent GPU machine): the CUDA kernels and Triton compiled.


def _need_gpu(op, backend):
    why = why_unavailable(op, backend, "cuda")
    if why is not None:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "cuda", "triton"])
@pytest.mark.parametrize("case", sorted(_BAD_ROWS))
def test_distill_kl_non_distribution_row_is_nan_gpu(backend, case):
    _need_gpu("distill_kl", backend)
    s, t = (x.cuda() for x in _kl_inputs(case, cols=5000))
    x = s.clone().requires_grad_()
    out = distill_kl(x, t, reduction="none", backend=backend)
    out.sum().backward()
    assert out[1].isnan() and x.grad[1].isnan().all()
    torch.testing.assert_close(
        out[[0, 2]], distill_kl_ref(s[[0, 2]], t[[0, 2]], 1.0, "none"), atol=1e-4, rtol=1e-4
    )
    empty = torch.randn(0, 7, device="cuda", requires_grad=True)
    assert distill_kl(empty, empty.detach(), backend=backend).item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton", "cuda", "xformers"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_attention_masked_keys_are_never_read_gpu(backend, where):
    _need_gpu("attention", backend)
    q, k, v, ck, cv, m = (x.cuda() for x in _attn_case(NAN, where))
    do = torch.randn(q.shape, device="cuda")
    got = _attn_run(backend, q, k, v, m, do)
    want = _attn_run("eager", q, ck, cv, m, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{backend}: non-finite {name}"
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)
    head0 = torch.randn(2, 2, 5, 0, device="cuda", requires_grad=True)
    assert attention(head0, head0, head0, backend=backend).shape == (2, 2, 5, 0)
