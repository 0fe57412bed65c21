"""GCPR contrastive loss, Triton kernels and launchers (math and public API in contrastive.py).

One *direction* (i2t or t2i) is "local rows ``Q [b, d]`` against columns ``K [n, d]``", with
``logit = s * Q K^T``. The kernels never hold more than one ``[BLOCK_R, BLOCK_C]`` tile of it.

  forward   one program per row block streams the column tiles and updates a per-row state
            (all fp32, ``[b]`` each):
              M, L      online max / sum-exp of the logits          -> LSE = M + log L
              HS, CNT   sum of logits over same-id columns, and their count (hard targets)
              TM, TL, TW  online max / sum-exp of the teacher logits and
                        sum_c exp(tlogit - TM) * logit               -> soft term TW / TL
              GV, GI    running max of (logit + Gumbel) over columns of another id, and its
                        global column index (hard-negative sampling by streaming Gumbel-max)
            The state is read and written back, so a caller can feed the columns in several
            blocks (ring mode) and get the same result as one call over all of them. Then
              CE_r = LSE_r - (1 - alpha) HS_r / CNT_r - alpha TW_r / TL_r      (sum_c target = 1)
  backward  recomputes tiles: dlogit = g (softmax - target) with g = grad / (2 b);
              rows kernel  dQ += s * dlogit @ K    and  ds += sum dlogit * sim   (program: rows)
              cols kernel  dK += s * dlogit^T @ Q                             (program: columns)
            each tile's similarity is computed once; with d <= BLOCK_D the gradient accumulator
            stays in registers, otherwise every tile adds into the program's own fp32 rows of
            dQ / dK chunk by chunk (L2-resident read-modify-write, no atomics), so a large d
            costs memory traffic rather than recomputation.

Both directions are separate calls with the roles swapped (as Inf-CL does); with one process the
t2i row statistics are the column statistics of the i2t tiles, which a fused kernel could reuse
(not done: it would need cross-program column reductions).

Memory beyond inputs and gradients: the state, O(b) per direction, and fp32 gradient
accumulators. FLOPs: forward 2 b n d per direction (x2 with a teacher); backward, per direction,
the similarity (x2 with a teacher) once in each of the two kernels, plus 2 x 2 b n d.
dlogit is rounded to the feature dtype before its dots (as flash-attention does with P), so
fp16/bf16 gradients carry that rounding; fp32 is exact to summation order.

The Gumbel noise is counter-based, a function of (seed key, global row, global column) only,
(``contrastive.gumbel_noise`` computes the same numbers in torch for the eager reference), so the
sample does not depend on tiling, ranks or ring order.

fp32 inputs use IEEE fp32 dots (no TF32); fp16/bf16 use tensor-core dots with fp32 accumulation.
On CPU tensors this runs only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from r2d2.kernels.contrastive_dist import RowState  # noqa: F401  (part of the kernel API)
from r2d2.kernels.dispatch import triton_interpret


# The torch twin of this noise (same constants) is r2d2.kernels.contrastive.gumbel_noise.

@triton.jit
def _mix32_tl(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel_tl(key, grow, gcol):
    # grow [BR, 1], gcol [1, BC] int32 global indices; uint32 arithmetic wraps like the torch twin.
    a = _mix32_tl(grow.to(tl.uint32) ^ key.to(tl.uint32))
    h = _mix32_tl(a + gcol.to(tl.uint32) * 0x9E3779B9)
    u = ((h >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
    return -tl.log(-tl.log(u))


# ------------------------------------------------------------------------------------ tiles
@triton.jit
def _sim_tile(q_ptr, k_ptr, rows, cols, rmask, cmask, D, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """fp32 ``Q[rows] @ K[cols]^T`` over the full feature dim, BLOCK_K at a time."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < D
        q = tl.load(q_ptr + rows[:, None].to(tl.int64) * D + kk[None, :],
                    mask=rmask[:, None] & km[None, :], other=0.0)
        k = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + kk[None, :],
                    mask=cmask[:, None] & km[None, :], other=0.0)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PREC)
    return acc


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr,            # [b, D] rows, [n, D] columns (contiguous, same dtype)
    tq_ptr, tk_ptr,          # teacher rows / columns (unused unless HAS_TEACHER)
    rid_ptr, cid_ptr,        # [b], [n] int64 ids
    s_ptr,                   # [1] scale
    m_ptr, l_ptr, hs_ptr, cnt_ptr, tm_ptr, tl_ptr, tw_ptr, gv_ptr, gi_ptr,  # [b] state
    b, n, D, row_off, col_off, key,
    HAS_TEACHER: tl.constexpr, NEG: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < b
    s = tl.load(s_ptr).to(tl.float32)
    ninf = float("-inf")
    m = tl.load(m_ptr + rows, mask=rmask, other=ninf)
    l_ = tl.load(l_ptr + rows, mask=rmask, other=0.0)
    hs = tl.load(hs_ptr + rows, mask=rmask, other=0.0)
    cnt = tl.load(cnt_ptr + rows, mask=rmask, other=0.0)
    rid = tl.load(rid_ptr + rows, mask=rmask, other=-1)
    if HAS_TEACHER:
        tm = tl.load(tm_ptr + rows, mask=rmask, other=ninf)
        tls = tl.load(tl_ptr + rows, mask=rmask, other=0.0)
        tw = tl.load(tw_ptr + rows, mask=rmask, other=0.0)
    if NEG:
        gv = tl.load(gv_ptr + rows, mask=rmask, other=ninf)
        gi = tl.load(gi_ptr + rows, mask=rmask, other=-1)
    for c0 in range(0, n, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < n
        logit = s * _sim_tile(q_ptr, k_ptr, rows, cols, rmask, cmask, D, BLOCK_R, BLOCK_C,
                              BLOCK_K, PREC)
        logit = tl.where(cmask[None, :], logit, ninf)
        # Every tile has >= 1 real column, so m_new is finite and no exp(-inf + inf) is formed.
        m_new = tl.maximum(m, tl.max(logit, 1))
        l_ = l_ * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), 1)
        m = m_new
        cid = tl.load(cid_ptr + cols, mask=cmask, other=-2)
        same = (rid[:, None] == cid[None, :]) & cmask[None, :]
        hs += tl.sum(tl.where(same, logit, 0.0), 1)
        cnt += tl.sum(same.to(tl.float32), 1)
        if HAS_TEACHER:
            tlog = s * _sim_tile(tq_ptr, tk_ptr, rows, cols, rmask, cmask, D, BLOCK_R, BLOCK_C,
                                 BLOCK_K, PREC)
            tlog = tl.where(cmask[None, :], tlog, ninf)
            tm_new = tl.maximum(tm, tl.max(tlog, 1))
            corr = tl.exp(tm - tm_new)
            p = tl.exp(tlog - tm_new[:, None])
            tls = tls * corr + tl.sum(p, 1)
            tw = tw * corr + tl.sum(p * tl.where(cmask[None, :], logit, 0.0), 1)
            tm = tm_new
        if NEG:
            g = _gumbel_tl(key, (row_off + rows)[:, None], (col_off + cols)[None, :])
            z = tl.where(same | (cmask[None, :] == 0), ninf, logit + g)
            zmax = tl.max(z, 1)
            zarg = tl.argmax(z, 1)
            better = zmax > gv
            gi = tl.where(better, col_off + c0 + zarg, gi)
            gv = tl.where(better, zmax, gv)
    tl.store(m_ptr + rows, m, mask=rmask)
    tl.store(l_ptr + rows, l_, mask=rmask)
    tl.store(hs_ptr + rows, hs, mask=rmask)
    tl.store(cnt_ptr + rows, cnt, mask=rmask)
    if HAS_TEACHER:
        tl.store(tm_ptr + rows, tm, mask=rmask)
        tl.store(tl_ptr + rows, tls, mask=rmask)
        tl.store(tw_ptr + rows, tw, mask=rmask)
    if NEG:
        tl.store(gv_ptr + rows, gv, mask=rmask)
        tl.store(gi_ptr + rows, gi.to(tl.int64), mask=rmask)


