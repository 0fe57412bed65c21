"""GCPR contrastive loss, Triton kernels and launchers (math, API and modes in contrastive_dist.py).

One similarity per rank, ``S = s * Q K^T``: rows ``Q`` = local images ``[b, d]``, columns ``K`` =
texts ``[n, d]``. i2t is the softmax along a row, t2i the softmax along a column of the same S,
so one pass over the tiles serves both directions.

  forward   a persistent grid of R x C programs. Program (pr, pc) loops over the row blocks
            pr, pr + R, ... and, for each, over the column tiles of split pc. Per tile it
              - updates the row state of its rows in registers (online m / l, hs / cnt, teacher
                tm / tl / tw, Gumbel gv / gi), stored at the end of the row block into the row
                partial slot pc ([nf, C, b]);
              - merges the tile's column statistics over its rows into its own slot pr of the
                column partials ([nf, R, n]): a read-modify-write of memory no other program
                touches (no atomics), the first row block initialising it.
            ``_merge_kernel`` then folds the slots into the [nf, n] state (same merge rules).
            The t2i noise of (text j, image i) is gumbel_noise(key_t2i, row=j, col=i), the i2t
            noise of (image i, text j) gumbel_noise(key_i2t, row=i, col=j), with global indices.
  backward  dlogit_ij = cn * (a (p_ij - tgt_ij) + bcoef_j (p'_ij - tgt'_ij)), p / tgt the row
            softmax / targets, p' / tgt' the column ones; the bracket (|.| <= 2) is what is
            rounded to the feature dtype for the gradient dots (times 2^14 in fp16, whose
            exponent range is narrow; a power of two, exact), cn * s is applied to the fp32
            accumulators, so fp16 / bf16 gradients do not underflow at large B.
              rows kernel  (program: row block [x column split])   dI += s dlogit K, ds (i2t term)
              cols kernel  (program: column block [x row split])   dT += s dlogit^T Q, ds per column
            Each program computes each of its tiles' similarity once. With d <= BLOCK_D the
            gradient accumulator stays in registers; beyond, every tile adds into the program's
            own fp32 output rows chunk by chunk (L2-resident read-modify-write, no atomics).

FLOPs per step, in units of 2 b n d (x2 for the similarity terms with a teacher):
  forward 1 similarity (+1 teacher); backward 2 similarity recomputes (+2 teacher) and 2
  gradient GEMMs. Total 5 (8 with a teacher). The previous two-call design (one kernel call per
  direction, roles swapped) spent 2 (4) forward and 8 (12) backward: 10 (16).

Beyond the GEMMs: the forward takes 2 exponentials per logit (row and column softmax; +2 for
the teacher) and, with negatives, 2 Gumbel draws (a hash, a division, one or two logs); the
backward 2 (+2) exponentials per logit per kernel. At d <= 512 these special-function ops are of
the order of the tensor-core time, so the fused kernels are not purely GEMM-bound there.

fp32 inputs use IEEE fp32 dots (no TF32); fp16 / bf16 use tensor-core dots with fp32
accumulation. On CPU tensors this runs only under ``TRITON_INTERPRET=1`` (where bf16 tl.dot is
wrong: test bf16 on a GPU). Limits: B < 2^31 (int32 indices); the tile defaults (32 x 32, 4 warps
on a GPU, ``default_tiles``) are not autotuned: they are the largest that compile for sm_80 and
sm_90 without register spills, and were not timed on a GPU when written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from r2d2.kernels.dispatch import triton_interpret

_LP_SCALE_FP16 = 16384.0  # 2^14: |bracket| <= 2 stays below fp16's max (65504)


# The torch twin of this noise (same constants, same fp32 steps) is contrastive.gumbel_noise.
# Helpers are few and called once per tile: under TRITON_INTERPRET every call of a jit function
# re-patches triton.language (milliseconds), so small steps are written inline.
@triton.jit
def _gumbel_tl(key, grow, gcol):
    """Gumbel noise of (key, global row, global column), int32 index tensors broadcast to the
    tile; uint32 arithmetic wraps like the torch twin (lowbias32 hash, then gumbel_from_bits)."""
    x = grow.to(tl.uint32) ^ key.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    x = x + gcol.to(tl.uint32) * 0x9E3779B9
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    kk = (x >> 8).to(tl.int32)  # 24 random bits
    # u = (2k + 1) 2^-25 is exact in fp32 below 1/2; above, v = 1 - u is, and -log(u) =
    # 2 atanh(v / (2 - v)) by its series (never the log of a number near 1).
    u = (2 * kk + 1).to(tl.float32) * 2.9802322387695312e-08  # 2^-25
    v = (33554431 - 2 * kk).to(tl.float32) * 2.9802322387695312e-08  # (2^25 - 1 - 2k) 2^-25
    t = v / (2.0 - v)
    t2 = t * t
    p = 0.058823529411764705 * t2 + 0.06666666666666667
    p = p * t2 + 0.07692307692307693
    p = p * t2 + 0.09090909090909091
    p = p * t2 + 0.1111111111111111
    p = p * t2 + 0.14285714285714285
    p = p * t2 + 0.2
    p = p * t2 + 0.3333333333333333
    p = p * t2 + 1.0
    e = tl.where(kk >= 8388608, 2.0 * t * p, -tl.log(u))
    return -tl.log(e)


# ------------------------------------------------------------------------------------ tiles
@triton.jit
def _sims(
    q_ptr,
    k_ptr,
    tq_ptr,
    tk_ptr,
    rows,
    cols,
    rmask,
    cmask,
    D,
    HAS_TEACHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """fp32 ``(Q[rows] @ K[cols]^T, TQ[rows] @ TK[cols]^T)`` over the full feature dim, BLOCK_K
    at a time (the second is the first again without a teacher)."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    tacc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    rm = rmask[:, None]
    cm = cmask[:, None]
    ro = rows[:, None].to(tl.int64) * D
    co = cols[:, None].to(tl.int64) * D
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = (kk < D)[None, :]
        q = tl.load(q_ptr + ro + kk[None, :], mask=rm & km, other=0.0)
        k = tl.load(k_ptr + co + kk[None, :], mask=cm & km, other=0.0)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PREC)
        if HAS_TEACHER:
            q = tl.load(tq_ptr + ro + kk[None, :], mask=rm & km, other=0.0)
            k = tl.load(tk_ptr + co + kk[None, :], mask=cm & km, other=0.0)
            tacc = tl.dot(q, tl.trans(k), tacc, input_precision=PREC)
    if not HAS_TEACHER:
        tacc = acc
    return acc, tacc


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,  # [b, D] rows (images), [n, D] columns (texts); same dtype
    tq_ptr,
    tk_ptr,  # teacher rows / columns (unused unless HAS_TEACHER)
    rid_ptr,
    cid_ptr,  # [b], [n] int64 ids
    s_ptr,  # [1] fp32 scale
    rp_ptr,
    rgi_ptr,  # row partials [nf, C, b] fp32, [C, b] int32 (written)
    cp_ptr,
    cgi_ptr,  # column partials [nf, R, n] fp32, [R, n] int32 (own slot RMW)
    b,
    n,
    D,
    TPC,
    row_off,
    col_off,
    key_r,
    key_c,
    HAS_TEACHER: tl.constexpr,
    NEG: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    R = tl.num_programs(0)
    C = tl.num_programs(1)
    nrb = tl.cdiv(b, BLOCK_R)
    nct = tl.cdiv(n, BLOCK_C)
    ct0 = pc * TPC
    ct1 = tl.minimum(ct0 + TPC, nct)
    s = tl.load(s_ptr).to(tl.float32)
    ninf = float("-inf")
    rfs = C.to(tl.int64) * b  # field strides of the partials
    cfs = R.to(tl.int64) * n
    GV: tl.constexpr = 7 if HAS_TEACHER else 4
    for rb in range(pr, nrb, R):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < b
        rid = tl.load(rid_ptr + rows, mask=rmask, other=0)
        m = tl.full([BLOCK_R], ninf, tl.float32)
        l_ = tl.zeros([BLOCK_R], tl.float32)
        hs = tl.zeros([BLOCK_R], tl.float32)
        cnt = tl.zeros([BLOCK_R], tl.float32)
        tm = tl.full([BLOCK_R], ninf, tl.float32)
        tls = tl.zeros([BLOCK_R], tl.float32)
        tw = tl.zeros([BLOCK_R], tl.float32)
        gv = tl.full([BLOCK_R], ninf, tl.float32)
        gi = tl.full([BLOCK_R], -1, tl.int32)
        for ct in range(ct0, ct1):
            cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = cols < n
            cid = tl.load(cid_ptr + cols, mask=cmask, other=0)
            same = (rid[:, None] == cid[None, :]) & rmask[:, None] & cmask[None, :]
            sim, tsim = _sims(
                q_ptr,
                k_ptr,
                tq_ptr,
                tk_ptr,
                rows,
                cols,
                rmask,
                cmask,
                D,
                HAS_TEACHER,
                BLOCK_R,
                BLOCK_C,
                BLOCK_K,
                PREC,
            )
            S = s * sim
            # Padded rows / columns load zeros, so S is finite everywhere; each direction masks
            # only the other direction's padding.
            xr = tl.where(cmask[None, :], S, ninf)
            xc = tl.where(rmask[:, None], S, ninf)
            m_new = tl.maximum(m, tl.max(xr, 1))
            l_ = l_ * tl.exp(m - m_new) + tl.sum(tl.exp(xr - m_new[:, None]), 1)
            m = m_new
            hs += tl.sum(tl.where(same, S, 0.0), 1)
            cnt += tl.sum(same.to(tl.float32), 1)
            co = pr.to(tl.int64) * n + cols
            ld = cmask & ((cols * 0 + rb) > pr)  # not this program's first row block
            cm = tl.load(cp_ptr + co, mask=ld, other=ninf)
            cl = tl.load(cp_ptr + cfs + co, mask=ld, other=0.0)
            chs = tl.load(cp_ptr + 2 * cfs + co, mask=ld, other=0.0)
            ccnt = tl.load(cp_ptr + 3 * cfs + co, mask=ld, other=0.0)
            cm_new = tl.maximum(cm, tl.max(xc, 0))
            cl = cl * tl.exp(cm - cm_new) + tl.sum(tl.exp(xc - cm_new[None, :]), 0)
            tl.store(cp_ptr + co, cm_new, mask=cmask)
            tl.store(cp_ptr + cfs + co, cl, mask=cmask)
            tl.store(cp_ptr + 2 * cfs + co, chs + tl.sum(tl.where(same, S, 0.0), 0), mask=cmask)
            tl.store(cp_ptr + 3 * cfs + co, ccnt + tl.sum(same.to(tl.float32), 0), mask=cmask)
            if HAS_TEACHER:
                tS = s * tsim
                txr = tl.where(cmask[None, :], tS, ninf)
                tm_new = tl.maximum(tm, tl.max(txr, 1))
                corr = tl.exp(tm - tm_new)
                pt = tl.exp(txr - tm_new[:, None])
                tls = tls * corr + tl.sum(pt, 1)
                tw = tw * corr + tl.sum(pt * S, 1)
                tm = tm_new
                ctm = tl.load(cp_ptr + 4 * cfs + co, mask=ld, other=ninf)
                ctl = tl.load(cp_ptr + 5 * cfs + co, mask=ld, other=0.0)
                ctw = tl.load(cp_ptr + 6 * cfs + co, mask=ld, other=0.0)
                txc = tl.where(rmask[:, None], tS, ninf)
                ctm_new = tl.maximum(ctm, tl.max(txc, 0))
                ccorr = tl.exp(ctm - ctm_new)
                pct = tl.exp(txc - ctm_new[None, :])
                tl.store(cp_ptr + 4 * cfs + co, ctm_new, mask=cmask)
                tl.store(cp_ptr + 5 * cfs + co, ctl * ccorr + tl.sum(pct, 0), mask=cmask)
                tl.store(cp_ptr + 6 * cfs + co, ctw * ccorr + tl.sum(pct * S, 0), mask=cmask)
            if NEG:
                grow = row_off + rows
                gcol = col_off + cols
                zr = tl.where(
                    same | (cmask[None, :] == 0),
                    ninf,
                    S + _gumbel_tl(key_r, grow[:, None], gcol[None, :]),
                )
                zmax = tl.max(zr, 1)
                cand = col_off + ct * BLOCK_C + tl.argmax(zr, 1, tie_break_left=True)
                cand = cand.to(tl.int32)
                better = (zmax > gv) | ((zmax == gv) & (cand < gi))
                gi = tl.where(better, cand, gi)
                gv = tl.where(better, zmax, gv)
                zc = tl.where(
                    same | (rmask[:, None] == 0),
                    ninf,
                    S + _gumbel_tl(key_c, gcol[None, :], grow[:, None]),
                )
                zcmax = tl.max(zc, 0)
                ccand = row_off + rb * BLOCK_R + tl.argmax(zc, 0, tie_break_left=True)
                ccand = ccand.to(tl.int32)
                cgv = tl.load(cp_ptr + GV * cfs + co, mask=ld, other=ninf)
                cgi = tl.load(cgi_ptr + co, mask=ld, other=-1)
                cb = (zcmax > cgv) | ((zcmax == cgv) & (ccand < cgi))
                tl.store(cp_ptr + GV * cfs + co, tl.where(cb, zcmax, cgv), mask=cmask)
                tl.store(cgi_ptr + co, tl.where(cb, ccand, cgi), mask=cmask)
        # The next row block's loads of this slot may run on other threads of the program (tiles
        # of one row block touch disjoint columns: one barrier per row block is enough).
        tl.debug_barrier()
        ro = pc.to(tl.int64) * b + rows
        tl.store(rp_ptr + ro, m, mask=rmask)
        tl.store(rp_ptr + rfs + ro, l_, mask=rmask)
        tl.store(rp_ptr + 2 * rfs + ro, hs, mask=rmask)
        tl.store(rp_ptr + 3 * rfs + ro, cnt, mask=rmask)
        if HAS_TEACHER:
            tl.store(rp_ptr + 4 * rfs + ro, tm, mask=rmask)
            tl.store(rp_ptr + 5 * rfs + ro, tls, mask=rmask)
            tl.store(rp_ptr + 6 * rfs + ro, tw, mask=rmask)
        if NEG:
            tl.store(rp_ptr + GV * rfs + ro, gv, mask=rmask)
            tl.store(rgi_ptr + ro, gi, mask=rmask)


