"""RandAugment (Cubuk et al., 2020) on Pillow images, for the official retrieval fine-tuning
recipe's ``RandAugment(2, 5)`` (no torchvision here).

Each call applies ``n`` operations drawn uniformly (with replacement) from :data:`OPS`, each with
probability 0.5 (as the BLIP/ALBEF family the official code descends from does), at magnitude
``m`` of ``MAX_LEVEL`` = 10. Signed geometric and enhancement ops flip their sign with
probability 0.5. Every draw comes from the caller's ``random.Random``, so a sample's augmentation
stays a function of (seed, epoch, index), like the rest of ``transforms``.

The op list is the usual one for image-text models: colour and geometry, no cutout (erasing
content a caption may describe). Geometric ops fill with grey (128), the CLIP mean in 8 bits, so
filled pixels normalise to about zero.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (128, 128, 128)


def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() < 0.5 else v


def _enhance(cls) -> Callable:
    # Enhancement factor 1 is the identity; magnitude m moves it by up to +-0.9 (0.1 .. 1.9).
    def op(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
        return cls(img).enhance(1.0 + _signed(0.9 * m / MAX_LEVEL, rng))

    return op


def _shear(axis: int) -> Callable:
    def op(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
        s = _signed(0.3 * m / MAX_LEVEL, rng)
        coeffs = (1, s, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BICUBIC, fillcolor=FILL)

    return op


def _translate(axis: int) -> Callable:
    # up to 10 % of the image side at full magnitude
    def op(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
        t = _signed(0.1 * m / MAX_LEVEL, rng) * img.size[axis]
        coeffs = (1, 0, t, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, t)
        return img.transform(img.size, Image.AFFINE, coeffs, Image.BICUBIC, fillcolor=FILL)

    return op


def _rotate(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return img.rotate(_signed(30.0 * m / MAX_LEVEL, rng), Image.BICUBIC, fillcolor=FILL)


def _posterize(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return ImageOps.posterize(img, max(1, 8 - int(4 * m / MAX_LEVEL)))  # 8 bits -> 4 at m = 10


def _solarize(img: Image.Image, m: float, rng: random.Random) -> Image.Image:
    return ImageOps.solarize(img, 256 - int(256 * m / MAX_LEVEL))


OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "identity": lambda img, m, rng: img,
    "autocontrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng: ImageOps.equalize(img),
    "brightness": _enhance(ImageEnhance.Brightness),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _rotate,
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}


class RandAugment:
    """``RandAugment(n, m)(img, rng)`` -> augmented RGB image of the same size."""

    def __init__(
        self, n: int = 2, m: float = 5.0, p: float = 0.5, ops: tuple[str, ...] | None = None
    ) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"RandAugment n={n!r}: expected an int >= 0 (operations per image)")
        if not 0 <= m <= MAX_LEVEL:
            raise ValueError(f"RandAugment m={m!r}: expected a magnitude in [0, {MAX_LEVEL:g}]")
        if not 0 <= p <= 1:
            raise ValueError(f"RandAugment p={p!r}: expected a probability in [0, 1]")
        names = tuple(ops) if ops is not None else tuple(OPS)
        unknown = [o for o in names if o not in OPS]
        if unknown or not names:
            raise ValueError(
                f"RandAugment ops {unknown or names}: expected names from {sorted(OPS)}"
            )
        self.n, self.m, self.p, self.ops = n, float(m), p, names

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        img = img.convert("RGB")
        for _ in range(self.n):
            name = self.ops[rng.randrange(len(self.ops))]
            if rng.random() < self.p:
                img = OPS[name](img, self.m, rng)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, m={self.m:g}, p={self.p:g})"
