"""GCPR contrastive loss, CUDA launcher: the kernel API of contrastive/triton.py (``geometry``,
``launch_fwd``, ``launch_merge``, ``launch_bwd_rows``, ``launch_bwd_cols``; see
distributed.py) over the compiled ops ``torch.ops.r2d2.contrastive_{fwd, merge, bwd_rows,
bwd_cols}`` (csrc/contrastive/), so the autograd and the gather / ring drivers serve both
backends. Same design as the Triton kernels (one pass over the tiles for both directions, private
column-partial slots merged afterwards, two backward kernels), on CUDA cores with fp32 math: the
tiles are compile-time constants of csrc/contrastive/contrastive_kernel.h (16 x 64 logits,
64-wide feature chunks). The fake (shape) functions registered here let torch.compile trace the
ops; they mutate their buffers and return nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r2d2 import _ext

TILE_ROWS = 16  # kTileRows: rows per forward tile / rows-backward program
TILE_COLS = 64  # kTileCols: columns per forward tile / streamed by the rows-backward program
COL_OWN = 16  # kColOwn: columns per cols-backward program (it streams 64-row tiles)


@dataclass(frozen=True)
class Tiles:
    """The tiles are compile-time constants; only the grid budget is tunable."""

    programs: int | None = None
    """Target number of blocks per kernel (default 4 x SMs)."""
    budget_bytes: int = 256 << 20
    """Cap of each partial-statistics / split-gradient buffer."""


@dataclass(frozen=True)
class Geometry:
    programs: int
    budget_bytes: int
    block_r: int = TILE_ROWS
    block_c: int = TILE_COLS
    bwd_rows_tile: tuple[int, int] = (TILE_ROWS, TILE_COLS)  # (rows owned, columns streamed)
    bwd_cols_tile: tuple[int, int] = (COL_OWN, TILE_COLS)  # (columns owned, rows streamed)


def geometry(d: int, device, tiles: Tiles) -> Geometry:
    progs = tiles.programs
    if progs is None:
        progs = 4 * torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return Geometry(progs, tiles.budget_bytes)


def launch_fwd(
    q, k, tq, tk, rid, cid, s, rpart, cpart, tpc, row_off, col_off, keys, neg, geo
) -> None:
    torch.ops.r2d2.contrastive_fwd(
        q,
        k,
        tq,
        tk,
        rid,
        cid,
        s,
        rpart.f,
        rpart.gi,
        cpart.f,
        cpart.gi,
        tpc,
        row_off,
        col_off,
        keys[0],
        keys[1],
        neg,
    )


def launch_merge(state, part, init: bool, geo) -> None:
    torch.ops.r2d2.contrastive_merge(
        state.f, state.gi, part.f, part.gi, state.teacher, state.neg, init
    )


def launch_bwd_rows(
    q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, alpha, dq_part, ds_part, tps, geo
) -> None:
    torch.ops.r2d2.contrastive_bwd_rows(
        q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, float(alpha), dq_part, ds_part, tps
    )


def launch_bwd_cols(
    q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, alpha, dk_part, dsc_part, tps, geo
) -> None:
    torch.ops.r2d2.contrastive_bwd_cols(
        q, k, tq, tk, rid, cid, s, rstat, cstat, coef, bcoef, float(alpha), dk_part, dsc_part, tps
    )


def _register_fakes() -> None:
    """Fake (meta) functions so torch.compile / FakeTensor can trace the compiled ops: each
    mutates buffers declared ``Tensor(a!)`` in its schema and returns nothing."""
    if not _ext.has_op("contrastive_fwd"):
        return

    @torch.library.register_fake("r2d2::contrastive_fwd")
    def _fwd_fake(
        q,
        k,
        tq,
        tk,
        rid,
        cid,
        scale,
        row_part,
        row_gi,
        col_part,
        col_gi,
        tpc,
        row_off,
        col_off,
        key_row,
        key_col,
        neg,
    ):
        return None

    @torch.library.register_fake("r2d2::contrastive_merge")
    def _merge_fake(state, state_gi, part, part_gi, teacher, neg, init):
        return None

    @torch.library.register_fake("r2d2::contrastive_bwd_rows")
    def _rows_fake(q, k, tq, tk, rid, cid, scale, rstat, cstat, coef, bcoef, alpha, dq, ds, tps):
        return None

    @torch.library.register_fake("r2d2::contrastive_bwd_cols")
    def _cols_fake(q, k, tq, tk, rid, cid, scale, rstat, cstat, coef, bcoef, alpha, dk, dsc, tps):
        return None


_register_fakes()
