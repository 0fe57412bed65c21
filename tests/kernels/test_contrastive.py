"""Fused GCPR contrastive loss (Triton; under the interpreter on CPU) against the eager reference:
loss, gradients of image / text features and logit_scale, hard negatives, the sampler's law, the
Gumbel noise, fp16 gradients at large B, and that no b x B tensor is ever allocated.

CPU cases run through TRITON_INTERPRET=1 with small tiles (16) so that small b and B still cover
several ragged tiles, several programs (the persistent grid and its column-partial slots) and
the backward splits. fp32 on CPU; fp16 too (bf16 tl.dot is wrong in the interpreter, so bf16 runs
on a GPU only). GPU cases are marked ``gpu``."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from r2d2.kernels import contrastive as C
from r2d2.kernels.contrastive import reference as CR
from r2d2.kernels.dispatch import BackendUnavailable, why_unavailable

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
triton_ok = why_unavailable("contrastive", "triton", DEV) is None
needs_triton = pytest.mark.skipif(not triton_ok, reason="triton cannot run here")

# fp32 (loss atol, grad atol, rtol): the kernels differ from the reference by summation order only.
TOL32 = (2e-5, 2e-5, 1e-4)


def _tiles(**kw):
    from r2d2.kernels.contrastive import triton as K

    if HAS_CUDA:
        return K.Tiles(**kw)
    base = dict(block_r=16, block_c=16, block_k=16, block_d=16, programs=3)
    base.update(kw)
    return K.Tiles(**base)


def _feats(b, d, dtype=torch.float32, device=DEV, gen=None):
    return F.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).to(dtype)


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


def _fused(img, txt, s, kw, tiles, *, neg=False, seed=0, kern=None):
    from r2d2.kernels.contrastive import distributed as contrastive_dist
    from r2d2.kernels.contrastive import triton as contrastive_triton

    keys = (C.seed_key(seed, 0), C.seed_key(seed, 1)) if neg else (0, 0)
    return contrastive_dist.fused_contrastive(
        kern or contrastive_triton,
        img,
        txt,
        s,
        image_ids=kw.get("image_ids"),
        teacher_image_feat=kw.get("teacher_image_feat"),
        teacher_text_feat=kw.get("teacher_text_feat"),
        distill_alpha=kw.get("distill_alpha", 0.0),
        group=None,
        keys=keys,
        neg=neg,
        mode="gather",
        tiles=tiles,
    )


def _ref(img, txt, s, kw, **extra):
    out = C.contrastive_loss(img, txt, s, backend="eager", **kw, **extra)
    loss = out.loss if isinstance(out, C.ContrastiveOutput) else out
    return out, loss.detach(), torch.autograd.grad(loss, [img, txt, s])


def _assert_grads(got, ref, tol=TOL32, nonzero=True):
    _la, ga, rt = tol
    for name, a, b in zip(("image_feat", "text_feat", "logit_scale"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # A zero reference gradient would make the comparison vacuous (b = 1: loss 0).
        assert not nonzero or b.abs().max() > 0, f"zero reference gradient of {name}"
        torch.testing.assert_close(a.float(), b.float(), atol=ga, rtol=rt, msg=name)


def _compare(img, txt, s, kw, tiles):
    _, l_ref, g_ref = _ref(img, txt, s, kw)
    loss, _, _ = _fused(img, txt, s, kw, tiles)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), l_ref, atol=TOL32[0], rtol=TOL32[2])
    _assert_grads(torch.autograd.grad(loss, [img, txt, s]), g_ref, nonzero=img.shape[0] > 1)


_COMBOS = [
    ("diag", 0.0, 1.0),
    ("repeated", 0.0, 100.0),
    ("repeated", 0.4, 1.0),
    ("diag", 0.4, 100.0),
    ("repeated", 0.4, 14.0),
]


@needs_triton
@pytest.mark.parametrize("b", [1, 3, 37])
@pytest.mark.parametrize("ids,alpha,scale", _COMBOS)
def test_matches_reference_fp32(b, ids, alpha, scale):
    img, txt, s, kw = _inputs(b, 24, ids=ids, alpha=alpha, scale=scale)
    _compare(img, txt, s, kw, _tiles())


@needs_triton
@pytest.mark.parametrize(
    "ids,alpha,scale", [("repeated", 0.0, 1.0), ("repeated", 0.4, 100.0), ("diag", 0.4, 14.0)]
)
def test_matches_reference_b257(ids, alpha, scale):
    """b = B = 257: 5 ragged tiles of 64 each way (the interpreter's cost grows with the tiles)."""
    img, txt, s, kw = _inputs(257, 16, ids=ids, alpha=alpha, scale=scale)
    _compare(img, txt, s, kw, _tiles(block_r=64, block_c=64, programs=2))


@needs_triton
@pytest.mark.parametrize(
    "programs,budget", [(1, 256 << 20), (2, 256 << 20), (7, 256 << 20), (7, 2000)]
)
def test_grid_plans_and_poisoned_buffers(programs, budget, monkeypatch):
    """Every program count / column split / backward split (a tiny budget forces one slot and
    many column splits) gives the reference, with every buffer the kernels must write starting
    as NaN; d = 40 > block_d exercises the chunked gradient read-modify-write."""
    from r2d2.kernels.contrastive import distributed as contrastive_dist

    monkeypatch.setattr(contrastive_dist, "POISON", True)
    img, txt, s, kw = _inputs(45, 40, ids="repeated", alpha=0.4, scale=50.0)
    tiles = _tiles(programs=programs, budget_bytes=budget)
    plan = contrastive_dist.fwd_plan(45, 45, tiles.resolved(40, img.device), True, True)[:2]
    if not HAS_CUDA:  # 3 x 3 tiles of 16; a 2000-byte budget fits one 45-column slot
        assert (
            plan
            == {
                (1, 256 << 20): (1, 1),
                (2, 256 << 20): (2, 1),
                (7, 256 << 20): (3, 3),
                (7, 2000): (1, 1),
            }[(programs, budget)]
        )
    _compare(img, txt, s, kw, tiles)
    out = _fused(img, txt, s, kw, tiles, neg=True, seed=9)
    ref = C.contrastive_loss(img, txt, s, backend="eager", return_negatives=True, seed=9, **kw)
    assert torch.equal(out[1], ref.neg_text_for_image)
    assert torch.equal(out[2], ref.neg_image_for_text)


@needs_triton
def test_split_columns_merge_to_one_pass(monkeypatch):
    """Feeding the columns in blocks (what a ring hop does) and merging the states gives the
    state of one pass; rows and columns both checked against torch, buffers poisoned."""
    from r2d2.kernels.contrastive import distributed as CD
    from r2d2.kernels.contrastive import triton as K

    monkeypatch.setattr(CD, "POISON", True)
    b, n, d = 37, 45, 16
    q, k, tq, tk = _feats(b, d), _feats(n, d), _feats(b, d), _feats(n, d)
    rid, cid = torch.randint(0, 9, (b,), device=DEV), torch.randint(0, 9, (n,), device=DEV)
    s = torch.tensor([20.0], device=DEV)
    keys = (C.seed_key(5, 0), C.seed_key(5, 1))
    tiles = _tiles()

    def state(m):
        return CD.State.empty(m, True, True, q.device)

    rows1, cols1 = state(b), state(n)
    CD.forward_block(
        K,
        tiles,
        q,
        k,
        tq,
        tk,
        rid,
        cid,
        s,
        row_off=0,
        col_off=0,
        keys=keys,
        neg=True,
        rows=rows1,
        rows_init=True,
        cols=cols1,
        cols_init=True,
    )
    rows2, cols2 = state(b), state(n)
    for c0, c1 in ((0, 7), (7, 40), (40, 45)):
        part = state(c1 - c0)
        CD.forward_block(
            K,
            tiles,
            q,
            k[c0:c1].contiguous(),
            tq,
            tk[c0:c1].contiguous(),
            rid,
            cid[c0:c1].contiguous(),
            s,
            row_off=0,
            col_off=c0,
            keys=keys,
            neg=True,
            rows=rows2,
            rows_init=c0 == 0,
            cols=part,
            cols_init=True,
        )
        cols2.f[:, c0:c1], cols2.gi[c0:c1] = part.f, part.gi
    logits, tlog = 20.0 * q @ k.t(), 20.0 * tq @ tk.t()
    same = rid[:, None] == cid[None, :]
    for st, lg, tg, sm, dim in (
        (rows1, logits, tlog, same, 1),
        (cols1, logits.t(), tlog.t(), same.t(), 1),
    ):
        torch.testing.assert_close(st.lse(), torch.logsumexp(lg, dim), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.tlse(), torch.logsumexp(tg, dim), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.f[3], sm.sum(1).float())
        torch.testing.assert_close(st.f[2], (lg * sm).sum(1), atol=1e-4, rtol=1e-5)
        w = torch.softmax(tg, 1)
        torch.testing.assert_close(st.f[6] / st.f[5], (w * lg).sum(1), atol=1e-4, rtol=1e-5)
    for a, b_ in ((rows2, rows1), (cols2, cols1)):
        torch.testing.assert_close(a.f, b_.f, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.gi, b_.gi)
    assert torch.equal(rows1.negatives(), C.sample_negatives_ref(logits, rid, cid, seed=5))
    assert torch.equal(
        cols1.negatives(), C.sample_negatives_ref(logits.t(), cid, rid, seed=5, stream=1)
    )


@needs_triton
def test_alpha_zero_weights_the_teacher_out_in_the_kernels():
    """The kernels given teacher features with alpha = 0 compute the teacher statistics and must
    weight them out: loss and gradients equal the no-teacher ones (and differ at alpha = 0.4)."""
    from r2d2.kernels.contrastive import distributed as CD
    from r2d2.kernels.contrastive import triton as K

    img, txt, s, kw = _inputs(19, 16, ids="repeated", alpha=0.4, scale=20.0)

    def run(alpha, teacher):
        tI = kw["teacher_image_feat"] if teacher else None
        tT = kw["teacher_text_feat"] if teacher else None
        c = CD._Ctx(K, _tiles(), kw["image_ids"], tI, tT, alpha, (0, 0), False, 0, 1, None)
        loss = CD.FusedGather.apply(img, txt, s, c)[0]
        return [loss.detach(), *torch.autograd.grad(loss, [img, txt, s])]

    with_t, without, soft = run(0.0, True), run(0.0, False), run(0.4, True)
    for a, b in zip(with_t, without):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (soft[0] - without[0]).abs() > 1e-3
    _, l_ref, _ = _ref(img, txt, s, kw)
    torch.testing.assert_close(soft[0], l_ref, atol=TOL32[0], rtol=TOL32[2])


@needs_triton
def test_alpha_zero_api_never_reads_the_teacher():
    img, txt, s, kw = _inputs(19, 16, ids="repeated", alpha=0.0, scale=20.0)
    nan = torch.full_like(img, float("nan")).detach()
    a = C.contrastive_loss(
        img, txt, s, backend="triton", teacher_image_feat=nan, teacher_text_feat=nan, **kw
    )
    b = C.contrastive_loss(img, txt, s, backend="triton", **kw)
    assert torch.isfinite(a)
    torch.testing.assert_close(a, b)


@needs_triton
@pytest.mark.parametrize("ids", ["diag", "repeated", "all_same"])
def test_negatives_equal_reference_and_exclude_same_id(ids):
    b = 40
    img, txt, s, kw = _inputs(
        b, 16, ids="repeated" if ids == "repeated" else "diag", alpha=0.4, scale=30.0
    )
    if ids == "all_same":
        kw["image_ids"] = torch.zeros(b, dtype=torch.long, device=DEV)
    ref = C.contrastive_loss(img, txt, s, backend="eager", return_negatives=True, seed=11, **kw)
    tri = C.contrastive_loss(img, txt, s, backend="triton", return_negatives=True, seed=11, **kw)
    again = _fused(img, txt, s, kw, _tiles(programs=1), neg=True, seed=11)
    other = C.contrastive_loss(img, txt, s, backend="triton", return_negatives=True, seed=12, **kw)
    torch.testing.assert_close(tri.loss, ref.loss, atol=2e-5, rtol=1e-4)
    ids_all = kw.get("image_ids", torch.arange(b, device=DEV))
    for i, name in enumerate(("neg_text_for_image", "neg_image_for_text")):
        t, r = getattr(tri, name), getattr(ref, name)
        assert torch.equal(t, r), name
        assert torch.equal(t, again[1 + i]), f"{name} depends on the tiling"
        if ids == "all_same":
            assert (t == -1).all()
            continue
        assert (t >= 0).all() and (t < b).all()
        assert not (ids_all[t] == ids_all).any(), f"{name} returned a same-id column"
        assert not torch.equal(getattr(other, name), t), f"{name} ignores the seed"


def _chi_square_pvalue(draws, probs):
    from scipy.stats import chisquare

    counts = torch.bincount(draws.cpu(), minlength=len(probs)).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a column of zero probability (a same-id column)"
    return chisquare(counts[keep].numpy(), (probs[keep] * len(draws)).numpy()).pvalue


_LOGITS = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, 1.2, -1.0, 0.7, 1.5])
_IDS = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 3])  # partner id 3: entries 3 and 8 are positives


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_sampler_law_is_softmax_without_same_ids(backend, direction):
    """R rows with the same logits and id but their own noise (distinct global indices) are R
    independent draws from one law: softmax over the other-id partners (fixed seed)."""
    n, R = len(_LOGITS), (20000 if backend == "eager" else 2048)
    probs = torch.softmax(_LOGITS.double().masked_fill(_IDS == 3, float("-inf")), 0)
    if backend == "eager":
        draws = C.sample_negatives_ref(
            _LOGITS.expand(R, n),
            torch.full((R,), 3),
            _IDS,
            seed=123,
            stream=0 if direction == "i2t" else 1,
        )
        assert _chi_square_pvalue(draws, probs) > 1e-3
        return
    from r2d2.kernels.contrastive import distributed as CD
    from r2d2.kernels.contrastive import triton as K

    # Unit vectors with q . k = logit (scale 1): the R copies are the images (i2t: each draws a
    # text) or the texts (t2i: each text draws an image).
    many = torch.zeros(R, 16, device=DEV)
    many[:, 0] = 1.0
    few = torch.zeros(n, 16, device=DEV)
    few[:, 0] = _LOGITS
    many_ids, few_ids = torch.full((R,), 3, device=DEV), _IDS.to(DEV)
    q, k, rid, cid = (
        (many, few, many_ids, few_ids) if direction == "i2t" else (few, many, few_ids, many_ids)
    )
    rows = CD.State.empty(q.shape[0], False, True, q.device)
    cols = CD.State.empty(k.shape[0], False, True, q.device)
    CD.forward_block(
        K,
        _tiles(block_r=64, block_c=64),
        q,
        k,
        None,
        None,
        rid,
        cid,
        torch.tensor([1.0], device=DEV),
        row_off=0,
        col_off=0,
        keys=(C.seed_key(123, 0), C.seed_key(123, 1)),
        neg=True,
        rows=rows,
        rows_init=True,
        cols=cols,
        cols_init=True,
    )
    draws = (rows if direction == "i2t" else cols).negatives()
    assert _chi_square_pvalue(draws, probs) > 1e-3


