"""Image-text retrieval evaluation with R2D2's two stages (pre-ranking + ranking).

1. Embed every image and text with the dual encoders (batched), ``sim = image_emb @ text_emb.T``.
   Pre-rank only: each rank embeds a shard and the embeddings are all-gathered. With re-ranking,
   ``inference.retrieve`` encodes everything on every rank, since every rank's cross-encoder
   shard needs arbitrary images' and texts' token states.
2. Pre-rank metrics: ``retrieval_metrics(sim)``.
3. Re-rank the top ``k`` of every query row in both directions with the cross encoders
   (``r2d2.engine.tasks.rerank``, sharded over ranks), score = (p_ti + p_it) / 2 + cosine, and
   report the metrics again.

The cross encoders need every image of the set (a text query's top k can be any image), so each
rank keeps all preprocessed images (3 x 224 x 224 x 4 bytes = 0.6 MB per image in fp32) and,
through ``inference.retrieve``, the token states of every image and text on the device (ViT-L:
257 x 1024 floats = 1 MB per image); only the cross-encoder scoring is sharded.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from r2d2.dist import dist_info, gather
from r2d2.engine.metrics import retrieval_metrics
from r2d2.engine.tasks.rerank import shard_rows

# (texts) -> (input_ids [N, L] long, attention_mask [N, L])
Tokenize = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
# (path) -> preprocessed image [3, H, W] float
LoadImage = Callable[[str], torch.Tensor]


@dataclass
class RetrievalSet:
    """Unique images and texts of an evaluation split with the ground truth both ways.

    ``img2txt[i]``: indices of the texts describing image ``i``; ``txt2img[j]``: indices of the
    images text ``j`` describes (one for caption sets; several for a MUGE query, or when two
    images received the identical caption, which is then one text correct for both)."""

    images: list[str]
    image_ids: list[str]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[list[int]]

    @classmethod
    def from_records(cls, records: Sequence) -> RetrievalSet:
        """Group ``Record``s: images by ``image_id`` (first path seen), texts by their string."""
        if not records:
            raise ValueError("RetrievalSet: no records (was every sample skipped?)")
        img_index: dict[str, int] = {}
        txt_index: dict[str, int] = {}
        images, image_ids, texts = [], [], []
        img2txt: list[list[int]] = []
        txt2img: list[list[int]] = []
        for r in records:
            i = img_index.get(r.image_id)
            if i is None:
                i = img_index[r.image_id] = len(images)
                images.append(r.image)
                image_ids.append(r.image_id)
                img2txt.append([])
            j = txt_index.get(r.text)
            if j is None:
                j = txt_index[r.text] = len(texts)
                texts.append(r.text)
                txt2img.append([])
            if j not in img2txt[i]:
                img2txt[i].append(j)
                txt2img[j].append(i)
        return cls(images, image_ids, texts, img2txt, txt2img)


@dataclass
class RetrievalEvalConfig:
    """Settings of the two-stage retrieval evaluation."""

    k: int = 64
    """candidates re-ranked per query (the official configs: 64 for ICR/IQR, 128 for Flickr30k-CNA)"""
    batch_size: int = 64
    """images or texts per dual-encoder call"""
    pair_batch: int = 128
    """(image, text) pairs per cross-encoder call"""
    rerank: bool = True
    """run the cross-encoder stage (False: pre-rank metrics only, as for a PRD2 model)"""
    image_cache_dtype: str = "float32"
    """dtype of the in-memory preprocessed images (the model's input dtype; bfloat16 for a bf16
    model halves the memory)"""
    progress: bool = False
    """show tqdm bars on rank 0"""

    def __post_init__(self) -> None:
        for name in ("k", "batch_size", "pair_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"RetrievalEvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_cache_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError("RetrievalEvalConfig.image_cache_dtype must be float16, bfloat16 or "
                             f"float32, got {self.image_cache_dtype!r}")


@dataclass
class RetrievalResult:
    pre_rank: dict[str, float]
    two_stage: dict[str, float] | None
    n_images: int
    n_texts: int
    k: int
    sim_i2t: torch.Tensor = field(repr=False)
    """pre-rank similarity [n_img, n_txt]"""
    scores_i2t: torch.Tensor | None = field(default=None, repr=False)
    """two-stage scores, image rows [n_img, n_txt] (None without re-ranking)"""
    scores_t2i: torch.Tensor | None = field(default=None, repr=False)
    """two-stage scores, text rows [n_txt, n_img]"""

    def to_dict(self) -> dict:
        return {"n_images": self.n_images, "n_texts": self.n_texts, "k": self.k,
                "pre_rank": self.pre_rank, "pre_rank+rank": self.two_stage}


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def sharded_encode(fn: Callable[[int, int], torch.Tensor], n: int, batch_size: int,
                   group=None) -> torch.Tensor:
    """``cat(fn(s, e) for batches)`` over all ``n`` rows, each rank computing a shard.

    ``fn(start, end)`` returns ``[end - start, E]``. Shards are padded to equal length for the
    all-gather and the padding dropped."""
    rank, world = dist_info(group)
    start, end = shard_rows(n, rank, world)
    per = math.ceil(n / world)
    parts = [fn(s, min(s + batch_size, end)) for s in range(start, end, batch_size)]
    if parts:
        local = torch.cat(parts)
    else:  # an empty shard still has to take part in the all-gather with the right width
        probe = fn(0, 1)
        local = probe.new_zeros(0, probe.shape[1])
    if per - local.shape[0]:
        local = torch.cat([local, local.new_zeros(per - local.shape[0], local.shape[1])])
    return gather(local.contiguous(), group, with_grad=False)[:n]


def load_images(paths: Sequence[str], load_image: LoadImage, dtype: torch.dtype,
                workers: int = 4) -> torch.Tensor:
    """Decode and preprocess ``paths`` into one ``[N, 3, H, W]`` tensor. Threads, because Pillow
    releases the GIL while decoding; order is preserved."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        return torch.stack(list(pool.map(lambda p: load_image(p).to(dtype), paths)))