@triton.jit
def _merge_ml(m, l, m2, l2):
    """Merge two online (max, sum-exp) pairs; returns (max, sum, factor1, factor2). Safe when
    both maxima are -inf (empty partners): the sum stays 0, no inf - inf."""
    mn = tl.maximum(m, m2)
    ref = tl.where(mn > float("-inf"), mn, 0.0)
    f1 = tl.exp(m - ref)
    f2 = tl.exp(m2 - ref)
    return mn, l * f1 + l2 * f2, f1, f2


@triton.jit
def _merge_kernel(
    st_ptr,
    sgi_ptr,  # state [nf, n] fp32, [n] int32 (in/out)
    p_ptr,
    pgi_ptr,  # partial slots [nf, P, n] fp32, [P, n] int32
    n,
    P,
    INIT: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    NEG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    ninf = float("-inf")
    GV: tl.constexpr = 7 if HAS_TEACHER else 4
    pfs = P * n
    m = tl.full([BLOCK], ninf, tl.float32)
    l_ = tl.zeros([BLOCK], tl.float32)
    hs = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.float32)
    tm = tl.full([BLOCK], ninf, tl.float32)
    tls = tl.zeros([BLOCK], tl.float32)
    tw = tl.zeros([BLOCK], tl.float32)
    gv = tl.full([BLOCK], ninf, tl.float32)
    gi = tl.full([BLOCK], -1, tl.int32)
    if not INIT:
        m = tl.load(st_ptr + cols, mask=mask, other=ninf)
        l_ = tl.load(st_ptr + n + cols, mask=mask, other=0.0)
        hs = tl.load(st_ptr + 2 * n + cols, mask=mask, other=0.0)
        cnt = tl.load(st_ptr + 3 * n + cols, mask=mask, other=0.0)
        if HAS_TEACHER:
            tm = tl.load(st_ptr + 4 * n + cols, mask=mask, other=ninf)
            tls = tl.load(st_ptr + 5 * n + cols, mask=mask, other=0.0)
            tw = tl.load(st_ptr + 6 * n + cols, mask=mask, other=0.0)
        if NEG:
            gv = tl.load(st_ptr + GV * n + cols, mask=mask, other=ninf)
            gi = tl.load(sgi_ptr + cols, mask=mask, other=-1)
    for p in range(0, P):
        o = p * n + cols
        m, l_, _f1, _f2 = _merge_ml(
            m,
            l_,
            tl.load(p_ptr + o, mask=mask, other=ninf),
            tl.load(p_ptr + pfs + o, mask=mask, other=0.0),
        )
        hs += tl.load(p_ptr + 2 * pfs + o, mask=mask, other=0.0)
        cnt += tl.load(p_ptr + 3 * pfs + o, mask=mask, other=0.0)
        if HAS_TEACHER:
            tm, tls, f1, f2 = _merge_ml(
                tm,
                tls,
                tl.load(p_ptr + 4 * pfs + o, mask=mask, other=ninf),
                tl.load(p_ptr + 5 * pfs + o, mask=mask, other=0.0),
            )
            tw = tw * f1 + tl.load(p_ptr + 6 * pfs + o, mask=mask, other=0.0) * f2
        if NEG:
            v2 = tl.load(p_ptr + GV * pfs + o, mask=mask, other=ninf)
            i2 = tl.load(pgi_ptr + o, mask=mask, other=-1)
            take = (v2 > gv) | ((v2 == gv) & (i2 < gi))
            gv = tl.where(take, v2, gv)
            gi = tl.where(take, i2, gi)
    tl.store(st_ptr + cols, m, mask=mask)
    tl.store(st_ptr + n + cols, l_, mask=mask)
    tl.store(st_ptr + 2 * n + cols, hs, mask=mask)
    tl.store(st_ptr + 3 * n + cols, cnt, mask=mask)
    if HAS_TEACHER:
        tl.store(st_ptr + 4 * n + cols, tm, mask=mask)
        tl.store(st_ptr + 5 * n + cols, tls, mask=mask)
        tl.store(st_ptr + 6 * n + cols, tw, mask=mask)
    if NEG:
        tl.store(st_ptr + GV * n + cols, gv, mask=mask)
        tl.store(sgi_ptr + cols, gi, mask=mask)


