"""How well generated images match their prompts, measured with R2D2 itself.

R-precision   for image i of prompt p_i: candidates = {p_i} + (R - 1) other distinct prompts
              drawn (seeded) from the held-out pool; hit_i = 1 when p_i scores highest under
              the dual encoder's cosine similarity (ties share the hit: 1 / (1 + #tied));
              R-precision = mean hit_i, chance = mean 1 / |candidates_i| (1 / R when the pool
              has R distinct prompts or more).
ITM score     mean over i of the cross encoders' p(match | image_i, p_i).
attributes    synthetic prompts only: how often the top-ranked candidate agrees with p_i on
              the background colour, shape colour, shape and count, beside the agreement a
              uniformly random pick among the same candidates would have (its chance).
palette bg    synthetic prompts only, no R2D2: the border pixels' median colour, snapped to the
              nearest of the 8 palette colours, equals the prompt's background colour (chance
              1/8). A direct check for when the tiny evaluator cannot read 32x32 images well.
"""

from __future__ import annotations

import re

import torch

from r2d2.engine.data.synthetic import COLOURS, COUNTS, SHAPES

_COLOUR = "|".join(name for name, _ in COLOURS)
_CAPTION = re.compile(
    rf"^({_COLOUR})背景上有({'|'.join(COUNTS)})({_COLOUR})的({'|'.join(SHAPES)})$"
)
ATTRIBUTES = ("background", "count", "colour", "shape")


def synthetic_attributes(prompt: str) -> tuple[str, str, str, str] | None:
    """``(background, count, colour, shape)`` of a synthetic caption, None for any other text."""
    m = _CAPTION.match(prompt.strip())
    return None if m is None else m.groups()


def candidate_sets(targets: list[int], pool_size: int, n: int, seed: int = 0) -> list[list[int]]:
    """For each target index into a pool of distinct prompts: the target first, then
    ``min(n, pool_size) - 1`` other pool indices drawn without replacement (seeded)."""
    if pool_size < 1:
        raise ValueError("R-precision needs at least one prompt in the pool")
    g = torch.Generator().manual_seed(seed)
    k = min(n, pool_size) - 1
    out = []
    for t in targets:
        if not 0 <= t < pool_size:
            raise ValueError(f"target {t} is outside the pool of {pool_size} prompts")
        perm = torch.randperm(pool_size - 1, generator=g)[:k]
        out.append([t] + [int(j) + (j >= t) for j in perm.tolist()])  # skip the target itself
    return out


def r_precision(
    image_emb: torch.Tensor, text_emb: torch.Tensor, candidates: list[list[int]]
) -> tuple[float, float, list[int]]:
    """``(R-precision, chance, top-1 pool index per image)`` for L2-normalised image embeddings
    ``[N, E]``, pool text embeddings ``[P, E]`` and each image's candidates (its prompt first)."""
    if image_emb.shape[0] != len(candidates):
        raise ValueError(f"{image_emb.shape[0]} images but {len(candidates)} candidate sets")
    hits, chance, top = [], [], []
    for i, cand in enumerate(candidates):
        s = text_emb[cand].float() @ image_emb[i].float()
        best = s.max()
        tied = int((s == best).sum())
        hits.append(1.0 / tied if s[0] == best else 0.0)
        chance.append(1.0 / len(cand))
        top.append(cand[int(s.argmax())])
    n = max(1, len(candidates))
    return sum(hits) / n, sum(chance) / n, top


def attribute_agreement(
    prompts: list[str], pool: list[str], candidates: list[list[int]], top: list[int]
) -> dict | None:
    """Per attribute: ``{"top1": share of images whose top-ranked candidate has the prompt's
    value, "chance": the same share for a uniformly random candidate}``; None unless every
    prompt and candidate is a synthetic caption."""
    attrs = [synthetic_attributes(p) for p in pool]
    own = [synthetic_attributes(p) for p in prompts]
    if any(a is None for a in attrs) or any(a is None for a in own):
        return None
    out = {}
    for k, name in enumerate(ATTRIBUTES):
        hit = [attrs[t][k] == own[i][k] for i, t in enumerate(top)]
        rand = [
            sum(attrs[c][k] == own[i][k] for c in cand) / len(cand)
            for i, cand in enumerate(candidates)
        ]
        out[name] = {"top1": sum(hit) / len(hit), "chance": sum(rand) / len(rand)}
    return out


def palette_background(images: torch.Tensor) -> list[int]:
    """Index into the synthetic palette of each image's background: the median colour of its
    one-pixel border, snapped to the nearest palette colour. ``images`` ``[N, 3, H, W]`` in [0, 1]."""
    x = images.float()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=-1)
    med = border.median(dim=-1).values * 255  # [N, 3]
    pal = torch.tensor([rgb for _, rgb in COLOURS], dtype=torch.float32)
    return torch.cdist(med, pal).argmin(dim=-1).tolist()


def palette_background_accuracy(images: torch.Tensor, prompts: list[str]) -> float | None:
    """Share of images whose palette background (:func:`palette_background`) is the prompt's
    background colour; None unless every prompt is a synthetic caption."""
    names = [name for name, _ in COLOURS]
    own = [synthetic_attributes(p) for p in prompts]
    if not own or any(a is None for a in own):
        return None
    got = palette_background(images)
    return sum(names[g] == a[0] for g, a in zip(got, own)) / len(own)