# (key, row, column) whose hash has top 24 bits 2^24 - 1 and 0: the uniform's two ends. The first
# one made the former u = (k + 0.5) / 2^24, computed in fp32, round to 1 and the noise +inf.
_KEY = C.seed_key(0, 0)
_TOP, _BOTTOM = (0, 29842311), (0, 11206684)


def test_gumbel_noise_is_finite_at_the_extreme_hashes():
    ends = torch.tensor([0, 1, 2**23 - 1, 2**23, 2**24 - 2, 2**24 - 1])
    g = C.gumbel_from_bits(ends)
    u = (2 * ends.double() + 1) / 2**25
    exact = -torch.log(-torch.log1p(-(1 - u)))  # float64 truth
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), exact, atol=2e-6, rtol=1e-6)
    assert float((2**24 - 1) + 0.5) == 2**24 - 0.5 and torch.tensor(2**24 - 0.5).item() == 2**24, (
        "the fp32 rounding the old formula hit"
    )
    for (row, col), k in ((_TOP, 2**24 - 1), (_BOTTOM, 0)):
        h = CR._mix32(
            (CR._mix32(torch.tensor([[row]]) ^ _KEY) + CR._mul32(torch.tensor([[col]]), CR._GOLD))
            & CR._U32
        )
        assert int(h >> 8) == k
        noise = C.gumbel_noise(_KEY, torch.tensor([row]), torch.tensor([col]))
        assert torch.isfinite(noise).all() and -2.9 < noise.item() < 17.4
    # All 2^24 values: finite, monotone in k, within the stated bounds.
    g = C.gumbel_from_bits(torch.arange(2**24))
    assert torch.isfinite(g).all() and g.min() > -2.86 and g.max() < 17.33
    assert (g[1:] >= g[:-1]).all()


