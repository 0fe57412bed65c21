"""Two-stage retrieval with an R2D2 model: pre-rank by embedding cosine, re-rank the top k with
both cross encoders; the re-rank score is (p_ti + p_it) / 2 + cosine, candidates outside the top
k keep cosine - 2 (below every re-ranked one, in pre-rank order). The re-ranking loop itself is
``r2d2.engine.tasks.rerank.rerank`` (shared with the evaluation task, sharded over ranks).

Unimodal token states are computed once per image / text and cached, so the cross encoders are
the only per-pair cost.
"""

from __future__ import annotations

import torch

from r2d2.engine.tasks.rerank import rerank, topk_stable


class _CachedPairScorer:
    """p(match) of (image, text) index pairs from cached encoder states."""

    def __init__(self, model, V, T, mask):
        self.model, self.V, self.T, self.mask = model, V, T, mask

    @torch.no_grad()
    def __call__(self, img_idx, txt_idx):
        lt, li = self.model.itm_logits(self.V[img_idx], self.T[txt_idx], self.mask[txt_idx])
        return (lt.softmax(-1)[:, 1] + li.softmax(-1)[:, 1]) / 2


def _batched(fn, n: int, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(s, min(n, s + batch_size)) for s in range(0, n, batch_size)])


@torch.no_grad()
def retrieve(model, images: torch.Tensor, texts, attention_mask: torch.Tensor | None = None, *,
             top_k: int = 16, batch_size: int = 64, pair_batch: int = 256, group=None) -> dict:
    """Retrieve between ``images`` ``[N, 3, H, W]`` and ``texts`` (``list[str]`` with a tokenizer
    attached to the model, or ``input_ids`` ``[M, L]`` with ``attention_mask``).

    Returns a dict of tensors:
        sim_i2t        [N, M] pre-rank cosine similarity
        pre_i2t / pre_t2i    [N, k] / [M, k] pre-rank top-k indices
        i2t / t2i      [N, M] / [M, N] final scores (re-ranked top k, the rest cosine - 2)
        i2t_indices / t2i_indices   [N, k] / [M, k] final top-k indices
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor [N, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: expected an int >= 1")
    was_training = model.training
    model.eval()
    try:
        dev = model.device
        ids, mask = model._text_inputs(texts, attention_mask)
        ids, mask = ids.to(dev), mask.to(dev).bool()
        V = _batched(lambda s, e: model.image_tokens(images[s:e].to(dev)), len(images), batch_size)
        T = _batched(lambda s, e: model.text_tokens(ids[s:e], mask[s:e]), len(ids), batch_size)
        sim = model.image_embed(V) @ model.text_embed(T).t()
        k = min(top_k, sim.shape[1]), min(top_k, sim.shape[0])
        out = {"sim_i2t": sim, "pre_i2t": topk_stable(sim, k[0])[1], "pre_t2i": topk_stable(sim.t(), k[1])[1]}
        if not model.config.has_cross:  # PRD2: pre-ranking is the ranking
            out.update(i2t=sim, t2i=sim.t(), i2t_indices=out["pre_i2t"], t2i_indices=out["pre_t2i"])
            return out
        scorer = _CachedPairScorer(model, V, T, mask)
        for d, kk in (("i2t", k[0]), ("t2i", k[1])):
            scores = rerank(sim, scorer, top_k, d, pair_batch=pair_batch, group=group)
            out[d], out[f"{d}_indices"] = scores, topk_stable(scores, kk)[1]
        return out
    finally:
        model.train(was_training)
