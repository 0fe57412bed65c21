"""Two-stage retrieval with an R2D2 model: pre-rank by embedding cosine, re-rank the top k with
both cross encoders; the re-rank score is (p_ti + p_it) / 2 + cosine, candidates outside the top
k keep cosine - 2 (below every re-ranked one, in pre-rank order). The re-ranking loop itself is
``r2d2.engine.tasks.rerank.rerank`` (shared with the evaluation task).

Distribution (one process works unchanged): rank ``r`` encodes only its shard of the images and
of the texts (``shard_rows``). The embeddings are all-gathered, so every rank holds the full
pre-rank matrix. For the ranking stage a rank keeps the token states of *its* images and the
all-gathered token states of every text (texts are short: 64 tokens), and scores exactly the
pairs whose image it encoded: its image rows for image-to-text, and, for text-to-image, every
text's candidates that fall in its image shard. So neither the images nor their token states
(ViT-L: 257 x 1024 values per image) are ever replicated; the ``[rows, k]`` scores are summed
over the ranks. Token states are computed once per image / text and cached for the cross
encoders, which are the only per-pair cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from r2d2.dist import dist_info
from r2d2.engine.tasks.rerank import encode_shard, gather_shards, rerank, shard_rows, topk_stable


class _ShardPairScorer:
    """p(match) of (image, text) index pairs: the images from this rank's shard ``[i0, i1)`` of
    cached image states, the texts from the cached states of all texts."""

    def __init__(self, model, V, i0: int, T, mask):
        self.model, self.V, self.i0, self.T, self.mask = model, V, i0, T, mask

    @torch.no_grad()
    def __call__(self, img_idx, txt_idx):
        local = img_idx - self.i0
        if local.numel() and (local.min() < 0 or local.max() >= self.V.shape[0]):
            raise RuntimeError("re-ranking asked this rank for an image outside its shard")
        lt, li = self.model.itm_logits(self.V[local], self.T[txt_idx], self.mask[txt_idx])
        return (lt.softmax(-1)[:, 1] + li.softmax(-1)[:, 1]) / 2


def retrieve_sharded(
    model,
    load_images: Callable[[int, int], torch.Tensor],
    n_images: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    top_k: int = 16,
    batch_size: int = 64,
    pair_batch: int = 256,
    group=None,
    rerank_stage: bool = True,
    i2t_rows: torch.Tensor | None = None,
    progress: bool = False,
) -> dict:
    """:func:`retrieve` on lazily loaded images: ``load_images(start, end)`` returns the images
    ``[end - start, 3, H, W]``; each rank calls it only for its own shard.

    ``rerank_stage`` False (or a model without cross encoders, PRD2) returns the pre-ranking
    as the ranking. ``i2t_rows``: re-rank only these image rows image-to-text (the others keep
    their pre-rank scores), for protocols that measure that direction on a subset of the images.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: expected an int >= 1")
    if n_images < 1 or input_ids.shape[0] < 1:
        raise ValueError(
            f"retrieval needs at least one image and one text, got {n_images} and "
            f"{input_ids.shape[0]}"
        )
    was_training = model.training
    model.eval()
    try:
        dev = model.device
        rank, world = dist_info(group)
        ids, mask = input_ids.to(dev), attention_mask.to(dev).bool()
        n_txt = ids.shape[0]
        cross = rerank_stage and model.config.has_cross
        i0, i1 = shard_rows(n_images, rank, world)
        V_parts: list[
            torch.Tensor
        ] = []  # this rank's image token states, kept for the cross encoders

        def image_batch(s: int, e: int) -> torch.Tensor:
            v = model.image_tokens(load_images(s, e).to(dev))
            if cross and i0 <= s < i1:  # not encode_shard's one-row probe of an empty shard
                V_parts.append(v)
            return model.image_embed(v)

        img_emb = gather_shards(
            encode_shard(image_batch, n_images, batch_size, group), n_images, group
        )
        t_local = encode_shard(
            lambda s, e: model.text_tokens(ids[s:e], mask[s:e]), n_txt, batch_size, group
        )
        txt_emb = gather_shards(model.text_embed(t_local), n_txt, group)
        sim = img_emb @ txt_emb.t()
        k = min(top_k, sim.shape[1]), min(top_k, sim.shape[0])
        out = {
            "sim_i2t": sim,
            "pre_i2t": topk_stable(sim, k[0])[1],
            "pre_t2i": topk_stable(sim.t(), k[1])[1],
        }
        if not cross:  # PRD2 / pre-rank only: pre-ranking is the ranking
            out.update(i2t=sim, t2i=sim.t(), i2t_indices=out["pre_i2t"], t2i_indices=out["pre_t2i"])
            return out
        T = gather_shards(t_local, n_txt, group)
        V = torch.cat(V_parts) if V_parts else sim.new_zeros(0)  # empty shard: never asked to score
        scorer = _ShardPairScorer(model, V, i0, T, mask)
        for d, kk, shard, rows in (
            ("i2t", k[0], "rows", i2t_rows),
            ("t2i", k[1], "candidates", None),
        ):
            scores = rerank(
                sim,
                scorer,
                top_k,
                d,
                pair_batch=pair_batch,
                group=group,
                progress=progress,
                shard=shard,
                rows=rows,
            )
            out[d], out[f"{d}_indices"] = scores, topk_stable(scores, kk)[1]
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def retrieve(
    model,
    images: torch.Tensor,
    texts,
    attention_mask: torch.Tensor | None = None,
    *,
    top_k: int = 16,
    batch_size: int = 64,
    pair_batch: int = 256,
    group=None,
) -> dict:
    """Retrieve between ``images`` ``[N, 3, H, W]`` and ``texts`` (``list[str]`` with a tokenizer
    attached to the model, or ``input_ids`` ``[M, L]`` with ``attention_mask``).

    Distributed, every rank passes the same inputs and encodes only its shard (module doc).

    Returns a dict of tensors:
        sim_i2t        [N, M] pre-rank cosine similarity
        pre_i2t / pre_t2i    [N, k] / [M, k] pre-rank top-k indices
        i2t / t2i      [N, M] / [M, N] final scores (re-ranked top k, the rest cosine - 2)
        i2t_indices / t2i_indices   [N, k] / [M, k] final top-k indices
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(
            f"images must be a tensor [N, 3, H, W], got {getattr(images, 'shape', type(images))}"
        )
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: expected an int >= 1")
    ids, mask = model._text_inputs(texts, attention_mask)
    return retrieve_sharded(
        model,
        lambda s, e: images[s:e],
        len(images),
        ids,
        mask,
        top_k=top_k,
        batch_size=batch_size,
        pair_batch=pair_batch,
        group=group,
    )
