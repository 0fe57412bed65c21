"""Image preprocessing with Pillow and torch only (no torchvision).

Training: RandomResizedCrop (area ``scale``, aspect 3/4..4/3, bicubic) + optional horizontal flip
+ optional RandAugment(n, m) (``randaugment.py``).
Eval: resize the short side to ``size`` + center crop. Both end with CLIP mean/std normalisation.
Randomness comes from an explicit ``random.Random`` so that a sample's augmentation is a function of
(seed, epoch, index) alone: identical across worker counts, ranks and resumed runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float [3, H, W] in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: random.Random,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop with area in ``scale`` and aspect in ``ratio``.

    Ten tries as in the usual recipe, then a center crop clamped to the aspect range."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class TrainTransform:
    """RandomResizedCrop + optional flip + optional RandAugment + normalise; ``tf(img, rng)``."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        randaugment: tuple[int, float] | None = None,
    ) -> None:
        self.size, self.scale, self.hflip = size, tuple(scale), hflip
        self.randaugment = None
        if randaugment is not None:
            from r2d2.engine.data.randaugment import RandAugment

            self.randaugment = RandAugment(*randaugment)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = img.convert("RGB")
        box = random_resized_crop_box(img.width, img.height, self.scale, rng)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return normalize(to_tensor(img))


class EvalTransform:
    """Resize short side + center crop + normalise; ``rng`` is accepted and ignored."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return normalize(to_tensor(resize_center_crop(img.convert("RGB"), self.size)))


def eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised [3, size, size] tensor (what evaluation and the eval CLI use)."""
    return EvalTransform(size)


def build_transform(
    size: int,
    train: bool,
    augment: bool = True,
    scale=(0.5, 1.0),
    hflip: bool = False,
    randaugment: tuple[int, float] | None = None,
):
    return (
        TrainTransform(size, scale, hflip, randaugment)
        if (train and augment)
        else EvalTransform(size)
    )
