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
evaluation. Query rows are split into contiguous shards, one per rank (``ceil(Q / world)`` rows
each); a rank scores its shard in batches of ``pair_batch`` pairs and the ``[rows, k]`` indices
and scores are all-gathered (gloo or NCCL), so every rank ends with the full matrix. Works
unchanged with one process.
"""

from __future__ import annotations

import math
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
def rerank(
    sim_i2t: torch.Tensor,
    scorer: PairScorer,
    k: int,
    direction: str,
    pair_batch: int = 256,
    group=None,
    progress: bool = False,
) -> torch.Tensor:
    """Two-stage scores for one direction.

    Args:
        sim_i2t: ``[n_img, n_txt]`` pre-rank similarity, identical on every rank.
        scorer: see :class:`PairScorer`; called with index tensors on ``sim_i2t``'s device.
        k: candidates re-ranked per query (clamped to the number of candidates).
        direction: ``"i2t"`` (rows = images, result ``[n_img, n_txt]``) or ``"t2i"`` (rows =
            texts, result ``[n_txt, n_img]``).
        pair_batch: pairs per scorer call (bounds cross-encoder memory).
        group: process group to shard over (default: the world when distributed).
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    if sim_i2t.dim() != 2:
        raise ValueError(f"sim_i2t must be [n_img, n_txt], got shape {tuple(sim_i2t.shape)}")
    if k < 1 or pair_batch < 1:
        raise ValueError(f"k ({k}) and pair_batch ({pair_batch}) must be >= 1")
    sim = sim_i2t.float() if direction == "i2t" else sim_i2t.float().t()
    n_q, n_c = sim.shape
    k = min(k, n_c)
    rank, world = dist_info(group)
    start, end = shard_rows(n_q, rank, world)
    per = math.ceil(n_q / world) if n_q else 0

    top_val, top_idx = topk_stable(sim[start:end], k)                  # [rows, k]
    q_idx = torch.arange(start, end, device=sim.device)[:, None].expand(-1, k).reshape(-1)
    c_idx = top_idx.reshape(-1)
    img_idx, txt_idx = (q_idx, c_idx) if direction == "i2t" else (c_idx, q_idx)
    probs = torch.empty(img_idx.numel(), dtype=torch.float32, device=sim.device)
    steps = range(0, img_idx.numel(), pair_batch)
    if progress and rank == 0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"re-rank {direction} (k={k})", unit="batch")
    for s in steps:
        p = scorer(img_idx[s:s + pair_batch], txt_idx[s:s + pair_batch])
        probs[s:s + pair_batch] = p.detach().float().reshape(-1).to(sim.device)
    local = probs.view(-1, k) + top_val                                   # [rows, k]

    # Pad every shard to `per` rows so all ranks all-gather equal shapes; padded rows are dropped.
    pad = per - (end - start)
    if pad:
        local = torch.cat([local, local.new_zeros(pad, k)])
        top_idx = torch.cat([top_idx, top_idx.new_zeros(pad, k)])
    all_scores = gather(local, group, with_grad=False)[:n_q]
    all_idx = gather(top_idx, group, with_grad=False)[:n_q]

    out = sim - OUTSIDE_SHIFT
    out.scatter_(1, all_idx, all_scores)
    return out
