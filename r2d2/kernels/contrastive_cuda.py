"""GCPR contrastive loss, CUDA launcher: the kernel API of contrastive_triton.py (``RowState``,
``Tiles``, ``forward_block``, ``backward_block``, ``ds_buffer``) over the compiled ops
``torch.ops.r2d2.contrastive_fwd_block`` / ``contrastive_bwd_block`` (csrc/contrastive/), so the
autograd and the gather / ring drivers of contrastive_dist.py serve both backends.

The CUDA tiles are fixed at compile time (16 rows x 64 columns, 64-wide feature chunks;
contrastive_kernel.h), so ``Tiles`` carries nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2d2.kernels.contrastive_dist import RowState  # noqa: F401  (part of the kernel API)

TILE_ROWS = 16  # kTileRows in csrc/contrastive/contrastive_kernel.h (the ds buffer's granularity)


@dataclass(frozen=True)
class Tiles:
    """No tunables: the CUDA kernels' tiles are compile-time constants."""


def forward_block(st, q, k, tq, tk, rid, cid, s, *, row_off: int, col_off: int, key: int,
                  neg: bool, tiles: Tiles) -> None:
    torch.ops.r2d2.contrastive_fwd_block(q, k, tq, tk, rid, cid, s, st.m, st.l, st.hs, st.cnt,
                                         st.tm, st.tl, st.tw, st.gv, st.gi, row_off, col_off,
                                         key, neg)


def backward_block(q, k, tq, tk, rid, cid, s, g, lse, tlse, icnt, alpha: float, *, dq, dk, ds,
                   tiles: Tiles) -> None:
    torch.ops.r2d2.contrastive_bwd_block(q, k, tq, tk, rid, cid, s, g, lse, tlse, icnt,
                                         float(alpha), dq, dk, ds)


def ds_buffer(b: int, d: int, device, tiles: Tiles) -> torch.Tensor:
    return torch.zeros((b + TILE_ROWS - 1) // TILE_ROWS, device=device, dtype=torch.float32)
