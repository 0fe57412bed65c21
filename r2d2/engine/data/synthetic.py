"""The embedded default data set: coloured shapes on coloured canvases with Chinese captions.

Sample ``i`` of split ``s`` is a pure function of ``(seed, s, i)``: a background colour, a shape
colour (different from the background), a shape (circle / square / triangle) and a count (1-3),
drawn at random non-overlapping cells of a 3 x 3 grid with random size and jitter, and captioned
e.g. "蓝色背景上有两个红色的圆形". 8 x 7 x 3 x 3 = 504 distinct captions, so retrieval on it is
learnable (colour first, then shape and count) and chance level is easy to state. The ``eval``
split draws from a different stream than ``train``: its images are never seen in training.

Images are referenced by the key ``synthetic:<seed>:<split>:<index>``; :func:`open_image` renders
a key (and opens any other key as a file), so the synthetic set goes through the same dataset,
transforms and evaluation code as files on disk.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from r2d2.engine.data.records import ReadResult, Record

COLOURS = (
    ("红色", (220, 40, 40)),
    ("绿色", (40, 170, 60)),
    ("蓝色", (40, 80, 220)),
    ("黄色", (240, 210, 40)),
    ("白色", (245, 245, 245)),
    ("黑色", (20, 20, 20)),
    ("紫色", (140, 60, 180)),
    ("橙色", (245, 140, 30)),
)
SHAPES = ("圆形", "正方形", "三角形")
COUNTS = ("一个", "两个", "三个")
SPLITS = ("train", "eval")
PREFIX = "synthetic:"


def attributes(seed: int, split: str, index: int) -> dict:
    """The drawn content of one sample (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"{seed}:{split}:{index}")
    bg = rng.randrange(len(COLOURS))
    fg = rng.choice([c for c in range(len(COLOURS)) if c != bg])
    shape = rng.randrange(len(SHAPES))
    count = rng.randrange(len(COUNTS)) + 1
    cells = rng.sample(range(9), count)
    # per-shape relative size and jitter inside its cell, in [0, 1]
    geometry = [(rng.uniform(0.55, 0.95), rng.uniform(0, 1), rng.uniform(0, 1)) for _ in cells]
    return {
        "bg": bg,
        "fg": fg,
        "shape": shape,
        "count": count,
        "cells": cells,
        "geometry": geometry,
    }


def caption(a: dict) -> str:
    return f"{COLOURS[a['bg']][0]}背景上有{COUNTS[a['count'] - 1]}{COLOURS[a['fg']][0]}的{SHAPES[a['shape']]}"


def render(a: dict, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), COLOURS[a["bg"]][1])
    draw = ImageDraw.Draw(img)
    cell = size / 3
    colour = COLOURS[a["fg"]][1]
    for c, (rel, jx, jy) in zip(a["cells"], a["geometry"]):
        side = rel * cell
        x0 = (c % 3) * cell + jx * (cell - side)
        y0 = (c // 3) * cell + jy * (cell - side)
        box = (x0, y0, x0 + side, y0 + side)
        if a["shape"] == 0:
            draw.ellipse(box, fill=colour)
        elif a["shape"] == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon(
                [(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour
            )
    return img


def make_key(seed: int, split: str, index: int) -> str:
    return f"{PREFIX}{seed}:{split}:{index}"


def parse_key(key: str) -> tuple[int, str, int]:
    try:
        seed, split, index = key[len(PREFIX) :].split(":")
        return int(seed), split, int(index)
    except ValueError:
        raise ValueError(
            f"malformed synthetic image key {key!r}; expected {PREFIX}<seed>:<split>:<index>"
        ) from None


def read_synthetic(size: int, split: str = "train", seed: int = 0) -> ReadResult:
    """``size`` records of the split; nothing is ever skipped."""
    records = []
    for i in range(size):
        a = attributes(seed, split, i)
        records.append(
            Record(image=make_key(seed, split, i), text=caption(a), image_id=f"{split}-{i}")
        )
    return ReadResult(records=records)


def open_image(key: str, canvas: int = 64) -> Image.Image:
    """Render a synthetic key, or open an image file (fully decoded, so corruption shows here)."""
    if key.startswith(PREFIX):
        seed, split, index = parse_key(key)
        return render(attributes(seed, split, index), canvas)
    with Image.open(key) as im:
        im.load()
        return im.convert("RGB")
