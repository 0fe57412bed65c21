"""Image-text retrieval evaluation with R2D2's two stages (pre-ranking + ranking).

1. Embed every image and text with the dual encoders, ``sim = image_emb @ text_emb.T``. Each rank
   loads, preprocesses and encodes only its shard of the images and of the texts; the embeddings
   are all-gathered (``r2d2.engine.inference.retrieve_sharded``).
2. Pre-rank metrics on ``sim``.
3. Re-rank the top ``k`` of every query row in both directions with the cross encoders
   (``r2d2.engine.tasks.rerank``), score = (p_ti + p_it) / 2 + cosine, and report the metrics
   again. A rank keeps the token states of its own images and of all texts and scores the pairs
   whose image it encoded, so images and image token states are never replicated.

Protocols: ``both`` (the paper's mean recall over i2t and t2i R@1/5/10, for the caption sets) and
``t2i`` (MUGE: every query is ranked against the split's whole image pool, and mean recall is the
mean of t2i R@1/5/10 only; i2t is still reported, over the images some query names, outside the
mean).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from r2d2.engine.metrics import (
    RECALL_KS,
    ranks_of_targets,
    recall_at_k,
    retrieval_metrics,
    t2i_metrics,
)
from r2d2.engine.tasks.rerank import sharded_encode  # noqa: F401  (re-exported for the other tasks)
from r2d2.engine.validate import choice, positive

PROTOCOLS = ("both", "t2i")

# (texts) -> (input_ids [N, L] long, attention_mask [N, L])
Tokenize = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
# (path) -> preprocessed image [3, H, W] float
LoadImage = Callable[[str], torch.Tensor]


@dataclass
class RetrievalSet:
    """Unique images and texts of an evaluation split with the ground truth both ways.

    ``img2txt[i]``: indices of the texts describing image ``i`` (empty for a gallery-only image);
    ``txt2img[j]``: indices of the images text ``j`` describes (one for caption sets; several for
    a MUGE query, or when two images received the identical caption, which is then one text
    correct for both). ``protocol``: ``both`` or ``t2i`` (module doc)."""

    images: list[str]
    image_ids: list[str]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[list[int]]
    protocol: str = "both"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"RetrievalSet.protocol must be one of {PROTOCOLS}, got {self.protocol!r}"
            )
        if self.protocol == "both" and any(not t for t in self.img2txt):
            n = sum(not t for t in self.img2txt)
            raise ValueError(
                f"{n} image(s) have no text: image-to-text recall is undefined for "
                "them (a gallery of extra images needs protocol='t2i')"
            )

    @classmethod
    def from_records(
        cls,
        records: Sequence,
        gallery: Sequence[tuple[str, str]] | None = None,
        protocol: str = "both",
    ) -> RetrievalSet:
        """Group ``Record``s: images by ``image_id`` (first path seen), texts by their string.

        ``gallery``: ``(image path, image_id)`` of every candidate image (MUGE's image pool),
        listed first and in this order whether or not a record names them."""
        if not records:
            raise ValueError("RetrievalSet: no records (was every sample skipped?)")
        img_index: dict[str, int] = {}
        txt_index: dict[str, int] = {}
        images, image_ids, texts = [], [], []
        img2txt: list[list[int]] = []
        txt2img: list[list[int]] = []

        def image(path: str, image_id: str) -> int:
            i = img_index.get(image_id)
            if i is None:
                i = img_index[image_id] = len(images)
                images.append(path)
                image_ids.append(image_id)
                img2txt.append([])
            return i

        for path, image_id in gallery or ():
            image(path, image_id)
        for r in records:
            i = image(r.image, r.image_id)
            j = txt_index.get(r.text)
            if j is None:
                j = txt_index[r.text] = len(texts)
                texts.append(r.text)
                txt2img.append([])
            if j not in img2txt[i]:
                img2txt[i].append(j)
                txt2img[j].append(i)
        return cls(images, image_ids, texts, img2txt, txt2img, protocol)

    @property
    def queried_images(self) -> list[int]:
        """Indices of the images that have at least one text (the i2t query rows)."""
        return [i for i, t in enumerate(self.img2txt) if t]


def set_metrics(
    rset: RetrievalSet, scores_i2t, scores_t2i=None, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """R@k both ways and the mean recall of ``rset``'s protocol.

    ``both``: :func:`retrieval_metrics` (mean of the six). ``t2i``: mean recall over the t2i
    R@k only; the i2t R@k are computed over the images with a text and kept out of the mean."""
    if rset.protocol == "both":
        return retrieval_metrics(scores_i2t, rset.img2txt, rset.txt2img, ks=ks, sim_t2i=scores_t2i)
    s_t2i = scores_i2t.t() if scores_t2i is None else scores_t2i
    out = t2i_metrics(s_t2i, rset.txt2img, ks)
    rows = rset.queried_images
    i2t = recall_at_k(ranks_of_targets(scores_i2t[rows], [rset.img2txt[i] for i in rows]), ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **out}


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
    """dtype the images are preprocessed into before the image encoder (the model's input dtype;
    bfloat16 for a bf16 model). Images are loaded batch by batch, each rank only its shard."""
    progress: bool = False
    """show tqdm bars on rank 0"""

    def __post_init__(self) -> None:
        positive("retrieval", self, "k", "batch_size", "pair_batch", integer=True)
        choice(
            "retrieval",
            "image_cache_dtype",
            self.image_cache_dtype,
            ("float16", "bfloat16", "float32"),
        )


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
    protocol: str = "both"
    notes: list[str] = field(default_factory=list)
    """what the reader of the numbers must know (e.g. a PRD2 model was not re-ranked)"""

    def to_dict(self) -> dict:
        return {
            "n_images": self.n_images,
            "n_texts": self.n_texts,
            "k": self.k,
            "protocol": self.protocol,
            "mean_recall_of": MEAN_RECALL_OF[self.protocol],
            "pre_rank": self.pre_rank,
            "pre_rank+rank": self.two_stage,
            "notes": self.notes,
        }


MEAN_RECALL_OF = {
    "both": "i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10",
    "t2i": "t2i_r1 t2i_r5 t2i_r10 (MUGE protocol; i2t over the queried images, not in the mean)",
}


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def load_images(
    paths: Sequence[str], load_image: LoadImage, dtype: torch.dtype, workers: int = 4
) -> torch.Tensor:
    """Decode and preprocess ``paths`` into one ``[N, 3, H, W]`` tensor. Threads, because Pillow
    releases the GIL while decoding; order is preserved."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        return torch.stack(list(pool.map(lambda p: load_image(p).to(dtype), paths)))


@torch.no_grad()
def evaluate_retrieval(
    model,
    rset: RetrievalSet,
    tokenize: Tokenize,
    load_image: LoadImage,
    cfg: RetrievalEvalConfig | None = None,
    group=None,
) -> RetrievalResult:
    """Pre-rank and (unless ``cfg.rerank`` is False or the model has no cross encoders)
    pre-rank + rank metrics of an ``R2D2Model``-like ``model``, under ``rset.protocol``.

    One code path for both stages: ``r2d2.engine.inference.retrieve_sharded`` (each rank loads
    and encodes its shard; the ranking stage scores the pairs of the rank's own images)."""
    from r2d2.engine.inference import retrieve_sharded

    cfg = cfg or RetrievalEvalConfig()
    notes: list[str] = []
    has_cross = getattr(getattr(model, "config", None), "has_cross", False)
    if cfg.rerank and not has_cross:
        notes.append(
            "the model has no cross encoders (PRD2 / cross_layers=0): pre-rank only, "
            "no pre-rank + rank stage"
        )
    dtype = getattr(torch, cfg.image_cache_dtype)
    input_ids, attention_mask = tokenize(rset.texts)
    i2t_rows = None
    if rset.protocol == "t2i":
        i2t_rows = torch.tensor(rset.queried_images, dtype=torch.long)
    out = retrieve_sharded(
        model,
        lambda s, e: load_images(rset.images[s:e], load_image, dtype),
        len(rset.images),
        input_ids,
        attention_mask,
        top_k=cfg.k,
        batch_size=cfg.batch_size,
        pair_batch=cfg.pair_batch,
        group=group,
        rerank_stage=cfg.rerank and has_cross,
        i2t_rows=i2t_rows,
        progress=cfg.progress,
    )
    sim = out["sim_i2t"].float().cpu()
    pre = set_metrics(rset, sim)
    two = s_i2t = s_t2i = None
    if cfg.rerank and has_cross:
        s_i2t, s_t2i = out["i2t"].float().cpu(), out["t2i"].float().cpu()
        two = set_metrics(rset, s_i2t, s_t2i)
    return RetrievalResult(
        pre, two, len(rset.images), len(rset.texts), cfg.k, sim, s_i2t, s_t2i, rset.protocol, notes
    )
