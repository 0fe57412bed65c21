"""Two-stage ranking: pre-rank by embedding similarity, re-rank the top k with a pair scorer.

For each query row of ``sim`` (images for image-to-text, texts for text-to-image):

    top k candidates  c_1..c_k  by pre-rank score (stable: ties -> lower index first)
    final[q, c_j]     = p(q, c_j) + sim[q, c_j]       p = (p_ti + p_it) / 2 in [0, 1]
    final[q, c]       = sim[q, c] - OUTSIDE_SHIFT     for c outside the top k

``OUTSIDE_SHIFT`` = 2: since p >= 0, every re-ranked score is >= its own cosine >= the cosine of
any candidate outside the top k, which is > that cosine - 2. So the top k stay above the rest
(the official code writes -100 there) while the rest keep their pre-rank order, which makes the
matrix usable for recall at any cut-off and makes "re-ranking only permutes the top k" exact.

Cost and distribution: the cross encoders score ``k`` pairs per query row, the dominant cost of
evaluation. Every rank computes the (cheap) top k of every row; the pairs are then split over the
ranks in one of two ways (``shard``):

``"rows"``        a rank scores the pairs of its contiguous shard of query rows
                  (``shard_rows(Q, rank, world)``);
``"candidates"``  a rank scores the pairs whose *candidate* lies in its contiguous shard of
                  candidates (``shard_rows(C, rank, world)``).

``inference.retrieve`` uses ``rows`` for image-to-text and ``candidates`` for text-to-image, so
every pair is scored by the rank that encoded (and holds the token states of) its image. A rank
scores its pairs in batches of ``pair_batch``; the ``[Q, k]`` probabilities, zero where another
rank scored, are summed over the ranks (one ``all_reduce``; each entry has exactly one non-zero
term, so the sum is exact), and every rank ends with the full matrix. One process works
unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from r2d2.dist import dist_info, gather

OUTSIDE_SHIFT = 2.0


class PairScorer(Protocol):
    """Match probability of (image, text) index pairs: ``(img_idx [P], txt_idx [P]) -> [P]``."""

    def __call__(self, img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor: ...


def topk_stable(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top k (values, indices) with ties broken toward the lower index, the order
    ``r2d2.engine.metrics`` uses (``torch.topk`` leaves tie order unspecified)."""
    idx = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    return sim.gather(1, idx), idx