@triton.jit
def _dl_tile(
    q_ptr,
    k_ptr,
    tq_ptr,
    tk_ptr,
    rows,
    cols,
    rmask,
    cmask,
    same,
    lse_r,
    tlse_r,
    ic_r,
    lse_c,
    tlse_c,
    ic_c,
    bco,
    a,
    s,
    alpha,
    D,
    HAS_TEACHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """(A, Bt, sim) of one tile: A = a (p - tgt) (i2t), Bt = bcoef_j (p' - tgt') (t2i), zero
    outside the real tile; dlogit = cn (A + Bt)."""
    sim, tsim = _sims(
        q_ptr,
        k_ptr,
        tq_ptr,
        tk_ptr,
        rows,
        cols,
        rmask,
        cmask,
        D,
        HAS_TEACHER,
        BLOCK_R,
        BLOCK_C,
        BLOCK_K,
        PREC,
    )
    S = s * sim
    valid = rmask[:, None] & cmask[None, :]
    # Padded lanes carry LSE = +inf, so their exp is 0 rather than an overflow.
    p = tl.exp(S - lse_r[:, None])
    pc = tl.exp(S - lse_c[None, :])
    tgt = tl.where(same, ic_r[:, None], 0.0)
    tgtc = tl.where(same, ic_c[None, :], 0.0)
    if HAS_TEACHER:
        tS = s * tsim
        tgt = (1.0 - alpha) * tgt + alpha * tl.exp(tS - tlse_r[:, None])
        tgtc = (1.0 - alpha) * tgtc + alpha * tl.exp(tS - tlse_c[None, :])
    A = tl.where(valid, a * (p - tgt), 0.0)
    Bt = tl.where(valid, bco[None, :] * (pc - tgtc), 0.0)
    return A, Bt, sim


@triton.jit
def _accumulate(
    out_ptr,
    idx,
    imask,
    a,
    b_ptr,
    bidx,
    bmask,
    mult,
    acc,
    D,
    SINGLE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """out[idx] += mult * a @ B[bidx] over the feature dim, ``a`` rounded to B's dtype. SINGLE
    (D <= BLOCK_D): into the register accumulator ``acc`` (stored once by the caller). Otherwise
    chunk by chunk into the fp32 output in global memory: rows of ``out`` belong to this program
    alone, so the read-modify-write needs no atomics, and the similarity is not recomputed."""
    a = a.to(b_ptr.dtype.element_ty)
    if SINGLE:
        dd = tl.arange(0, BLOCK_D)
        bt = tl.load(
            b_ptr + bidx[:, None].to(tl.int64) * D + dd[None, :],
            mask=bmask[:, None] & (dd < D)[None, :],
            other=0.0,
        )
        acc = tl.dot(a, bt, acc, input_precision=PREC)
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = (dd < D)[None, :]
            bt = tl.load(
                b_ptr + bidx[:, None].to(tl.int64) * D + dd[None, :],
                mask=bmask[:, None] & dmask,
                other=0.0,
            )
            part = tl.dot(a, bt, input_precision=PREC)
            off = idx[:, None].to(tl.int64) * D + dd[None, :]
            om = imask[:, None] & dmask
            tl.store(
                out_ptr + off, tl.load(out_ptr + off, mask=om, other=0.0) + mult * part, mask=om
            )
    return acc


@triton.jit
def _store_acc(out_ptr, idx, imask, mult, acc, D, BLOCK_D: tl.constexpr):
    dd = tl.arange(0, BLOCK_D)
    off = idx[:, None].to(tl.int64) * D + dd[None, :]
    om = imask[:, None] & (dd < D)[None, :]
    tl.store(out_ptr + off, tl.load(out_ptr + off, mask=om, other=0.0) + mult * acc, mask=om)


@triton.jit
def _bwd_rows_kernel(
    q_ptr,
    k_ptr,
    tq_ptr,
    tk_ptr,
    rid_ptr,
    cid_ptr,
    s_ptr,
    rst_ptr,
    cst_ptr,  # [3, b], [3, n] fp32: LSE, teacher LSE, 1 / count
    coef_ptr,
    bco_ptr,  # [2] fp32 (a, cn), [n] fp32 column coefficients
    dq_ptr,  # [SPLIT, b, D] fp32, accumulated (+=)
    ds_ptr,  # [num row blocks * SPLIT] fp32 (written)
    b,
    n,
    D,
    TPS,
    alpha,
    HAS_TEACHER: tl.constexpr,
    HAS_DQ: tl.constexpr,
    PREC: tl.constexpr,
    SINGLE: tl.constexpr,
    LP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    SPLIT = tl.num_programs(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < b
    s = tl.load(s_ptr).to(tl.float32)
    a = tl.load(coef_ptr)
    cn = tl.load(coef_ptr + 1)
    inf = float("inf")
    rid = tl.load(rid_ptr + rows, mask=rmask, other=0)
    lse_r = tl.load(rst_ptr + rows, mask=rmask, other=inf)
    tlse_r = tl.load(rst_ptr + b + rows, mask=rmask, other=inf)
    ic_r = tl.load(rst_ptr + 2 * b + rows, mask=rmask, other=0.0)
    nct = tl.cdiv(n, BLOCK_C)
    out = dq_ptr + sp.to(tl.int64) * b * D
    mult = s * cn / LP
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    ds = tl.zeros([BLOCK_R], dtype=tl.float32)
    for ct in range(sp * TPS, tl.minimum(sp * TPS + TPS, nct)):
        cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < n
        cid = tl.load(cid_ptr + cols, mask=cmask, other=0)
        same = (rid[:, None] == cid[None, :]) & rmask[:, None] & cmask[None, :]
        A, Bt, sim = _dl_tile(
            q_ptr,
            k_ptr,
            tq_ptr,
            tk_ptr,
            rows,
            cols,
            rmask,
            cmask,
            same,
            lse_r,
            tlse_r,
            ic_r,
            tl.load(cst_ptr + cols, mask=cmask, other=inf),
            tl.load(cst_ptr + n + cols, mask=cmask, other=inf),
            tl.load(cst_ptr + 2 * n + cols, mask=cmask, other=0.0),
            tl.load(bco_ptr + cols, mask=cmask, other=0.0),
            a,
            s,
            alpha,
            D,
            HAS_TEACHER,
            BLOCK_R,
            BLOCK_C,
            BLOCK_K,
            PREC,
        )
        ds += tl.sum(A * sim, 1)
        if HAS_DQ:
            acc = _accumulate(
                out,
                rows,
                rmask,
                (A + Bt) * LP,
                k_ptr,
                cols,
                cmask,
                mult,
                acc,
                D,
                SINGLE,
                BLOCK_D,
                PREC,
            )
            if not SINGLE:  # the next tile re-reads the rows just written
                tl.debug_barrier()
    if HAS_DQ and SINGLE:
        _store_acc(out, rows, rmask, mult, acc, D, BLOCK_D)
    tl.store(ds_ptr + pid * SPLIT + sp, tl.sum(ds, 0) * cn)


@triton.jit
def _bwd_cols_kernel(
    q_ptr,
    k_ptr,
    tq_ptr,
    tk_ptr,
    rid_ptr,
    cid_ptr,
    s_ptr,
    rst_ptr,
    cst_ptr,
    coef_ptr,
    bco_ptr,
    dk_ptr,  # [SPLIT, n, D] fp32, accumulated (+=)
    dsc_ptr,  # [SPLIT, n] fp32 (written)
    b,
    n,
    D,
    TPS,
    alpha,
    HAS_TEACHER: tl.constexpr,
    HAS_DK: tl.constexpr,
    PREC: tl.constexpr,
    SINGLE: tl.constexpr,
    LP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n
    s = tl.load(s_ptr).to(tl.float32)
    a = tl.load(coef_ptr)
    cn = tl.load(coef_ptr + 1)
    inf = float("inf")
    cid = tl.load(cid_ptr + cols, mask=cmask, other=0)
    lse_c = tl.load(cst_ptr + cols, mask=cmask, other=inf)
    tlse_c = tl.load(cst_ptr + n + cols, mask=cmask, other=inf)
    ic_c = tl.load(cst_ptr + 2 * n + cols, mask=cmask, other=0.0)
    bco = tl.load(bco_ptr + cols, mask=cmask, other=0.0)
    nrb = tl.cdiv(b, BLOCK_R)
    out = dk_ptr + sp.to(tl.int64) * n * D
    mult = s * cn / LP
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    dsc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for rt in range(sp * TPS, tl.minimum(sp * TPS + TPS, nrb)):
        rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < b
        rid = tl.load(rid_ptr + rows, mask=rmask, other=0)
        same = (rid[:, None] == cid[None, :]) & rmask[:, None] & cmask[None, :]
        A, Bt, sim = _dl_tile(
            q_ptr,
            k_ptr,
            tq_ptr,
            tk_ptr,
            rows,
            cols,
            rmask,
            cmask,
            same,
            tl.load(rst_ptr + rows, mask=rmask, other=inf),
            tl.load(rst_ptr + b + rows, mask=rmask, other=inf),
            tl.load(rst_ptr + 2 * b + rows, mask=rmask, other=0.0),
            lse_c,
            tlse_c,
            ic_c,
            bco,
            a,
            s,
            alpha,
            D,
            HAS_TEACHER,
            BLOCK_R,
            BLOCK_C,
            BLOCK_K,
            PREC,
        )
        dsc += tl.sum(Bt * sim, 0)
        if HAS_DK:
            acc = _accumulate(
                out,
                cols,
                cmask,
                tl.trans((A + Bt) * LP),
                q_ptr,
                rows,
                rmask,
                mult,
                acc,
                D,
                SINGLE,
                BLOCK_D,
                PREC,
            )
            if not SINGLE:  # the next tile re-reads the rows just written
                tl.debug_barrier()
    if HAS_DK and SINGLE:
        _store_acc(out, cols, cmask, mult, acc, D, BLOCK_D)
    tl.store(dsc_ptr + sp.to(tl.int64) * n + cols, dsc * cn, mask=cmask)


# ------------------------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, >= 16 for tl.dot) and the grid budget. ``None`` fields take the
    device default."""

    block_r: int | None = None
    """Rows (images) per tile."""
    block_c: int | None = None
    """Columns (texts) per tile."""
    block_k: int | None = None
    """Feature-dim step of the similarity dot products."""
    block_d: int | None = None
    """Feature-dim chunk of a backward program's gradient accumulator."""
    num_warps: int | None = None
    """Warps per program; unset, each launch takes ``gpu_warps`` on a GPU (4 mostly: a 32 x 32
    fp32 tile is 8 registers a thread), 4 under the interpreter."""
    programs: int | None = None
    """Target number of programs per kernel (GPU: 4 x SMs; interpreter: 2)."""
    budget_bytes: int = 256 << 20
    """Cap of each partial-statistics / split-gradient buffer."""

    @property
    def bwd_rows_tile(self) -> tuple[int, int]:
        return self.block_r, self.block_c  # (rows owned, columns streamed) per program

    @property
    def bwd_cols_tile(self) -> tuple[int, int]:
        return self.block_c, self.block_r  # (columns owned, rows streamed) per program

    def resolved(self, d: int, device: torch.device) -> Tiles:
        small = device.type == "cpu" or triton_interpret()
        dflt = default_tiles(d, small)
        progs = self.programs
        if progs is None:
            sms = 0 if small else torch.cuda.get_device_properties(device).multi_processor_count
            progs = 2 if small else 4 * sms
        return Tiles(
            self.block_r or dflt.block_r,
            self.block_c or dflt.block_c,
            self.block_k or dflt.block_k,
            self.block_d or dflt.block_d,
            self.num_warps or (dflt.num_warps if small else None),
            progs,
            self.budget_bytes,
        )


def default_tiles(d: int, small: bool) -> Tiles:
    """The tile defaults for feature dim ``d`` (``programs`` left unset): ``small`` for the
    interpreter, else the GPU ones (those scripts/check_gpu_compile.py compiles).

    GPU: 32 x 32 tiles, 16-wide similarity steps, 32-wide gradient chunks, 4 warps, 2 stages
    (``NUM_STAGES``). Compiled for sm_80 with triton 3.9 at d = 768, the former 64 x 64 / K 64 /
    D 128 / 8 warps / 3 stages used all 255 registers and spilled in the teacher variants (bf16:
    forward 588, rows 136, cols 1140 bytes a thread; fp32: 2476, 868, 2080) and in fp32 without
    a teacher (428); 64 x 64 tiles with other K / D / stages or 16 warps still spilled, as did
    32 x 32 with K 32 / D 64 on sm_90 (teacher fp16: forward 64, cols 132 bytes). With these the
    teacher fp16 kernels need forward / rows / cols 228 / 168 / 234 registers on sm_80 and 234 /
    184 / 254 on sm_90, without spills."""
    w = triton.next_power_of_2(max(d, 16))
    if small:
        return Tiles(32, 32, min(w, 32), min(w, 64), 4)
    return Tiles(32, 32, min(w, 16), min(w, 32), 4)


def gpu_tiles(d: int) -> Tiles:
    return default_tiles(d, small=False)


def gpu_warps(kernel: str, d: int, arch: int, teacher: bool, neg: bool) -> int:
    """num_warps of ``kernel`` ("fwd", "rows" or "cols") on compute capability ``arch`` (major *
    10 + minor) with the default 32 x 32 tiles, when ``Tiles.num_warps`` is left unset. Pure:
    the launchers call it with the GPU's capability, scripts/check_gpu_compile.py with each arch.

    4 warps, except where 4 spill (triton 3.9, measured with scripts/check_gpu_compile.py): the
    sm_90 forward with a teacher and negatives (fp16 / bf16: 255 registers and 64+68 spill bytes
    at every d; 8 warps: 255 registers, no spill), and the backward kernels with a teacher at
    d <= 32, where the whole feature dim is one chunk (sm_90 fp16 rows 12+12 bytes, sm_80 / sm_90
    fp32 cols 24+20 / 32+24 bytes; 8 warps: 177-181 registers, no spill)."""
    if kernel == "fwd":
        return 8 if teacher and neg and arch >= 90 else 4
    return 8 if teacher and d <= 32 else 4


GPU_D_CLASSES = (16, 32, 768)
"""One feature dim per distinct GPU tile choice of ``default_tiles`` (block_k, block_d, SINGLE):
d <= 16, <= 32, and > 32 (chunked gradient; 768 is R2D2's)."""
NUM_STAGES = 2
"""Software-pipelining depth of the forward and backward kernels (3 stages need more registers
for the prefetched tiles: see ``default_tiles``)."""


def merge_block(n: int) -> int:
    return 128 if n >= 128 else max(16, triton.next_power_of_2(n))


MERGE_N_CLASSES = (16, 32, 64, 128)
"""One column count per distinct ``merge_block``."""


def geometry(d: int, device, tiles: Tiles) -> Tiles:
    return tiles.resolved(d, torch.device(device))


def _on_device(x: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensors' one.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _warps(t: Tiles, kernel: str, x: torch.Tensor, teacher: bool, neg: bool) -> int:
    if t.num_warps is not None:
        return t.num_warps
    if not x.is_cuda:
        return 4
    major, minor = torch.cuda.get_device_capability(x.device)
    return gpu_warps(kernel, x.shape[1], major * 10 + minor, teacher, neg)


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _lp(x: torch.Tensor) -> float:
    return _LP_SCALE_FP16 if x.dtype == torch.float16 else 1.0


def launch_fwd(
    q, k, tq, tk, rid, cid, s, rpart, cpart, tpc, row_off, col_off, keys, neg, t: Tiles
) -> None:
    b, d = q.shape
    n = k.shape[0]
    teacher = tq is not None
    tq_, tk_ = (tq, tk) if teacher else (q, k)
    R, C = cpart.f.shape[1], rpart.f.shape[1]
    with _on_device(q):
        _fwd_kernel[(R, C)](
            q,
            k,
            tq_,
            tk_,
            rid,
            cid,
            s,
            rpart.f,
            rpart.gi,
            cpart.f,
            cpart.gi,
            b,
            n,
            d,
            tpc,
            row_off,
            col_off,
            keys[0],
            keys[1],
            HAS_TEACHER=teacher,
            NEG=neg,
            PREC=_prec(q),
            BLOCK_R=t.block_r,
            BLOCK_C=t.block_c,
            BLOCK_K=t.block_k,
            num_warps=_warps(t, "fwd", q, teacher, neg),
            num_stages=NUM_STAGES,
        )


def launch_merge(state, part, init: bool, t: Tiles) -> None:
    n = state.f.shape[1]
    P = part.f.shape[1]
    block = merge_block(n)
    with _on_device(state.f):
        _merge_kernel[(triton.cdiv(n, block),)](
            state.f,
            state.gi,
            part.f,
            part.gi,
            n,
            P,
            INIT=init,
            HAS_TEACHER=state.teacher,
            NEG=state.neg,
            BLOCK=block,
        )


def _bwd_common(q, tq, t: Tiles, kernel: str):
    d = q.shape[1]
    return dict(
        HAS_TEACHER=tq is not None,
        PREC=_prec(q),
        SINGLE=d <= t.block_d,
        LP=_lp(q),
        BLOCK_R=t.block_r,
        BLOCK_C=t.block_c,
        BLOCK_K=t.block_k,
        BLOCK_D=t.block_d,
        num_warps=_warps(t, kernel, q, tq is not None, False),
        num_stages=NUM_STAGES,
    )


def launch_bwd_rows(
    q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, alpha, dq_part, ds_part, tps, t: Tiles
) -> None:
    b, d = q.shape
    n = k.shape[0]
    nrb = triton.cdiv(b, t.block_r)
    split = ds_part.numel() // nrb
    tq_, tk_ = (tq, tk) if tq is not None else (q, k)
    with _on_device(q):
        _bwd_rows_kernel[(nrb, split)](
            q,
            k,
            tq_,
            tk_,
            rid,
            cid,
            s,
            rstat,
            cstat,
            coef,
            bcoef,
            dq_part if dq_part is not None else ds_part,
            ds_part,
            b,
            n,
            d,
            tps,
            float(alpha),
            HAS_DQ=dq_part is not None,
            **_bwd_common(q, tq, t, "rows"),
        )


def launch_bwd_cols(
    q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, alpha, dk_part, dsc_part, tps, t: Tiles
) -> None:
    b, d = q.shape
    n = k.shape[0]
    split = dsc_part.shape[0]
    tq_, tk_ = (tq, tk) if tq is not None else (q, k)
    with _on_device(q):
        _bwd_cols_kernel[(triton.cdiv(n, t.block_c), split)](
            q,
            k,
            tq_,
            tk_,
            rid,
            cid,
            s,
            rstat,
            cstat,
            coef,
            bcoef,
            dk_part if dk_part is not None else dsc_part,
            dsc_part,
            b,
            n,
            d,
            tps,
            float(alpha),
            HAS_DK=dk_part is not None,
            **_bwd_common(q, tq, t, "cols"),
        )
