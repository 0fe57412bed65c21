"""Fused GCPR: streaming state, tile plans, autograd, one process and distributed (gather, ring).

A backend module (contrastive/triton.py, cuda.py) provides the tiled kernels over one
similarity ``S = s * Q K^T``: rows ``Q`` = this rank's images ``[b, d]``, columns ``K`` = texts
``[n, d]`` (all B in gather mode, one rank's block per ring hop). Its API:

  geometry(d, device, tiles)       resolved tile config (block_r, block_c, programs, budget_bytes)
  launch_fwd(...)                  one pass over the tiles: row partials [nf, C, b] (one slot per
                                   column split) and column partials [nf, R, n] (one slot per
                                   row-program; a program read-modify-writes only its own slot)
  launch_merge(state, part, ...)   state [nf, n] <- merge(state, slots of part [nf, P, n])
  launch_bwd_rows / launch_bwd_cols  recompute tiles; dI (+ ds of the i2t term) / dT (+ per-column
                                   ds of the t2i term)

Streaming state (``State``, fp32 ``[nf, ...]`` + int32 ``gi``): for a row (i2t) or a column (t2i)
  m, l        online max / sum-exp of the logits              -> LSE = m + log l
  hs, cnt     sum of the logits over same-id partners, their count (hard targets)
  tm, tl, tw  teacher online max / sum-exp, sum exp(tlogit - tm) * logit   (with a teacher)
  gv, gi      max of logit + Gumbel over other-id partners and its global index  (negatives)
  CE = LSE - (1 - alpha) hs / cnt - alpha tw / tl.
Merging two states is exact up to rounding: (m, l) and (tm, tl, tw) by the online-softmax
rescale, hs / cnt by sums, (gv, gi) by max with the lower global index winning ties (the rule of
torch.argmax in the eager reference), so program counts, rank counts and ring orders give the
same negatives for the same logits (a different tile shape can change a logit in its last bit,
which flips a negative only at a near-tie).

Modes (``loss_r = 1/2 (mean over local images of i2t CE + mean over local texts of t2i CE)``):
  gather  all-gather the TEXT features (+ ids, teacher texts); images stay local. Column state
          for all B columns is merged across ranks with all_reduce (MAX, rescale, SUM, MIN for the
          index): O(B) floats. Backward: dI is complete locally; dT for all B texts (fp32 [B, d])
          and the per-column ds go to their owners with reduce_scatter.
  ring    text blocks (T, ids, teacher T) travel the ring (batch_isend_irecv), the next block's
          transfer posted before the current block is computed; the block's column-state
          accumulator travels one hop behind and reaches its owner complete after W hops.
          Backward sends the blocks again with their final column statistics, the dT / ds
          accumulators one hop behind.
Upstream gradients: ``dlogit_ij = g_r/(2b) (p_ij - tgt_ij) + g_owner(j)/(2b) (p'_ij - tgt'_ij)``
with p' / tgt' the column softmax / targets; the W scalars g are all-gathered, so the result is
the gradient of ``sum_r g_r loss_r`` (what DDP averaging of per-rank losses gives), and each rank's
``logit_scale`` gradient is exactly ``g_r d loss_r / d s`` (as with the eager reference).

Memory beyond inputs and gradients (fp32 unless said; nf = 4 + 3 teacher + 1 negatives):
  both    row state nf b; column partials R n (nf + neg) and row partials C b (nf + neg), where
          R, C <= MAX_SLOTS (32) whatever b and n, so both are O(b + n) with a fixed constant;
          each also stays under ``budget_bytes`` (default 256 MiB; one slot is always allowed),
          and R x C is about ``programs`` (4 x the SM count) where the caps allow.
  gather  gathered texts B d (x2 with a teacher; feature dtype), ids B, column state nf B;
          backward dT partials B d fp32, per-column ds B; dI b d fp32.
  ring    text blocks b d: the one in hand and the one arriving (x2 with a teacher); column
          accumulators nf b: this hop's, the one arriving, the one leaving. Backward: the same
          blocks (+ their 3 b statistics), dT accumulators b d fp32 (this hop's, arriving,
          leaving), dI b d fp32.
  Backward split partials (only when there are fewer owned blocks than ``programs``): split x
  rows x d fp32, at most ``budget_bytes`` (one split is always allowed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r2d2.dist import dist_info, gather, reduce_scatter

log = logging.getLogger("r2d2.kernels")

_INT32_MAX = 2**31 - 1

# Test hook: when True every buffer a kernel must fully write starts as NaN (index buffers as
# INT32_MAX), so an unwritten element shows up as a NaN loss / a wrong index.
POISON = False


def _empty(shape, dtype, device):
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else _INT32_MAX
    return torch.full(shape, fill, dtype=dtype, device=device)


def nfields(teacher: bool, neg: bool) -> int:
    return 4 + 3 * teacher + neg


@dataclass
class State:
    """Streaming state of a set of rows or columns: ``f`` fp32 ``[nf, *shape]`` (fields m, l, hs,
    cnt, then tm, tl, tw with a teacher, then gv with negatives) and ``gi`` int32 ``shape`` (or a
    1-element dummy without negatives)."""

    f: torch.Tensor
    gi: torch.Tensor
    teacher: bool
    neg: bool

    @classmethod
    def empty(cls, shape, teacher: bool, neg: bool, device) -> State:
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        f = _empty((nfields(teacher, neg),) + shape, torch.float32, device)
        gi = _empty(shape if neg else (1,), torch.int32, device)
        return cls(f, gi, teacher, neg)

    @property
    def gv_row(self) -> int:
        return 7 if self.teacher else 4

    def lse(self):
        return self.f[0] + torch.log(self.f[1])

    def tlse(self):
        return self.f[4] + torch.log(self.f[5])

    def icnt(self):
        return 1.0 / self.f[3].clamp_min(1.0)

    def ce(self, alpha: float):
        ce = self.lse() - (1.0 - alpha) * self.f[2] * self.icnt()
        if self.teacher and alpha > 0:
            ce = ce - alpha * self.f[6] / self.f[5]
        return ce

    def stats(self) -> torch.Tensor:
        """fp32 ``[3, n]``: LSE, teacher LSE (0 without a teacher), 1 / count (for backward)."""
        tlse = self.tlse() if self.teacher else torch.zeros_like(self.f[0])
        return torch.stack([self.lse(), tlse, self.icnt()]).contiguous()

    def negatives(self, sl=slice(None)) -> torch.Tensor:
        return self.gi[sl].to(torch.int64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.f, self.gi] if self.neg else [self.f]

    def with_tensors(self, ts) -> State:
        return State(ts[0], ts[1] if self.neg else self.gi, self.teacher, self.neg)

    def slots(self) -> State:
        """This state seen as a one-slot partial ``[nf, 1, n]`` (for merging two states)."""
        return State(
            self.f.unsqueeze(1),
            self.gi.unsqueeze(0) if self.neg else self.gi,
            self.teacher,
            self.neg,
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Partial-statistics slots per direction: the column partials hold R x n entries and the row
# partials C x b, so a fixed cap keeps them O(b + n) (not growing like b x n with the row count);
# 32 x 32 = 1024 programs is more than a GPU runs at once (4 x 132 SMs on an H100).
MAX_SLOTS = 32


def fwd_plan(b: int, n: int, geo, teacher: bool, neg: bool) -> tuple[int, int, int]:
    """(R row-programs, C column splits, column tiles per split) of the forward grid."""
    nrb, nct = _cdiv(b, geo.block_r), _cdiv(n, geo.block_c)
    per = 4 * nfields(teacher, neg) + 4 * neg  # bytes per slot and column (gi is int32)
    R = max(1, min(nrb, geo.programs, MAX_SLOTS, geo.budget_bytes // max(1, n * per)))
    C = max(1, min(nct, _cdiv(geo.programs, R), MAX_SLOTS, geo.budget_bytes // max(1, b * per)))
    tpc = _cdiv(nct, C)
    return R, _cdiv(nct, tpc), tpc


def bwd_split(owned_blocks: int, stream_tiles: int, out_rows: int, d: int, geo) -> tuple[int, int]:
    """(splits of the streamed dimension, tiles per split) for a backward kernel whose programs
    own ``owned_blocks`` blocks: split only when they are fewer than ``programs``, each split
    then writing its own fp32 gradient partial ``[out_rows, d]`` (``budget_bytes`` in all)."""
    want = _cdiv(geo.programs, max(1, owned_blocks))
    split = max(1, min(stream_tiles, want, geo.budget_bytes // max(1, out_rows * d * 4)))
    tps = _cdiv(stream_tiles, split)
    return _cdiv(stream_tiles, tps), tps


def forward_block(
    kern,
    tiles,
    q,
    k,
    tq,
    tk,
    rid,
    cid,
    s,
    *,
    row_off: int,
    col_off: int,
    keys: tuple[int, int],
    neg: bool,
    rows: State,
    rows_init: bool,
    cols: State,
    cols_init: bool,
) -> None:
    """One pass over the tiles of ``s * q k^T``: merge this block's row and column statistics into
    ``rows`` ([b]) and ``cols`` ([n]); ``*_init`` overwrite instead of merging."""
    b, d = q.shape
    n = k.shape[0]
    teacher = tq is not None
    geo = kern.geometry(d, q.device, tiles)
    R, C, tpc = fwd_plan(b, n, geo, teacher, neg)
    rpart = State.empty((C, b), teacher, neg, q.device)
    cpart = State.empty((R, n), teacher, neg, q.device)
    kern.launch_fwd(q, k, tq, tk, rid, cid, s, rpart, cpart, tpc, row_off, col_off, keys, neg, geo)
    kern.launch_merge(rows, rpart, rows_init, geo)
    kern.launch_merge(cols, cpart, cols_init, geo)


def backward_block(
    kern,
    tiles,
    q,
    k,
    tq,
    tk,
    rid,
    cid,
    s,
    rstat,
    cstat,
    coef,
    bcoef,
    alpha,
    *,
    dq,
    dk,
    ds_col,
    need_ds: bool,
) -> torch.Tensor:
    """Recompute the tiles of ``s * q k^T``; add dI to ``dq`` (fp32 [b, d]), dT to ``dk`` (fp32
    [n, d]) and the t2i term's per-column ds to ``ds_col`` (fp32 [n]); ``None`` skips one.
    Returns the i2t term's ds (fp32 0-d). ``coef`` = [a, cn], ``bcoef`` [n]: see the kernels."""
    b, d = q.shape
    n = k.shape[0]
    geo = kern.geometry(d, q.device, tiles)
    ds_rows = torch.zeros((), dtype=torch.float32, device=q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    if dq is not None or need_ds:
        own, stream = geo.bwd_rows_tile
        nrb = _cdiv(b, own)
        split, tps = bwd_split(nrb, _cdiv(n, stream), b, d, geo)
        part = None
        if dq is not None:
            part = dq.unsqueeze(0) if split == 1 else torch.zeros((split, b, d), **f32)
        ds_part = _empty((nrb * split,), torch.float32, q.device)
        kern.launch_bwd_rows(
            q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, alpha, part, ds_part, tps, geo
        )
        if dq is not None and split > 1:
            dq += part.sum(0)
        ds_rows = ds_part.sum()
    if dk is not None or ds_col is not None:
        own, stream = geo.bwd_cols_tile
        split, tps = bwd_split(_cdiv(n, own), _cdiv(b, stream), n, d, geo)
        part = None
        if dk is not None:
            part = dk.unsqueeze(0) if split == 1 else torch.zeros((split, n, d), **f32)
        dsc = _empty((split, n), torch.float32, q.device)
        kern.launch_bwd_cols(
            q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, alpha, part, dsc, tps, geo
        )
        if dk is not None and split > 1:
            dk += part.sum(0)
        if ds_col is not None:
            ds_col += dsc.sum(0)
    return ds_rows


# ------------------------------------------------------------------------------ communication
def _all_gather_cat(x: torch.Tensor, group, world: int) -> torch.Tensor:
    return gather(x.detach().contiguous(), group, with_grad=False) if world > 1 else x


def allreduce_state(st: State, group) -> None:
    """Merge a column state held on every rank (each from its own rows) into the complete one,
    in place: MAX of the maxima, rescale, SUM; the negative's index by MIN over the ranks whose
    value equals the maximum (the lower-global-index tie rule)."""
    f = st.f
    mx_rows = [0] + ([4] if st.teacher else []) + ([st.gv_row] if st.neg else [])
    mx = f[mx_rows].clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)

    def factor(old, new):
        safe = torch.where(new > float("-inf"), new, torch.zeros_like(new))
        return torch.exp(old - safe)

    f[1] *= factor(f[0], mx[0])
    sum_rows = [1, 2, 3]
    if st.teacher:
        c = factor(f[4], mx[1])
        f[5] *= c
        f[6] *= c
        sum_rows += [5, 6]
    sums = f[sum_rows].contiguous()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    f[sum_rows] = sums
    if st.neg:
        gv_new = mx[-1]
        cand = torch.where(f[st.gv_row] == gv_new, st.gi, torch.full_like(st.gi, _INT32_MAX))
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
        st.gi.copy_(cand)
    f[mx_rows] = mx