def shard_rows(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, end) slice of ``n_rows`` for ``rank``; the last shards may be short or
    empty."""
    per = math.ceil(n_rows / world) if n_rows else 0
    start = min(rank * per, n_rows)
    return start, min(start + per, n_rows)


@torch.no_grad()
def encode_shard(
    fn: Callable[[int, int], torch.Tensor], n: int, batch_size: int, group=None
) -> torch.Tensor:
    """This rank's rows ``shard_rows(n, rank, world)`` of ``cat(fn(s, e) for batches)``.

    ``fn(start, end)`` returns ``[end - start, ...]``. An empty shard (more ranks than rows) still
    returns a ``[0, ...]`` tensor of the right trailing shape and dtype (from a one-row probe), so
    it can take part in :func:`gather_shards`."""
    if n < 1:
        raise ValueError("encode_shard: nothing to encode (n = 0)")
    rank, world = dist_info(group)
    start, end = shard_rows(n, rank, world)
    parts = [fn(s, min(s + batch_size, end)) for s in range(start, end, batch_size)]
    return torch.cat(parts) if parts else fn(0, 1)[:0]


def gather_shards(local: torch.Tensor, n: int, group=None) -> torch.Tensor:
    """``[n, ...]``: every rank's :func:`encode_shard` result, in row order, on every rank.

    Shards are padded to ``ceil(n / world)`` rows for the all-gather (only the last shards are
    short, so the real rows are the first ``n``)."""
    _, world = dist_info(group)
    if world == 1:
        return local
    per = math.ceil(n / world)
    if per - local.shape[0]:
        local = torch.cat([local, local.new_zeros(per - local.shape[0], *local.shape[1:])])
    return gather(local.contiguous(), group, with_grad=False)[:n]


@torch.no_grad()
def sharded_encode(
    fn: Callable[[int, int], torch.Tensor], n: int, batch_size: int, group=None
) -> torch.Tensor:
    """``cat(fn(s, e) for batches)`` over all ``n`` rows, each rank computing a shard."""
    return gather_shards(encode_shard(fn, n, batch_size, group), n, group)


SHARDS = ("rows", "candidates")


@torch.no_grad()
def rerank(
    sim_i2t: torch.Tensor,
    scorer: PairScorer,
    k: int,
    direction: str,
    pair_batch: int = 256,
    group=None,
    progress: bool = False,
    shard: str = "rows",
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two-stage scores for one direction.

    Args:
        sim_i2t: ``[n_img, n_txt]`` pre-rank similarity, identical on every rank.
        scorer: see :class:`PairScorer`; called with global index tensors on ``sim_i2t``'s device.
        k: candidates re-ranked per query (clamped to the number of candidates).
        direction: ``"i2t"`` (rows = images, result ``[n_img, n_txt]``) or ``"t2i"`` (rows =
            texts, result ``[n_txt, n_img]``).
        pair_batch: pairs per scorer call (bounds cross-encoder memory).
        group: process group to shard over (default: the world when distributed).
        progress: a tqdm bar on rank 0.
        shard: how the pairs are split over ranks, ``"rows"`` or ``"candidates"`` (module doc).
        rows: optional query-row indices to re-rank; the other rows are returned as their plain
            pre-rank scores (used where a direction is measured on a subset only, e.g. the
            images a MUGE query names).
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    if sim_i2t.dim() != 2:
        raise ValueError(f"sim_i2t must be [n_img, n_txt], got shape {tuple(sim_i2t.shape)}")
    if k < 1 or pair_batch < 1:
        raise ValueError(f"k ({k}) and pair_batch ({pair_batch}) must be >= 1")
    sim = sim_i2t.float() if direction == "i2t" else sim_i2t.float().t()
    n_q, n_c = sim.shape
    k = min(k, n_c)
    rank, world = dist_info(group)
    active = torch.ones(n_q, dtype=torch.bool, device=sim.device)
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=sim.device).reshape(-1)
        if rows.numel() and (rows.min() < 0 or rows.max() >= n_q):
            raise ValueError(f"rows: index out of range [0, {n_q})")
        active = torch.zeros_like(active)
        active[rows] = True

    top_val, top_idx = topk_stable(sim, k)  # [n_q, k], every rank
    if shard == "rows":
        start, end = shard_rows(n_q, rank, world)
        mine = torch.zeros_like(active)
        mine[start:end] = True
        mine = (mine & active)[:, None].expand(-1, k)
    else:
        start, end = shard_rows(n_c, rank, world)
        mine = active[:, None] & (top_idx >= start) & (top_idx < end)
    q_idx, slot = mine.nonzero(as_tuple=True)  # row-major: query by query
    c_idx = top_idx[q_idx, slot]
    img_idx, txt_idx = (q_idx, c_idx) if direction == "i2t" else (c_idx, q_idx)
    probs = torch.zeros(n_q, k, dtype=torch.float32, device=sim.device)
    flat = torch.empty(q_idx.numel(), dtype=torch.float32, device=sim.device)
    steps = range(0, q_idx.numel(), pair_batch)
    if progress and rank == 0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"re-rank {direction} (k={k})", unit="batch")
    for s in steps:
        p = scorer(img_idx[s : s + pair_batch], txt_idx[s : s + pair_batch])
        flat[s : s + pair_batch] = p.detach().float().reshape(-1).to(sim.device)
    probs[q_idx, slot] = flat
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(probs, op=dist.ReduceOp.SUM, group=group)

    out = sim - OUTSIDE_SHIFT
    out.scatter_(1, top_idx, probs + top_val)
    if rows is not None:
        out[~active] = sim[~active]
    return out
