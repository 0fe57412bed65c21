"""Fused GCPR contrastive loss (Triton; under the interpreter on CPU) against the eager reference:
loss, gradients of image / text features and logit_scale, hard negatives, the sampler's law.

CPU cases run fp32 through TRITON_INTERPRET=1 (tl.dot on bf16 is wrong in the interpreter), with
small d to keep the interpreter cheap; fp16/bf16 run only on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from r2d2.kernels import contrastive as C
from r2d2.kernels.dispatch import BackendUnavailable, why_unavailable

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
triton_ok = why_unavailable("contrastive", "triton", DEV) is None
needs_triton = pytest.mark.skipif(not triton_ok, reason="triton cannot run here")

# (loss atol, grad atol, rtol) per dtype. Low precision: the kernels round the features once
# (exactly like the inputs) and accumulate in fp32, so errors come from the tile order only;
# compared against the fp32 reference evaluated on the same rounded inputs.
TOL = {torch.float32: (2e-5, 2e-5, 1e-4), torch.float16: (2e-3, 2e-3, 2e-2),
       torch.bfloat16: (1e-2, 1e-2, 5e-2)}


def _feats(b, d, dtype=torch.float32, device=DEV):
    return F.normalize(torch.randn(b, d, device=device), dim=1).to(dtype)


def _inputs(b, d, *, ids, alpha, scale, dtype=torch.float32, device=DEV):
    img = _feats(b, d, dtype, device).requires_grad_()
    txt = _feats(b, d, dtype, device).requires_grad_()
    s = torch.tensor(float(scale), device=device, requires_grad=True)
    kw = dict(distill_alpha=alpha)
    if ids == "repeated":
        # Several captions per image and some ids that occur once.
        kw["image_ids"] = torch.randint(0, max(1, b // 3), (b,), device=device)
    if alpha > 0:
        kw["teacher_image_feat"] = _feats(b, d, dtype, device)
        kw["teacher_text_feat"] = _feats(b, d, dtype, device)
    return img, txt, s, kw


def _loss_and_grads(img, txt, s, kw, backend, **extra):
    out = C.contrastive_loss(img, txt, s, backend=backend, **kw, **extra)
    loss = out.loss if isinstance(out, C.ContrastiveOutput) else out
    grads = torch.autograd.grad(loss, [img, txt, s])
    return out, loss.detach(), grads


def _compare(img, txt, s, kw, dtype=torch.float32, backend="triton"):
    # With one row and one column the loss is 0 and so are its gradients; otherwise a zero
    # reference gradient would make the comparison vacuous.
    nonzero = img.shape[0] > 1
    la, ga, rt = TOL[dtype]
    _, l_ref, g_ref = _loss_and_grads(img, txt, s, kw, "eager")
    _, l_tri, g_tri = _loss_and_grads(img, txt, s, kw, backend)
    assert torch.isfinite(l_tri)
    torch.testing.assert_close(l_tri.float(), l_ref.float(), atol=la, rtol=rt)
    for name, a, b in zip(("image_feat", "text_feat", "logit_scale"), g_tri, g_ref):
        assert a.dtype == b.dtype, name
        assert not nonzero or b.abs().max() > 0, f"zero reference gradient of {name}: vacuous"
        torch.testing.assert_close(a.float(), b.float(), atol=ga, rtol=rt, msg=name)


_COMBOS = [("diag", 0.0, 10.0), ("repeated", 0.0, 100.0), ("repeated", 0.4, 30.0),
           ("diag", 0.4, 100.0)]


@needs_triton
@pytest.mark.parametrize("b,ids,alpha,scale", [(b, *c) for b in (1, 3, 37) for c in _COMBOS]
                         # b = 257 (8+ tiles, ragged) only in the hardest case: interpreter cost.
                         + [(257, "repeated", 0.4, 100.0)])
def test_matches_reference_fp32(b, ids, alpha, scale):
    img, txt, s, kw = _inputs(b, 16, ids=ids, alpha=alpha, scale=scale)
    _compare(img, txt, s, kw)


@needs_triton
def test_multiple_feature_chunks_and_tiles():
    """d larger than BLOCK_K / BLOCK_D and b not a multiple of the tiles."""
    from r2d2.kernels import contrastive_dist, contrastive_triton

    img, txt, s, kw = _inputs(21, 40, ids="repeated", alpha=0.4, scale=50.0)
    tiles = contrastive_triton.Tiles(block_r=16, block_c=16, block_k=16, block_d=16)
    loss, _, _ = contrastive_dist.fused_contrastive(
        contrastive_triton, img, txt, s, group=None, keys=(0, 0), neg=False, mode="gather",
        tiles=tiles, **{k: kw.get(k) for k in ("image_ids", "teacher_image_feat",
                                               "teacher_text_feat")}, distill_alpha=0.4)
    g = torch.autograd.grad(loss, [img, txt, s])
    _, l_ref, g_ref = _loss_and_grads(img, txt, s, kw, "eager")
    torch.testing.assert_close(loss.detach(), l_ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@needs_triton
def test_row_state_is_poisoned_and_split_columns_equal_one_pass():
    """Rows start at -inf / -1 (an unwritten row gives a non-finite loss or a -1 negative), and
    feeding the columns in blocks (ring mode) gives the state of one pass over all of them."""
    from r2d2.kernels import contrastive_triton as K

    b, n, d = 37, 45, 16
    q, k, tq, tk = _feats(b, d), _feats(n, d), _feats(b, d), _feats(n, d)
    rid = torch.randint(0, 9, (b,))
    cid = torch.randint(0, 9, (n,))
    s = torch.tensor([20.0])
    key = C.seed_key(5, 0)
    one = K.RowState.empty(b, q.device)
    K.forward_block(one, q, k, tq, tk, rid, cid, s, row_off=0, col_off=0, key=key, neg=True,
                    tiles=K.Tiles())
    split = K.RowState.empty(b, q.device)
    for c0, c1 in ((0, 7), (7, 40), (40, 45)):
        K.forward_block(split, q, k[c0:c1].contiguous(), tq, tk[c0:c1].contiguous(), rid,
                        cid[c0:c1].contiguous(), s, row_off=0, col_off=c0, key=key, neg=True,
                        tiles=K.Tiles())
    logits = 20.0 * q @ k.t()
    torch.testing.assert_close(one.lse(), torch.logsumexp(logits, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.lse(), one.lse(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.tlse(), torch.logsumexp(20.0 * tq @ tk.t(), 1), atol=1e-5,
                               rtol=1e-5)
    same = rid[:, None] == cid[None, :]
    torch.testing.assert_close(split.cnt, same.sum(1).float())
    torch.testing.assert_close(split.hs, (logits * same).sum(1), atol=1e-4, rtol=1e-5)
    ref_neg = C.sample_negatives_ref(logits, rid, cid, seed=5, stream=0)
    assert torch.equal(one.gi, ref_neg) and torch.equal(split.gi, ref_neg)


@needs_triton
def test_alpha_zero_ignores_teacher():
    img, txt, s, kw = _inputs(19, 16, ids="repeated", alpha=0.4, scale=20.0)
    kw["distill_alpha"] = 0.0
    l0 = C.contrastive_loss(img, txt, s, backend="triton", **kw)
    l1 = C.contrastive_loss(img, txt, s, backend="triton", image_ids=kw["image_ids"])
    torch.testing.assert_close(l0, l1)


@needs_triton
@pytest.mark.parametrize("ids", ["diag", "repeated", "all_same"])
def test_negatives_equal_reference_and_exclude_same_id(ids):
    b = 40
    img, txt, s, kw = _inputs(b, 16, ids="repeated" if ids == "repeated" else "diag",
                              alpha=0.4, scale=30.0)
    if ids == "all_same":
        kw["image_ids"] = torch.zeros(b, dtype=torch.long, device=DEV)
    ref = C.contrastive_loss(img, txt, s, backend="eager", return_negatives=True, seed=11, **kw)
    tri = C.contrastive_loss(img, txt, s, backend="triton", return_negatives=True, seed=11, **kw)
    again = C.contrastive_loss(img, txt, s, backend="triton", return_negatives=True, seed=11, **kw)
    other = C.contrastive_loss(img, txt, s, backend="triton", return_negatives=True, seed=12, **kw)
    torch.testing.assert_close(tri.loss, ref.loss, atol=2e-5, rtol=1e-4)
    ids_all = kw.get("image_ids", torch.arange(b, device=DEV))
    for name in ("neg_text_for_image", "neg_image_for_text"):
        t, r = getattr(tri, name), getattr(ref, name)
        assert torch.equal(t, r), name
        assert torch.equal(t, getattr(again, name)), f"{name} not reproducible"
        if ids == "all_same":
            assert (t == -1).all()
            continue
        assert (t >= 0).all() and (t < b).all()
        assert not (ids_all[t] == ids_all).any(), f"{name} returned a same-id column"
    if ids != "all_same":
        assert not torch.equal(other.neg_text_for_image, tri.neg_text_for_image)


def _chi_square_pvalue(draws, probs):
    from scipy.stats import chisquare

    counts = torch.bincount(draws, minlength=len(probs)).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a column of zero probability (a same-id column)"
    return chisquare(counts[keep].numpy(), (probs[keep] * len(draws)).numpy()).pvalue


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_triton)])
def test_sampler_law_is_softmax_without_same_ids(backend):
    """Every row has the same logits and ids but its own noise (rows are distinct global
    indices), so the rows are independent draws from one distribution."""
    n = 9
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, 1.2, -1.0, 0.7, 1.5])
    col_ids = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 3])
    row_id = 3                                                   # columns 3 and 8 are positives
    R = 20000 if backend == "eager" else 2048
    if backend == "eager":
        draws = C.sample_negatives_ref(logits.expand(R, n), torch.full((R,), row_id), col_ids,
                                       seed=123)
    else:
        from r2d2.kernels import contrastive_triton as K

        # Unit rows / columns with q.k = logit: q = e_0 * 1, k_c = logit_c * e_0 (scale 1).
        q = torch.zeros(R, 16)
        q[:, 0] = 1.0
        k = torch.zeros(n, 16)
        k[:, 0] = logits
        st = K.RowState.empty(R, q.device)
        K.forward_block(st, q, k, None, None, torch.full((R,), row_id), col_ids,
                        torch.tensor([1.0]), row_off=0, col_off=0, key=C.seed_key(123, 0),
                        neg=True, tiles=K.Tiles())
        draws = st.gi
    probs = torch.softmax(logits.double().masked_fill(col_ids == row_id, float("-inf")), 0)
    assert _chi_square_pvalue(draws, probs) > 1e-3


def test_bad_inputs_name_the_argument():
    f = _feats(4, 8)
    s = torch.tensor(10.0)
    with pytest.raises(ValueError, match="mode"):
        C.contrastive_loss(f, f, s, mode="tree")
    with pytest.raises(ValueError, match="image_ids"):
        C.contrastive_loss(f, f, s, image_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher"):
        C.contrastive_loss(f, f, s, distill_alpha=0.5)
    if triton_ok:
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            C.contrastive_loss(f.double(), f.double(), s, backend="triton")
    with pytest.raises(BackendUnavailable):
        C.contrastive_loss(f, f, s, backend="sdpa")


def _gpu_backend(backend):
    reason = why_unavailable("contrastive", backend, "cuda")
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on this GPU machine: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,d", [(1, 64), (257, 100), (1000, 768)])
def test_gpu_matches_reference(backend, dtype, b, d):
    _gpu_backend(backend)
    img, txt, s, kw = _inputs(b, d, ids="repeated", alpha=0.4, scale=100.0, dtype=dtype,
                              device="cuda")
    _compare(img, txt, s, kw, dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_negatives(backend):
    """Negatives equal the reference's (fp32, so the logits agree to ~1e-6 and the Gumbel-max
    argmax with them) and never share the row's id; no-teacher path too."""
    _gpu_backend(backend)
    b = 300
    img, txt, s, kw = _inputs(b, 64, ids="repeated", alpha=0.0, scale=50.0, device="cuda")
    ref = C.contrastive_loss(img, txt, s, backend="eager", return_negatives=True, seed=4, **kw)
    got = C.contrastive_loss(img, txt, s, backend=backend, return_negatives=True, seed=4, **kw)
    torch.testing.assert_close(got.loss, ref.loss, atol=2e-5, rtol=1e-4)
    ids = kw["image_ids"]
    for name in ("neg_text_for_image", "neg_image_for_text"):
        t = getattr(got, name)
        assert not (ids[t] == ids).any(), name
        # Allow a rare near-tie to resolve differently under a different summation order.
        assert (t == getattr(ref, name)).float().mean() > 0.99, name