def _peers(group, rank, world):
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    return nxt, prv


_BATCH_P2P = True


def _post_shift(tensors, group, rank, world):
    """Send ``tensors`` to the next rank and receive the previous rank's into new buffers, as one
    batch_isend_irecv (so NCCL at world 2, where next == prev, cannot deadlock). Returns
    (buffers, requests); wait on the requests before reading the buffers or reusing the sent
    ones."""
    global _BATCH_P2P
    nxt, prv = _peers(group, rank, world)
    send = [t.contiguous() for t in tensors]
    bufs = [torch.empty_like(t) for t in send]
    if _BATCH_P2P:
        ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send]
        ops += [dist.P2POp(dist.irecv, r, prv, group) for r in bufs]
        try:
            return bufs, dist.batch_isend_irecv(ops) + [send]
        except (RuntimeError, NotImplementedError) as e:  # a backend without batched P2P
            log.warning("contrastive ring: no batch_isend_irecv (%s); plain isend/irecv", e)
            _BATCH_P2P = False
    reqs = [dist.isend(t, nxt, group=group) for t in send]
    reqs += [dist.irecv(r, prv, group=group) for r in bufs]
    return bufs, reqs + [send]


def _wait(reqs) -> None:
    for r in reqs:
        if not isinstance(r, list):  # the trailing list keeps the sent tensors alive until here
            r.wait()