if triton_ok:
    import triton
    import triton.language as tl

    from r2d2.kernels.contrastive.triton import _gumbel_tl

    @triton.jit
    def _noise_kernel(out_ptr, rows_ptr, cols_ptr, key, N: tl.constexpr):
        i = tl.arange(0, N)
        g = _gumbel_tl(key, tl.load(rows_ptr + i)[:, None], tl.load(cols_ptr + i)[None, :])
        tl.store(out_ptr + i[:, None] * N + i[None, :], g)


@needs_triton
def test_triton_gumbel_equals_torch():
    rows = torch.randint(0, 2**31 - 1, (32,), dtype=torch.int32, device=DEV)
    cols = torch.randint(0, 2**31 - 1, (32,), dtype=torch.int32, device=DEV)
    rows[:2], cols[0], cols[1] = 0, _TOP[1], _BOTTOM[1]
    out = torch.empty(32, 32, device=DEV)
    _noise_kernel[(1,)](out, rows, cols, _KEY, N=32)
    ref = C.gumbel_noise(_KEY, rows.long(), cols.long())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=4e-6, rtol=1e-6)


@needs_triton
def test_fp16_gradients_do_not_underflow():
    """fp16 at a CLIP-like scale and B = 2048. Rounding dlogit = (p - tgt) / (2b) to fp16 (the
    former kernels) sends most entries into fp16's subnormals or to zero: 1.1e-3 relative dI
    error here under the interpreter (which keeps subnormals; a GPU flushes them: 13-27 %); the
    kernels round only the unscaled bracket: 2.2e-4. Checked against the fp32 reference on the
    same fp16 inputs, with flash-attention's rule too (<= 2x the error of eager fp16)."""
    b, d = 2048, 16
    g = torch.Generator(device=DEV).manual_seed(3)
    img = _feats(b, d, torch.float16, gen=g).requires_grad_()
    txt = _feats(b, d, torch.float16, gen=g).requires_grad_()
    s = torch.tensor(14.0, device=DEV, requires_grad=True)
    loss, _, _ = _fused(img, txt, s, {}, _tiles(block_r=512, block_c=512, programs=2))
    got = torch.autograd.grad(loss, [img, txt, s])
    up = [t.detach().float().requires_grad_() for t in (img, txt, s)]
    ref = torch.autograd.grad(C.contrastive_loss_ref(*up), up)
    lo = [t.detach().clone().requires_grad_() for t in (img, txt)]
    eager16 = torch.autograd.grad(
        C.contrastive_loss_ref(*lo, s.detach().half(), compute_dtype=torch.float16), lo
    )
    for name, a, r, e in zip(("image", "text"), got, ref, eager16):
        err, err_e = (a.float() - r).norm() / r.norm(), (e.float() - r).norm() / r.norm()
        assert err < 5e-4 and err <= 2 * err_e + 1e-4, f"{name}: {err:.2e} vs eager {err_e:.2e}"
    torch.testing.assert_close(got[2], ref[2], atol=1e-3, rtol=1e-3)