@triton.jit
def _dlogit_tile(q_ptr, k_ptr, tq_ptr, tk_ptr, rows, cols, rmask, cmask, rid, cid, lse, tlse,
                 inv_cnt, s, g, alpha, D, HAS_TEACHER: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """(dlogit, sim) of one tile: dlogit = g * (softmax - target), zero outside the real tile."""
    sim = _sim_tile(q_ptr, k_ptr, rows, cols, rmask, cmask, D, BLOCK_R, BLOCK_C, BLOCK_K, PREC)
    valid = rmask[:, None] & cmask[None, :]
    p = tl.where(valid, tl.exp(s * sim - lse[:, None]), 0.0)
    same = (rid[:, None] == cid[None, :]) & valid
    tgt = tl.where(same, inv_cnt[:, None], 0.0)
    if HAS_TEACHER:
        tsim = _sim_tile(tq_ptr, tk_ptr, rows, cols, rmask, cmask, D, BLOCK_R, BLOCK_C, BLOCK_K,
                         PREC)
        soft = tl.where(valid, tl.exp(s * tsim - tlse[:, None]), 0.0)
        tgt = (1.0 - alpha) * tgt + alpha * soft
    return g * (p - tgt), sim


@triton.jit
def _accumulate(out_ptr, idx, imask, a, b_ptr, bidx, bmask, s, acc, D,
                SINGLE: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """out[idx] += s * a @ B[bidx] over the feature dim. SINGLE (D <= BLOCK_D): into the
    register accumulator ``acc`` (stored once by the caller). Otherwise chunk by chunk into the
    fp32 output in global memory: rows of ``out`` belong to this program alone, so the
    read-modify-write needs no atomics, and the similarity is not recomputed per chunk."""
    a = a.to(b_ptr.dtype.element_ty)
    if SINGLE:
        dd = tl.arange(0, BLOCK_D)
        bt = tl.load(b_ptr + bidx[:, None].to(tl.int64) * D + dd[None, :],
                     mask=bmask[:, None] & (dd < D)[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=PREC)
    else:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = (dd < D)[None, :]
            bt = tl.load(b_ptr + bidx[:, None].to(tl.int64) * D + dd[None, :],
                         mask=bmask[:, None] & dmask, other=0.0)
            part = tl.dot(a, bt, input_precision=PREC)
            off = idx[:, None].to(tl.int64) * D + dd[None, :]
            om = imask[:, None] & dmask
            tl.store(out_ptr + off, tl.load(out_ptr + off, mask=om, other=0.0) + s * part,
                     mask=om)
    return acc


@triton.jit
def _store_acc(out_ptr, idx, imask, s, acc, D, BLOCK_D: tl.constexpr):
    dd = tl.arange(0, BLOCK_D)
    off = idx[:, None].to(tl.int64) * D + dd[None, :]
    om = imask[:, None] & (dd < D)[None, :]
    tl.store(out_ptr + off, tl.load(out_ptr + off, mask=om, other=0.0) + s * acc, mask=om)


@triton.jit
def _bwd_rows_kernel(
    q_ptr, k_ptr, tq_ptr, tk_ptr, rid_ptr, cid_ptr, s_ptr, g_ptr,
    lse_ptr, tlse_ptr, icnt_ptr,     # [b] fp32 per-row statistics of the forward
    dq_ptr,                          # [b, D] fp32, accumulated (+=)
    ds_ptr,                          # [num row blocks] fp32, accumulated (+=)
    b, n, D, alpha,
    HAS_TEACHER: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < b
    s = tl.load(s_ptr).to(tl.float32)
    g = tl.load(g_ptr).to(tl.float32)
    rid = tl.load(rid_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    tlse = tl.load(tlse_ptr + rows, mask=rmask, other=0.0)
    icnt = tl.load(icnt_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    ds = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, n, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < n
        cid = tl.load(cid_ptr + cols, mask=cmask, other=-2)
        dl, sim = _dlogit_tile(q_ptr, k_ptr, tq_ptr, tk_ptr, rows, cols, rmask, cmask, rid, cid,
                               lse, tlse, icnt, s, g, alpha, D, HAS_TEACHER, BLOCK_R, BLOCK_C,
                               BLOCK_K, PREC)
        ds += tl.sum(dl * sim, 1)
        acc = _accumulate(dq_ptr, rows, rmask, dl, k_ptr, cols, cmask, s, acc, D, SINGLE,
                          BLOCK_D, PREC)
    if SINGLE:
        _store_acc(dq_ptr, rows, rmask, s, acc, D, BLOCK_D)
    tl.store(ds_ptr + pid, tl.load(ds_ptr + pid) + tl.sum(ds, 0))


@triton.jit
def _bwd_cols_kernel(
    q_ptr, k_ptr, tq_ptr, tk_ptr, rid_ptr, cid_ptr, s_ptr, g_ptr,
    lse_ptr, tlse_ptr, icnt_ptr,
    dk_ptr,                          # [n, D] fp32, accumulated (+=)
    b, n, D, alpha,
    HAS_TEACHER: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n
    s = tl.load(s_ptr).to(tl.float32)
    g = tl.load(g_ptr).to(tl.float32)
    cid = tl.load(cid_ptr + cols, mask=cmask, other=-2)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, b, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < b
        rid = tl.load(rid_ptr + rows, mask=rmask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        tlse = tl.load(tlse_ptr + rows, mask=rmask, other=0.0)
        icnt = tl.load(icnt_ptr + rows, mask=rmask, other=0.0)
        dl, sim = _dlogit_tile(q_ptr, k_ptr, tq_ptr, tk_ptr, rows, cols, rmask, cmask, rid, cid,
                               lse, tlse, icnt, s, g, alpha, D, HAS_TEACHER, BLOCK_R, BLOCK_C,
                               BLOCK_K, PREC)
        acc = _accumulate(dk_ptr, cols, cmask, tl.trans(dl), q_ptr, rows, rmask, s, acc, D,
                          SINGLE, BLOCK_D, PREC)
    if SINGLE:
        _store_acc(dk_ptr, cols, cmask, s, acc, D, BLOCK_D)


# ------------------------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, >= 16 for tl.dot). ``None`` fields take the device default."""

    block_r: int | None = None
    """Rows per program."""
    block_c: int | None = None
    """Columns per streamed tile."""
    block_k: int | None = None
    """Feature-dim step of the similarity dot products."""
    block_d: int | None = None
    """Feature-dim chunk of a backward program's gradient accumulator."""
    num_warps: int = 4

    def resolved(self, d: int, device: torch.device) -> "Tiles":
        small = device.type == "cpu" or triton_interpret()
        dflt = 32 if small else 64
        bk = self.block_k or min(triton.next_power_of_2(max(d, 16)), 32 if small else 64)
        bd = self.block_d or min(triton.next_power_of_2(max(d, 16)), 64 if small else 128)
        return Tiles(self.block_r or dflt, self.block_c or dflt, bk, bd, self.num_warps)


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def forward_block(st: RowState, q, k, tq, tk, rid, cid, s, *, row_off: int, col_off: int,
                  key: int, neg: bool, tiles: Tiles) -> None:
    """Update ``st`` (local rows ``q``) with the column block ``k`` (global offset ``col_off``)."""
    b, d = q.shape
    n = k.shape[0]
    t = tiles.resolved(d, q.device)
    teacher = tq is not None
    tq_, tk_ = (tq, tk) if teacher else (q, k)
    grid = (triton.cdiv(b, t.block_r),)
    _fwd_kernel[grid](q, k, tq_, tk_, rid, cid, s, st.m, st.l, st.hs, st.cnt, st.tm, st.tl,
                      st.tw, st.gv, st.gi, b, n, d, row_off, col_off, key,
                      HAS_TEACHER=teacher, NEG=neg, PREC=_prec(q), BLOCK_R=t.block_r,
                      BLOCK_C=t.block_c, BLOCK_K=t.block_k, num_warps=t.num_warps)


def backward_block(q, k, tq, tk, rid, cid, s, g, lse, tlse, icnt, alpha: float, *, dq, dk, ds,
                   tiles: Tiles) -> None:
    """Accumulate ``dq`` ([b, d] fp32), ``dk`` ([n, d] fp32) and ``ds`` (fp32 [row blocks]) for
    one column block. ``g`` is the one-element fp32 tensor grad_loss / (2 b)."""
    b, d = q.shape
    n = k.shape[0]
    t = tiles.resolved(d, q.device)
    teacher = tq is not None
    tq_, tk_ = (tq, tk) if teacher else (q, k)
    common = dict(HAS_TEACHER=teacher, PREC=_prec(q), SINGLE=d <= t.block_d, BLOCK_R=t.block_r,
                  BLOCK_C=t.block_c, BLOCK_K=t.block_k, BLOCK_D=t.block_d,
                  num_warps=t.num_warps)
    if dq is not None:
        _bwd_rows_kernel[(triton.cdiv(b, t.block_r),)](
            q, k, tq_, tk_, rid, cid, s, g, lse, tlse, icnt, dq, ds, b, n, d, float(alpha),
            **common)
    if dk is not None:
        _bwd_cols_kernel[(triton.cdiv(n, t.block_c),)](
            q, k, tq_, tk_, rid, cid, s, g, lse, tlse, icnt, dk, b, n, d, float(alpha),
            **common)


def ds_buffer(b: int, d: int, device, tiles: Tiles) -> torch.Tensor:
    t = tiles.resolved(d, torch.device(device))
    return torch.zeros(triton.cdiv(b, t.block_r), device=device, dtype=torch.float32)