def _coefs(g: torch.Tensor, group, world: int, b: int, rank: int):
    """(coef [a, cn], per-owner column coefficients [W]) from the upstream gradients of every
    rank's loss. The kernels form dlogit / cn = a (p - tgt) + bcoef_j (p' - tgt') (|.| <= 2, so
    it keeps its precision in fp16 / bf16) and multiply the fp32 accumulators by cn."""
    g = g.detach().float().reshape(1).contiguous()
    if world > 1:
        parts = [torch.empty_like(g) for _ in range(world)]
        dist.all_gather(parts, g, group=group)
        g = torch.cat(parts)
    c = g / (2 * b)
    cn = c.abs().max()
    cn = torch.where(cn > 0, cn, torch.ones_like(cn))
    return torch.stack([c[rank] / cn, cn]).contiguous(), c / cn


class _Ctx:
    """Non-tensor arguments of the autograd functions."""

    def __init__(self, kern, tiles, ids_l, tI_l, tT_l, alpha, keys, neg, rank, world, group):
        self.__dict__.update(locals())
        del self.__dict__["self"]


def _scale(scale, device):
    # The scale may live elsewhere (e.g. a CPU scalar); the kernels read it on the device.
    return scale.detach().float().reshape(1).to(device).contiguous()


class FusedGather(torch.autograd.Function):
    """Local images against all texts (gathered; world 1: the local ones)."""

    @staticmethod
    def forward(ctx, img_l, txt_l, scale, c: _Ctx):
        b = img_l.shape[0]
        dev = img_l.device
        s = _scale(scale, dev)
        teacher = c.tI_l is not None
        T = _all_gather_cat(txt_l, c.group, c.world)
        ids = _all_gather_cat(c.ids_l, c.group, c.world)
        tT = _all_gather_cat(c.tT_l, c.group, c.world) if teacher else None
        rows = State.empty(b, teacher, c.neg, dev)
        cols = State.empty(T.shape[0], teacher, c.neg, dev)
        forward_block(
            c.kern,
            c.tiles,
            img_l,
            T,
            c.tI_l,
            tT,
            c.ids_l,
            ids,
            s,
            row_off=c.rank * b,
            col_off=0,
            keys=c.keys,
            neg=c.neg,
            rows=rows,
            rows_init=True,
            cols=cols,
            cols_init=True,
        )
        if c.world > 1:
            allreduce_state(cols, c.group)
        own = slice(c.rank * b, (c.rank + 1) * b)
        loss = 0.5 * (rows.ce(c.alpha).mean() + cols.ce(c.alpha)[own].mean())
        neg_t, neg_i = _negatives(rows, cols, own, c.neg, b, dev)
        ctx.c, ctx.scale_device = c, scale.device
        ctx.save_for_backward(img_l, T, tT, ids, s, rows.stats(), cols.stats())
        ctx.mark_non_differentiable(neg_t, neg_i)
        return loss, neg_t, neg_i

    @staticmethod
    def backward(ctx, g_loss, _g1, _g2):
        c = ctx.c
        img_l, T, tT, ids, s, rstat, cstat = ctx.saved_tensors
        b, d = img_l.shape
        B = T.shape[0]
        coef, bw = _coefs(g_loss, c.group, c.world, b, c.rank)
        bcoef = bw.repeat_interleave(b).contiguous()
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        f32 = dict(dtype=torch.float32, device=img_l.device)
        dI = torch.zeros((b, d), **f32) if need_i else None
        dT = torch.zeros((B, d), **f32) if need_t else None
        dsc = torch.zeros(B, **f32) if need_s else None
        ds = backward_block(
            c.kern,
            c.tiles,
            img_l,
            T,
            c.tI_l,
            tT,
            c.ids_l,
            ids,
            s,
            rstat,
            cstat,
            coef,
            bcoef,
            c.alpha,
            dq=dI,
            dk=dT,
            ds_col=dsc,
            need_ds=need_s,
        )
        d_txt = d_s = None
        if need_t:
            d_txt = (reduce_scatter(dT, c.group) if c.world > 1 else dT).to(T.dtype)
        if need_s:
            dsc = reduce_scatter(dsc, c.group) if c.world > 1 else dsc
            d_s = (ds + dsc.sum()).to(ctx.scale_device)
        return dI.to(img_l.dtype) if need_i else None, d_txt, d_s, None