class _Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@needs_triton
def test_fused_path_never_allocates_b_by_B():
    b, d = 97, 16
    img, txt, s, kw = _inputs(b, d, ids="repeated", alpha=0.4, scale=10.0)
    sizes = {}
    for backend in ("eager", "triton"):
        with _Allocations() as log:
            out = C.contrastive_loss(
                img, txt, s, backend=backend, return_negatives=True, seed=1, **kw
            )
            torch.autograd.grad(out.loss, [img, txt, s])
        sizes[backend] = log.largest
    assert sizes["eager"] >= 4 * b * b, "the detector sees the eager logits"
    assert sizes["triton"] < 2 * b * b, f"a {sizes['triton']}-byte tensor: b x B in 16 bits?"


@pytest.mark.parametrize("programs,block_r", [(528, 16), (132 * 4, 64), (2, 16)])
def test_partial_statistics_stay_linear_in_b_plus_n(programs, block_r):
    """The forward's per-program partials (R x n column slots, C x b row slots) are capped by
    MAX_SLOTS, not by the row-block count, so they are O(b + n) and far below one 16-bit b x n
    matrix at every size (the CUDA plan, with its 16-row blocks, used to reach R = b / 16: more
    bytes than the logits it avoids at b = B = 4096). The plan needs no GPU to check."""
    from r2d2.kernels.contrastive import distributed as contrastive_dist
    from r2d2.kernels.contrastive.cuda import Geometry

    geo = Geometry(programs, 256 << 20, block_r=block_r)
    per = 4 * contrastive_dist.nfields(True, True) + 4
    for b, n in [(97, 97), (4096, 4096), (8192, 8192), (1024, 65536), (65536, 65536)]:
        R, Cs, tpc = contrastive_dist.fwd_plan(b, n, geo, True, True)
        assert R <= contrastive_dist.MAX_SLOTS and Cs <= contrastive_dist.MAX_SLOTS
        assert Cs * tpc * geo.block_c >= n  # the splits cover every column
        partial = (R * n + Cs * b) * per
        assert partial <= contrastive_dist.MAX_SLOTS * (b + n) * per
        if b >= 4096:
            assert partial < 0.3 * 2 * b * n, (b, n, R, Cs, partial)


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


