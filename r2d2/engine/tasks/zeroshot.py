"""Zero-shot image classification with Chinese prompt templates (CLIP-style prompt ensembling).

Each class name is wrapped in every template, the texts are embedded, the embeddings averaged per
class and re-normalised; an image's logits are its cosine similarity to each class embedding.
Top-1 / top-5 accuracy, ties broken toward the lower class index (``r2d2.engine.metrics``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r2d2.engine.metrics import topk_accuracy
from r2d2.engine.tasks.retrieval import LoadImage, Tokenize, _model_device, sharded_encode

# Our own set, written for Chinese: the plain photo prompt first (the one the paper's users quote),
# then variants for picture quality and framing that help on web-crawled training data.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "一张{}的照片",
    "一张{}的图片",
    "这是一张{}的照片",
    "一张模糊的{}的照片",
    "一张清晰的{}的照片",
    "{}的特写照片",
    "一张小的{}的照片",
    "一张大的{}的照片",
)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if not templates:
        raise ValueError("zero-shot needs at least one prompt template")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(
                f"prompt template {t!r} must contain exactly one '{{}}' for the class name"
            )
    return tuple(templates)


@torch.no_grad()
def class_embeddings(
    model,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenize: Tokenize,
    batch_size: int = 256,
) -> torch.Tensor:
    """``[C, E]``: mean over templates of the normalised text embeddings, re-normalised."""
    templates = check_templates(templates)
    device = _model_device(model)
    prompts = [t.format(c) for c in classnames for t in templates]  # class-major
    embs = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = tokenize(prompts[s : s + batch_size])
        embs.append(F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1))
    emb = torch.cat(embs).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    n_images: int
    n_classes: int
    templates: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "n_images": self.n_images,
            "n_classes": self.n_classes,
            "templates": list(self.templates),
        }


@torch.no_grad()
def evaluate_zeroshot(
    model,
    records: Sequence,
    classnames: Sequence[str],
    tokenize: Tokenize,
    load_image: LoadImage,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
    group=None,
) -> ZeroShotResult:
    """Top-1 / top-5 accuracy (percent) of ``records`` (``label`` = class index)."""
    if not records:
        raise ValueError("evaluate_zeroshot: no records")
    labels = [r.label for r in records]
    if any(lab is None or not 0 <= lab < len(classnames) for lab in labels):
        raise ValueError(f"every record needs a label in [0, {len(classnames)})")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    cls = class_embeddings(model, classnames, templates, tokenize)
    img = sharded_encode(
        lambda s, e: model.encode_image(
            torch.stack([load_image(r.image) for r in records[s:e]]).to(device)
        ).float(),
        len(records),
        batch_size,
        group,
    )
    model.train(was_training)
    acc = topk_accuracy((img @ cls.t()).cpu(), labels, ks=(1, 5))
    return ZeroShotResult(acc["top1"], acc["top5"], len(records), len(classnames), tuple(templates))