def _negatives(rows: State, cols: State, own, neg: bool, b: int, dev):
    if not neg:
        none = torch.full((b,), -1, dtype=torch.int64, device=dev)
        return none, none.clone()
    return rows.negatives(), cols.negatives(own)


class FusedRing(torch.autograd.Function):
    """Local images against every rank's texts, the text blocks passed round a ring."""

    @staticmethod
    def forward(ctx, img_l, txt_l, scale, c: _Ctx):
        b = img_l.shape[0]
        dev = img_l.device
        s = _scale(scale, dev)
        teacher = c.tI_l is not None
        rows = State.empty(b, teacher, c.neg, dev)
        blk = [txt_l.detach(), c.ids_l] + ([c.tT_l] if teacher else [])
        acc, acc_reqs = None, []
        for j in range(c.world):
            reqs = []
            if j < c.world - 1:  # prefetch the next block while this one is computed
                nxt_blk, reqs = _post_shift(blk, c.group, c.rank, c.world)
            owner = (c.rank - j) % c.world
            part = State.empty(b, teacher, c.neg, dev)
            forward_block(
                c.kern,
                c.tiles,
                img_l,
                blk[0],
                c.tI_l,
                blk[2] if teacher else None,
                c.ids_l,
                blk[1],
                s,
                row_off=c.rank * b,
                col_off=owner * b,
                keys=c.keys,
                neg=c.neg,
                rows=rows,
                rows_init=j == 0,
                cols=part,
                cols_init=True,
            )
            # The accumulator of this block (the previous ranks' rows) arrives one hop behind.
            _wait(acc_reqs)
            if acc is not None:
                c.kern.launch_merge(
                    part, acc.slots(), False, c.kern.geometry(img_l.shape[1], dev, c.tiles)
                )
            bufs, acc_reqs = _post_shift(part.tensors(), c.group, c.rank, c.world)
            acc = part.with_tensors(bufs)
            _wait(reqs)
            if reqs:
                blk = nxt_blk
        _wait(acc_reqs)  # after W hops the accumulator back here is this rank's own
        cols = acc
        loss = 0.5 * (rows.ce(c.alpha).mean() + cols.ce(c.alpha).mean())
        neg_t, neg_i = _negatives(rows, cols, slice(None), c.neg, b, dev)
        ctx.c, ctx.scale_device = c, scale.device
        ctx.save_for_backward(img_l, txt_l, s, rows.stats(), cols.stats())
        ctx.mark_non_differentiable(neg_t, neg_i)
        return loss, neg_t, neg_i

    @staticmethod
    def backward(ctx, g_loss, _g1, _g2):
        c = ctx.c
        img_l, txt_l, s, rstat, cstat = ctx.saved_tensors
        b, d = img_l.shape
        teacher = c.tI_l is not None
        coef, bw = _coefs(g_loss, c.group, c.world, b, c.rank)
        need_i, need_t, need_s = ctx.needs_input_grad[:3]
        f32 = dict(dtype=torch.float32, device=img_l.device)
        dI = torch.zeros((b, d), **f32) if need_i else None
        ds = torch.zeros((), **f32)
        blk = [txt_l.detach(), c.ids_l, cstat] + ([c.tT_l] if teacher else [])
        acc, acc_reqs = None, []
        for j in range(c.world):
            reqs = []
            if j < c.world - 1:
                nxt_blk, reqs = _post_shift(blk, c.group, c.rank, c.world)
            owner = (c.rank - j) % c.world
            dT = torch.zeros((b, d), **f32) if need_t else None
            dsc = torch.zeros(b, **f32) if need_s else None
            bcoef = bw[owner].expand(b).contiguous()
            ds = ds + backward_block(
                c.kern,
                c.tiles,
                img_l,
                blk[0],
                c.tI_l,
                blk[3] if teacher else None,
                c.ids_l,
                blk[1],
                s,
                rstat,
                blk[2],
                coef,
                bcoef,
                c.alpha,
                dq=dI,
                dk=dT,
                ds_col=dsc,
                need_ds=need_s,
            )
            part = [t for t in (dT, dsc) if t is not None]
            _wait(acc_reqs)  # this block's dT / ds accumulator, one hop behind
            if acc is not None:
                for p, a in zip(part, acc):
                    p += a
            acc, acc_reqs = _post_shift(part, c.group, c.rank, c.world) if part else ([], [])
            _wait(reqs)
            if reqs:
                blk = nxt_blk
        _wait(acc_reqs)
        it = iter(acc)
        d_txt = next(it).to(txt_l.dtype) if need_t else None
        d_s = (ds + next(it).sum()).to(ctx.scale_device) if need_s else None
        return dI.to(img_l.dtype) if need_i else None, d_txt, d_s, None