# ------------------------------------------------------------------------------------ GPU
def _gpu_backend(backend):
    reason = why_unavailable("contrastive", backend, "cuda")
    if reason is not None:
        pytest.fail(f"backend {backend!r} unavailable on this GPU machine: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "b,d,ids,alpha,scale",
    [
        (1, 64, "diag", 0.0, 14.0),
        (257, 100, "repeated", 0.4, 100.0),
        (1000, 768, "repeated", 0.4, 14.0),
        (4099, 512, "diag", 0.0, 1.0),
    ],
)
def test_gpu_matches_reference(backend, dtype, b, d, ids, alpha, scale):
    """fp32: the reference's tolerance. fp16 / bf16, flash-attention's rule: error against the
    fp32 reference (on the same rounded inputs) <= 2x the error of plain PyTorch eager in that
    dtype + a small atol."""
    _gpu_backend(backend)
    img, txt, s, kw = _inputs(b, d, ids=ids, alpha=alpha, scale=scale, dtype=dtype, device="cuda")
    out = C.contrastive_loss(img, txt, s, backend=backend, **kw)
    got = [out.detach(), *torch.autograd.grad(out, [img, txt, s])]
    _, l_ref, g_ref = _ref(img, txt, s, kw)
    ref = [l_ref, *g_ref]
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], ref[0], atol=TOL32[0], rtol=TOL32[2])
        _assert_grads(got[1:], ref[1:], nonzero=b > 1)
        return
    lo = [t.detach().clone().requires_grad_() for t in (img, txt, s)]
    kw_lo = dict(kw, compute_dtype=dtype)
    l_lo = C.contrastive_loss_ref(*lo, **kw_lo)
    eager = [l_lo.detach(), *torch.autograd.grad(l_lo, lo)]
    for name, a, r, e in zip(("loss", "image", "text", "scale"), got, ref, eager):
        err = (a.float() - r.float()).abs().max()
        err_e = (e.float() - r.float()).abs().max()
        atol = 1e-5 * max(1.0, r.float().abs().max().item())
        assert err <= 2 * err_e + atol, f"{name}: {err:.3e} > 2 x eager {err_e:.3e} + {atol:.1e}"


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