@torch.no_grad()
def evaluate_retrieval(model, rset: RetrievalSet, tokenize: Tokenize, load_image: LoadImage,
                       cfg: RetrievalEvalConfig | None = None, group=None) -> RetrievalResult:
    """Pre-rank and (unless ``cfg.rerank`` is False or the model has no cross encoders)
    pre-rank + rank metrics of an ``R2D2Model``-like ``model``.

    The two-stage path is ``r2d2.engine.inference.retrieve`` (token states cached once per image
    and text, the re-ranking sharded over ranks by ``rerank``); the pre-rank-only path embeds with
    ``encode_image`` / ``encode_text``, each rank a shard."""
    cfg = cfg or RetrievalEvalConfig()
    was_training = model.training
    model.eval()
    try:
        device = _model_device(model)
        images = load_images(rset.images, load_image, getattr(torch, cfg.image_cache_dtype))
        input_ids, attention_mask = tokenize(rset.texts)
        two = s_i2t = s_t2i = None
        if cfg.rerank and getattr(getattr(model, "config", None), "has_cross", False):
            from r2d2.engine.inference import retrieve

            out = retrieve(model, images, input_ids, attention_mask, top_k=cfg.k,
                           batch_size=cfg.batch_size, pair_batch=cfg.pair_batch, group=group)
            sim, s_i2t, s_t2i = out["sim_i2t"].float().cpu(), out["i2t"].cpu(), out["t2i"].cpu()
            two = retrieval_metrics(s_i2t, rset.img2txt, rset.txt2img, sim_t2i=s_t2i)
        else:
            img_emb = sharded_encode(lambda s, e: model.encode_image(images[s:e].to(device)).float(),
                                     len(rset.images), cfg.batch_size, group)
            txt_emb = sharded_encode(
                lambda s, e: model.encode_text(input_ids[s:e].to(device), attention_mask[s:e].to(device)).float(),
                len(rset.texts), cfg.batch_size, group)
            sim = (img_emb @ txt_emb.t()).cpu()
        pre = retrieval_metrics(sim, rset.img2txt, rset.txt2img)
    finally:
        model.train(was_training)
    return RetrievalResult(pre, two, len(rset.images), len(rset.texts), cfg.k, sim, s_i2t, s_t2i)