def fused_contrastive(
    kern,
    image_feat,
    text_feat,
    logit_scale,
    *,
    image_ids,
    teacher_image_feat,
    teacher_text_feat,
    distill_alpha,
    group,
    keys,
    neg,
    mode,
    tiles,
):
    """(loss, neg_text_for_image, neg_image_for_text) through the tiled kernels of ``kern``."""
    rank, world = dist_info(group)
    b = image_feat.shape[0]
    if world * b >= _INT32_MAX:
        raise ValueError(f"contrastive_loss: global batch {world * b} exceeds the int32 indices")
    dev = image_feat.device
    img = image_feat.contiguous()
    txt = text_feat.contiguous()
    if image_ids is None:
        ids_l = torch.arange(rank * b, (rank + 1) * b, device=dev)
    else:
        ids_l = image_ids.to(device=dev, dtype=torch.long).contiguous()
    teacher = distill_alpha > 0
    tI_l = teacher_image_feat.detach().to(img.dtype).contiguous() if teacher else None
    tT_l = teacher_text_feat.detach().to(img.dtype).contiguous() if teacher else None
    c = _Ctx(kern, tiles, ids_l, tI_l, tT_l, float(distill_alpha), keys, neg, rank, world, group)
    fn = FusedRing if mode == "ring" and world > 1 else FusedGather
    return fn.apply(img, txt, logit_scale.reshape(()), c)