@pytest.mark.gpu
def test_gpu_cuda_equals_triton_on_plans(monkeypatch):
    """The CUDA kernels on several grids (programs 1 / 5 / default, a tiny budget) against
    Triton's, fp32: same loss, gradients, negatives; buffers poisoned (every slot must be written)."""
    _gpu_backend("cuda")
    from r2d2.kernels.contrastive import cuda as KC
    from r2d2.kernels.contrastive import distributed as CD
    from r2d2.kernels.contrastive import triton as KT

    img, txt, s, kw = _inputs(333, 200, ids="repeated", alpha=0.4, scale=30.0, device="cuda")
    base = _fused(img, txt, s, kw, KT.Tiles(), neg=True, seed=2)
    g_base = torch.autograd.grad(base[0], [img, txt, s])
    monkeypatch.setattr(CD, "POISON", True)
    for tiles in (
        KC.Tiles(programs=1),
        KC.Tiles(programs=5),
        KC.Tiles(),
        KC.Tiles(budget_bytes=4096),
    ):
        out = _fused(img, txt, s, kw, tiles, neg=True, seed=2, kern=KC)
        torch.testing.assert_close(out[0], base[0], atol=2e-5, rtol=1e-5)
        _assert_grads(torch.autograd.grad(out[0], [img, txt, s]), g_base)
        for a, b in zip(out[1:], base[1:]):
            assert (a == b).float().mean() > 0.99


