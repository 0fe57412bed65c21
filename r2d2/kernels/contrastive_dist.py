"""Fused GCPR: autograd over the tiled kernels, single process and distributed (gather / ring).

The tiled kernels (contrastive_triton.py; any module with the same ``forward_block`` /
``backward_block`` / ``RowState`` / ``ds_buffer`` / ``Tiles`` API plugs in) handle "local rows
against one block of columns" and keep a per-row streaming state. This module decides where the
column blocks come from:

  gather  all-gather image/text features (with grad: ``r2d2.dist.gather``), ids and teacher
          features, then one kernel call per direction over all B columns. Backward returns the
          column gradients ``[B, d]`` to the gather, whose backward all-reduces them and hands each
          rank its slice. Extra memory: the gathered features, 2 B d (+2 B d with a teacher).
  ring    the (image, text, ids, teacher) block of each rank travels round the ring with
          isend/irecv; the transfer of the next block is posted before the current block is
          computed, so they overlap. Backward sends the blocks round again, and their fp32
          column-gradient accumulators one hop behind (each rank computes its contribution while
          the block's accumulator is in flight, then adds it); they reach their owner after W hops.
          Extra memory: two blocks in flight, O(b d), independent of the world size.

Both give exactly the gradients of the eager reference: the local-feature gradient is the local
row term plus the sum over ranks of the column term for this rank's slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r2d2.dist import dist_info, gather


@dataclass
class RowState:
    """Per-row streaming state of one direction, fp32 ``[b]`` (int64 ``gi``); the fields are
    described in contrastive_triton.py and csrc/contrastive/contrastive_kernel.h."""

    m: torch.Tensor
    l: torch.Tensor
    hs: torch.Tensor
    cnt: torch.Tensor
    tm: torch.Tensor
    tl: torch.Tensor
    tw: torch.Tensor
    gv: torch.Tensor
    gi: torch.Tensor

    @classmethod
    def empty(cls, b: int, device) -> "RowState":
        f = dict(device=device, dtype=torch.float32)
        ninf = float("-inf")
        return cls(torch.full((b,), ninf, **f), torch.zeros(b, **f), torch.zeros(b, **f),
                   torch.zeros(b, **f), torch.full((b,), ninf, **f), torch.zeros(b, **f),
                   torch.zeros(b, **f), torch.full((b,), ninf, **f),
                   torch.full((b,), -1, device=device, dtype=torch.int64))

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.l)

    def tlse(self) -> torch.Tensor:
        return self.tm + torch.log(self.tl)

    def row_loss(self, alpha: float) -> torch.Tensor:
        ce = self.lse() - (1.0 - alpha) * self.hs / self.cnt.clamp_min(1.0)
        if alpha > 0:
            ce = ce - alpha * self.tw / self.tl
        return ce


def _state_outputs(st_i, st_t, alpha):
    loss = 0.5 * (st_i.row_loss(alpha).mean() + st_t.row_loss(alpha).mean())
    return loss, st_i.gi.clone(), st_t.gi.clone()


def _saved_stats(st, teacher: bool):
    lse = st.lse()
    tlse = st.tlse() if teacher else torch.zeros_like(lse)
    return lse, tlse, 1.0 / st.cnt.clamp_min(1.0)


class _Ctx:
    """Non-tensor arguments shared by the autograd functions."""

    def __init__(self, kern, ids_l, ids_all, tI_l, tT_l, tI_all, tT_all, alpha, keys, neg, rank,
                 world, group, tiles):
        self.__dict__.update(locals())
        del self.__dict__["self"]


class FusedGather(torch.autograd.Function):
    """Local rows against all columns already gathered (world 1: the columns are the rows)."""

    @staticmethod
    def forward(ctx, img_l, txt_l, img_all, txt_all, scale, c: _Ctx):
        k = c.kern
        b = img_l.shape[0]
        # The scale may live elsewhere (e.g. a CPU scalar); the kernels read it on the device.
        s = scale.detach().float().reshape(1).to(img_l.device).contiguous()
        ctx.scale_device = scale.device
        st_i = k.RowState.empty(b, img_l.device)
        st_t = k.RowState.empty(b, img_l.device)
        teacher = c.tI_l is not None
        k.forward_block(st_i, img_l, txt_all, c.tI_l, c.tT_all, c.ids_l, c.ids_all, s,
                        row_off=c.rank * b, col_off=0, key=c.keys[0], neg=c.neg, tiles=c.tiles)
        k.forward_block(st_t, txt_l, img_all, c.tT_l, c.tI_all, c.ids_l, c.ids_all, s,
                        row_off=c.rank * b, col_off=0, key=c.keys[1], neg=c.neg, tiles=c.tiles)
        loss, neg_t, neg_i = _state_outputs(st_i, st_t, c.alpha)
        ctx.c = c
        ctx.save_for_backward(img_l, txt_l, img_all, txt_all, s, *_saved_stats(st_i, teacher),
                              *_saved_stats(st_t, teacher))
        ctx.mark_non_differentiable(neg_t, neg_i)
        return loss, neg_t, neg_i

    @staticmethod
    def backward(ctx, g_loss, _g1, _g2):
        c = ctx.c
        k = c.kern
        (img_l, txt_l, img_all, txt_all, s,
         lse_i, tlse_i, ic_i, lse_t, tlse_t, ic_t) = ctx.saved_tensors
        b, d = img_l.shape
        g = (g_loss.detach().float() / (2 * b)).reshape(1).contiguous()
        f32 = dict(device=img_l.device, dtype=torch.float32)
        d_img_l, d_txt_l = torch.zeros(b, d, **f32), torch.zeros(b, d, **f32)
        d_img_all = torch.zeros(img_all.shape, **f32)
        d_txt_all = torch.zeros(txt_all.shape, **f32)
        ds_i = k.ds_buffer(b, d, img_l.device, c.tiles)
        ds_t = k.ds_buffer(b, d, img_l.device, c.tiles)
        k.backward_block(img_l, txt_all, c.tI_l, c.tT_all, c.ids_l, c.ids_all, s, g, lse_i, tlse_i,
                         ic_i, c.alpha, dq=d_img_l, dk=d_txt_all, ds=ds_i, tiles=c.tiles)
        k.backward_block(txt_l, img_all, c.tT_l, c.tI_all, c.ids_l, c.ids_all, s, g, lse_t, tlse_t,
                         ic_t, c.alpha, dq=d_txt_l, dk=d_img_all, ds=ds_t, tiles=c.tiles)
        ds = (ds_i.sum() + ds_t.sum()).to(ctx.scale_device)
        return (d_img_l.to(img_l.dtype), d_txt_l.to(txt_l.dtype), d_img_all.to(img_all.dtype),
                d_txt_all.to(txt_all.dtype), ds, None)


def _peers(group, rank, world):
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    return nxt, prv


def _post_shift(tensors, group, rank, world):
    """Send ``tensors`` to the next rank and receive the previous rank's into new buffers.
    Returns (buffers, requests); wait on the requests before reading the buffers."""
    nxt, prv = _peers(group, rank, world)
    bufs = [torch.empty_like(t) for t in tensors]
    # Plain isend/irecv rather than batch_isend_irecv, which not every gloo build coalesces.
    reqs = [dist.isend(t.contiguous(), nxt, group=group) for t in tensors]
    reqs += [dist.irecv(r, prv, group=group) for r in bufs]
    return bufs, reqs


def _wait(reqs):
    for r in reqs:
        r.wait()


class FusedRing(torch.autograd.Function):
    """Local rows against every rank's columns, the column blocks passed round a ring."""

    @staticmethod
    def forward(ctx, img_l, txt_l, scale, c: _Ctx):
        k = c.kern
        b = img_l.shape[0]
        # The scale may live elsewhere (e.g. a CPU scalar); the kernels read it on the device.
        s = scale.detach().float().reshape(1).to(img_l.device).contiguous()
        ctx.scale_device = scale.device
        st_i = k.RowState.empty(b, img_l.device)
        st_t = k.RowState.empty(b, img_l.device)
        teacher = c.tI_l is not None
        blk = [img_l.detach(), txt_l.detach(), c.ids_l] + ([c.tI_l, c.tT_l] if teacher else [])
        for j in range(c.world):
            reqs = []
            if j < c.world - 1:   # prefetch the next block while this one is computed
                nxt_blk, reqs = _post_shift(blk, c.group, c.rank, c.world)
            owner = (c.rank - j) % c.world
            I, T, ids = blk[0], blk[1], blk[2]
            tI, tT = (blk[3], blk[4]) if teacher else (None, None)
            k.forward_block(st_i, img_l, T, c.tI_l, tT, c.ids_l, ids, s, row_off=c.rank * b,
                            col_off=owner * b, key=c.keys[0], neg=c.neg, tiles=c.tiles)
            k.forward_block(st_t, txt_l, I, c.tT_l, tI, c.ids_l, ids, s, row_off=c.rank * b,
                            col_off=owner * b, key=c.keys[1], neg=c.neg, tiles=c.tiles)
            if reqs:
                _wait(reqs)
                blk = nxt_blk
        loss, neg_t, neg_i = _state_outputs(st_i, st_t, c.alpha)
        ctx.c = c
        ctx.save_for_backward(img_l, txt_l, s, *_saved_stats(st_i, teacher),
                              *_saved_stats(st_t, teacher))
        ctx.mark_non_differentiable(neg_t, neg_i)
        return loss, neg_t, neg_i

    @staticmethod
    def backward(ctx, g_loss, _g1, _g2):
        c = ctx.c
        k = c.kern
        img_l, txt_l, s, lse_i, tlse_i, ic_i, lse_t, tlse_t, ic_t = ctx.saved_tensors
        b, d = img_l.shape
        teacher = c.tI_l is not None
        g = (g_loss.detach().float() / (2 * b)).reshape(1).contiguous()
        f32 = dict(device=img_l.device, dtype=torch.float32)
        d_img, d_txt = torch.zeros(b, d, **f32), torch.zeros(b, d, **f32)
        ds_i = k.ds_buffer(b, d, img_l.device, c.tiles)
        ds_t = k.ds_buffer(b, d, img_l.device, c.tiles)
        blk = [img_l.detach(), txt_l.detach(), c.ids_l] + ([c.tI_l, c.tT_l] if teacher else [])
        # Column gradients of the block in hand travel with it, one hop behind: this rank's
        # contribution is computed into a fresh buffer while the accumulator of the same block
        # (the sum of the previous ranks' contributions) is still in flight, then added. After W
        # hops every accumulator is back with its owner.
        acc_reqs, acc_in = [], None
        for j in range(c.world):
            reqs = []
            if j < c.world - 1:   # prefetch the next block while this one is computed
                nxt_blk, reqs = _post_shift(blk, c.group, c.rank, c.world)
            I, T, ids = blk[0], blk[1], blk[2]
            tI, tT = (blk[3], blk[4]) if teacher else (None, None)
            part = [torch.zeros(b, d, **f32), torch.zeros(b, d, **f32)]
            k.backward_block(img_l, T, c.tI_l, tT, c.ids_l, ids, s, g, lse_i, tlse_i, ic_i,
                             c.alpha, dq=d_img, dk=part[1], ds=ds_i, tiles=c.tiles)
            k.backward_block(txt_l, I, c.tT_l, tI, c.ids_l, ids, s, g, lse_t, tlse_t, ic_t,
                             c.alpha, dq=d_txt, dk=part[0], ds=ds_t, tiles=c.tiles)
            _wait(acc_reqs)
            if acc_in is not None:
                part[0] += acc_in[0]
                part[1] += acc_in[1]
            acc_in, acc_reqs = part, []
            if c.world > 1:
                acc_in, acc_reqs = _post_shift(part, c.group, c.rank, c.world)
            _wait(reqs)
            if reqs:
                blk = nxt_blk
        _wait(acc_reqs)
        acc = acc_in
        d_img += acc[0]
        d_txt += acc[1]
        ds = (ds_i.sum() + ds_t.sum()).to(ctx.scale_device)
        return d_img.to(img_l.dtype), d_txt.to(txt_l.dtype), ds, None


def fused_contrastive(kern, image_feat, text_feat, logit_scale, *, image_ids, teacher_image_feat,
                      teacher_text_feat, distill_alpha, group, keys, neg, mode, tiles):
    """(loss, neg_text_for_image, neg_image_for_text) through the tiled kernels of ``kern``."""
    rank, world = dist_info(group)
    b = image_feat.shape[0]
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
    scale = logit_scale.reshape(())
    if mode == "ring" and world > 1:
        c = _Ctx(kern, ids_l, None, tI_l, tT_l, None, None, float(distill_alpha), keys, neg,
                 rank, world, group, tiles)
        return FusedRing.apply(img, txt, scale, c)
    img_all, txt_all = gather(img, group), gather(txt, group)
    ids_all = gather(ids_l, group, with_grad=False)
    tI_all = gather(tI_l, group, with_grad=False) if teacher else None
    tT_all = gather(tT_l, group, with_grad=False) if teacher else None
    c = _Ctx(kern, ids_l, ids_all, tI_l, tT_l, tI_all, tT_all, float(distill_alpha), keys, neg,
             rank, world, group, tiles)
    return FusedGather.apply(img, txt, img_all, txt_all, scale, c)
