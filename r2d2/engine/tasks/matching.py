"""Image-text matching (ICM / IQM): the ITM fine-tuning objective and AUC / accuracy evaluation.

Fine-tuning trains both ITM heads on labelled pairs with cross entropy, the two heads' losses
averaged. (The official matching code applies ``F.cross_entropy`` to the *averaged softmax
probabilities*, i.e. a softmax of probabilities; we use the heads' logits, which is the loss the
paper describes and has a proper gradient scale.) The official recipe freezes the image encoder;
``freeze_image_encoder=True`` does the same here.

Evaluation: the match score of a pair is (p_ti + p_it) / 2 in [0, 1]; AUC (the official metric)
and accuracy at a 0.5 threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r2d2.engine.metrics import auc, binary_accuracy
from r2d2.engine.tasks.retrieval import LoadImage, Tokenize, _model_device, sharded_encode

BATCH_KEYS = ("images", "input_ids", "attention_mask", "labels")


def itm_logits(
    model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-image head logits [N, 2], image-text head logits [N, 2]) of row-wise pairs."""
    if not hasattr(model, "itm_logits"):
        raise TypeError(
            f"{type(model).__name__} has no ITM heads; matching needs the cross encoders"
        )
    if not getattr(getattr(model, "config", None), "has_cross", True):
        raise ValueError(
            "matching needs the cross encoders' ITM heads; this is a dual-encoder "
            "model (PRD2, cross_layers=0)"
        )
    return model.itm_logits(
        model.image_tokens(images), model.text_tokens(input_ids, attention_mask), attention_mask
    )


class MatchingObjective(nn.Module):
    """ITM cross entropy on labelled pairs through both cross encoders.

    ``forward(batch)`` with ``images [B, 3, H, W]``, ``input_ids [B, L]``, ``attention_mask
    [B, L]``, ``labels [B]`` (1 = match) returns ``{"loss", "itm_loss", "itm_ti_loss",
    "itm_it_loss"}``; ``loss`` = ``itm_loss`` = the mean of the two heads' losses."""

    def __init__(
        self,
        model: nn.Module,
        freeze_image_encoder: bool = False,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        if class_weights is not None and len(class_weights) != 2:
            raise ValueError(
                f"class_weights needs 2 values (negative, positive), got {class_weights}"
            )
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32),
            persistent=False,
        )
        if freeze_image_encoder:
            enc = getattr(model, "visual", None)
            if enc is None:
                raise TypeError(f"{type(model).__name__} has no image encoder (.visual) to freeze")
            enc.requires_grad_(False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"MatchingObjective: batch lacks {missing}; needs {list(BATCH_KEYS)}")
        labels = batch["labels"].long().reshape(-1)
        if labels.numel() != batch["input_ids"].shape[0]:
            raise ValueError(
                f"labels has {labels.numel()} entries for a batch of {batch['input_ids'].shape[0]}"
            )
        if ((labels != 0) & (labels != 1)).any():
            raise ValueError(
                f"labels must be 0/1 (every sample of a matching set needs one), "
                f"got {labels.unique().tolist()}"
            )
        lt, li = itm_logits(
            self.model, batch["images"], batch["input_ids"], batch["attention_mask"]
        )
        w = self.class_weights
        loss_ti = F.cross_entropy(lt.float(), labels, weight=w)
        loss_it = F.cross_entropy(li.float(), labels, weight=w)
        itm = (loss_ti + loss_it) / 2
        return {
            "loss": itm,
            "itm_loss": itm.detach(),
            "itm_ti_loss": loss_ti.detach(),
            "itm_it_loss": loss_it.detach(),
        }


@dataclass
class MatchingResult:
    auc: float
    accuracy: float
    n_pairs: int
    n_positive: int
    scores: list[float]

    def to_dict(self) -> dict:
        return {
            "auc": self.auc,
            "accuracy": self.accuracy,
            "n_pairs": self.n_pairs,
            "n_positive": self.n_positive,
        }


@torch.no_grad()
def match_scores(
    model,
    records: Sequence,
    tokenize: Tokenize,
    load_image: LoadImage,
    batch_size: int = 64,
    group=None,
) -> torch.Tensor:
    """(p_ti + p_it) / 2 of every record's (image, text) pair, sharded over ranks."""
    device = _model_device(model)

    def score(s: int, e: int) -> torch.Tensor:
        recs = records[s:e]
        imgs = torch.stack([load_image(r.image) for r in recs]).to(device)
        ids, mask = tokenize([r.text for r in recs])
        lt, li = itm_logits(model, imgs, ids.to(device), mask.to(device))
        p = (lt.float().softmax(-1)[:, 1] + li.float().softmax(-1)[:, 1]) / 2
        return p[:, None]

    return sharded_encode(score, len(records), batch_size, group)[:, 0].cpu()


def evaluate_matching(
    model,
    records: Sequence,
    tokenize: Tokenize,
    load_image: LoadImage,
    batch_size: int = 64,
    threshold: float = 0.5,
    group=None,
) -> MatchingResult:
    labels = [r.label for r in records]
    if any(lab not in (0, 1) for lab in labels):
        raise ValueError("evaluate_matching: every record needs a 0/1 label (read with icm/iqm)")
    was_training = model.training
    model.eval()
    scores = match_scores(model, records, tokenize, load_image, batch_size, group)
    model.train(was_training)
    return MatchingResult(
        auc(scores, labels),
        binary_accuracy(scores, labels, threshold),
        len(records),
        int(sum(labels)),
        scores.tolist(),
    )