@pytest.mark.gpu
def test_gpu_cuda_ops_opcheck():
    """Schemas (mutation annotations), fake functions and dispatch of the compiled ops."""
    _gpu_backend("cuda")
    from r2d2.kernels.contrastive import distributed as CD

    b, n, d = 21, 70, 40
    dev = "cuda"
    q, k, tq, tk = (_feats(m, d, device=dev) for m in (b, n, b, n))
    rid, cid = torch.randint(0, 5, (b,), device=dev), torch.randint(0, 5, (n,), device=dev)
    s = torch.tensor([10.0], device=dev)
    rp = CD.State.empty((2, b), True, True, dev)
    cp = CD.State.empty((1, n), True, True, dev)
    ops = torch.ops.r2d2
    torch.library.opcheck(
        ops.contrastive_fwd.default,
        (q, k, tq, tk, rid, cid, s, rp.f, rp.gi, cp.f, cp.gi, 1, 0, 0, 5, 6, True),
    )
    ops.contrastive_fwd(q, k, tq, tk, rid, cid, s, rp.f, rp.gi, cp.f, cp.gi, 1, 0, 0, 5, 6, True)
    st = CD.State.empty(n, True, True, dev)
    torch.library.opcheck(
        ops.contrastive_merge.default, (st.f, st.gi, cp.f, cp.gi, True, True, True)
    )
    rstat, cstat = torch.rand(3, b, device=dev) + 5, torch.rand(3, n, device=dev) + 5
    coef, bco = torch.tensor([1.0, 0.01], device=dev), torch.ones(n, device=dev)
    dq, ds = torch.zeros(1, b, d, device=dev), torch.empty(2, device=dev)
    torch.library.opcheck(
        ops.contrastive_bwd_rows.default,
        (q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bco, 0.4, dq, ds, 5),
    )
    dk, dsc = torch.zeros(1, n, d, device=dev), torch.empty(1, n, device=dev)
    torch.library.opcheck(
        ops.contrastive_bwd_cols.default,
        (q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bco, 0.4, dk, dsc, 1),
    )


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("triton", marks=[needs_triton, pytest.mark.slow]),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ],
)
def test_merges_of_blocks_equal_one_pass(backend, monkeypatch):
    """The merges a ring hop runs (init=False): row states over column blocks, and a column state
    of one half of the rows merged with the other half's, equal one pass, buffers poisoned. A
    one-process gather only merges with init=True, so nothing else reaches these paths."""
    from r2d2.kernels.contrastive import distributed as CD

    if backend == "cuda":
        _gpu_backend("cuda")
        from r2d2.kernels.contrastive import cuda as K

        tiles, dev, (b, n, d) = K.Tiles(programs=4), "cuda", (37, 150, 70)
    else:
        from r2d2.kernels.contrastive import triton as K

        tiles, dev, (b, n, d) = _tiles(), DEV, (37, 70, 40)
    monkeypatch.setattr(CD, "POISON", True)
    q, k, tq, tk = (_feats(m, d, device=dev) for m in (b, n, b, n))
    rid, cid = torch.randint(0, 9, (b,), device=dev), torch.randint(0, 9, (n,), device=dev)
    s = torch.tensor([20.0], device=dev)
    keys = (C.seed_key(5, 0), C.seed_key(5, 1))

    def state(m):
        return CD.State.empty(m, True, True, dev)

    def fwd(qq, kk, tqq, tkk, rr, cc, row_off, col_off, rows, rows_init, cols):
        CD.forward_block(
            K,
            tiles,
            qq.contiguous(),
            kk.contiguous(),
            tqq.contiguous(),
            tkk.contiguous(),
            rr.contiguous(),
            cc.contiguous(),
            s,
            row_off=row_off,
            col_off=col_off,
            keys=keys,
            neg=True,
            rows=rows,
            rows_init=rows_init,
            cols=cols,
            cols_init=True,
        )

    rows1, cols1 = state(b), state(n)
    fwd(q, k, tq, tk, rid, cid, 0, 0, rows1, True, cols1)
    rows2 = state(b)
    cuts = (0, 7, n // 2, n)
    for c0, c1 in itertools.pairwise(cuts):
        fwd(q, k[c0:c1], tq, tk[c0:c1], rid, cid[c0:c1], 0, c0, rows2, c0 == 0, state(c1 - c0))
    cols2, other = state(n), state(n)
    fwd(q[:20], k, tq[:20], tk, rid[:20], cid, 0, 0, state(20), True, cols2)
    fwd(q[20:], k, tq[20:], tk, rid[20:], cid, 20, 0, state(b - 20), True, other)
    K.launch_merge(cols2, other.slots(), False, K.geometry(d, q.device, tiles))
    for got, ref in ((rows2, rows1), (cols2, cols1)):
        torch.testing.assert_close(got.f, ref.f, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.gi, ref.gi)
    logits = 20.0 * q @ k.t()
    assert torch.equal(rows1.negatives(), C.sample_negatives_ref(logits, rid, cid, seed=5))
    assert torch.equal(
        cols1.negatives(), C.sample_negatives_ref(logits.t(), cid, rid, seed=5, stream=1)
    )


@pytest.mark.gpu
def test_gpu_cuda_runs_on_the_current_stream():
    """A side stream's kernels do not wait for the default stream: a launch on the wrong stream
    would read img2 before the side stream has written it."""
    _gpu_backend("cuda")
    img, txt, s, _ = _inputs(2048, 256, ids="diag", alpha=0.0, scale=14.0, device="cuda")
    ref = C.contrastive_loss(img, txt, s, backend="cuda").detach()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy before img2 exists
        img2 = img.detach() * 1.0
        out = C.contrastive_loss(img2, txt.detach(), s.detach(), backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, ref)
