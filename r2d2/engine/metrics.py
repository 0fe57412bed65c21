"""Evaluation metrics for the downstream tasks: retrieval recall@k, ROC AUC, accuracies.

Conventions (shared by every function here):

* Scores are "higher is better"; inputs may be numpy arrays, torch tensors or nested lists and are
  converted to float64 numpy arrays (NaN scores are rejected: a NaN has no rank). Ground-truth
  indices (``img2txt``, ``txt2img``, ``targets``) may be lists, integer tensors or arrays.
* Ties are broken by a stable sort on the negated score, so among equal scores the candidate with
  the LOWER index ranks first. This is deterministic and documented rather than pessimistic; a
  model that outputs constant scores therefore gets the recall of "index order", not zero.
* Recalls and accuracies are returned in percent (0-100), as the paper reports them.

Retrieval with several captions per image (Flickr30k, COCO-CN, ICR): image-to-text counts a hit at
k if ANY of the image's texts is in the top k; text-to-image has exactly one correct image per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RECALL_KS = (1, 5, 10)


def _as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        # float64 stays float64 (a cast to float32 would invent ties); bf16/fp16 widen exactly
        x = x.detach().cpu()
        x = (x if x.dtype.is_floating_point and x.element_size() == 8 else x.double()).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name}: contains NaN scores")
    return arr


def _stable_order(scores: np.ndarray) -> np.ndarray:
    """Row-wise candidate order, best first; ties -> lower index first."""
    return np.argsort(-scores, axis=-1, kind="stable")


def ranks_of_targets(scores: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank of the best-ranked correct candidate of each row (``len(scores)`` rows).

    ``targets[r]`` lists the correct column indices of row ``r`` (non-empty)."""
    scores = _as_array(scores, "scores", 2)
    targets = _targets(targets, "targets")
    order = _stable_order(scores)
    n_cols = scores.shape[1]
    # position[r, c] = rank of column c in row r
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(n_cols)[None, :].repeat(len(order), 0), axis=1)
    ranks = np.empty(len(order), dtype=np.int64)
    if len(targets) != len(order):
        raise ValueError(f"{len(targets)} target rows for {len(order)} score rows")
    for r, cols in enumerate(targets):
        cols = np.asarray(cols, dtype=np.int64)
        if cols.size == 0:
            raise ValueError(f"row {r} has no correct candidate")
        if cols.min() < 0 or cols.max() >= n_cols:
            raise ValueError(f"row {r}: target index out of range [0, {n_cols}): {cols.tolist()}")
        ranks[r] = position[r, cols].min()
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Percent of rows whose best correct candidate has 0-based rank < k."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("recall_at_k: no queries")
    return {k: float(100.0 * np.mean(ranks < k)) for k in ks}


def _plain(x: Any) -> Any:
    """A torch tensor or numpy array as nested Python lists (ints stay ints); anything else as is."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (list, tuple)) else x


def _targets(entries: Any, name: str) -> list[list[int]]:
    """Normalise ``int | list[int]`` entries (a list, a 1-d or 2-d tensor / array, or a list of
    those) to lists of ints."""
    entries = _plain(entries)
    if isinstance(entries, (int, np.integer)):
        raise TypeError(f"{name}: expected one entry per row, got a single int")
    out = []
    for j, t in enumerate(entries):
        t = _plain(t)
        if isinstance(t, (bool, np.bool_)):
            raise TypeError(f"{name}[{j}]: expected an int or a list of ints, got a bool")
        if isinstance(t, (int, np.integer)):
            out.append([int(t)])
        elif hasattr(t, "__iter__") and not isinstance(t, (str, bytes)):
            t = [_plain(v) for v in t]
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in t):
                raise TypeError(f"{name}[{j}]: expected integer indices, got {t!r}")
            out.append([int(v) for v in t])
        else:
            raise TypeError(
                f"{name}[{j}]: expected an int or a list of ints, got {type(t).__name__}"
            )
    return out


def retrieval_metrics(
    sim_i2t: Any,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | Sequence[Sequence[int]],
    ks: Sequence[int] = RECALL_KS,
    sim_t2i: Any | None = None,
) -> dict[str, float]:
    """Recall@k both ways and their mean, in percent.

    Args:
        sim_i2t: ``[n_img, n_txt]`` scores, higher is more similar.
        img2txt: ``img2txt[i]`` the text indices that describe image ``i`` (at least one).
        txt2img: ``txt2img[j]`` the image index of text ``j`` (or a list of indices when a text
            describes several images, as a MUGE query does; any of them counts as a hit).
        ks: the cut-offs; the default (1, 5, 10) gives the keys ``i2t_r1 ... t2i_r10``.
        sim_t2i: optional ``[n_txt, n_img]`` scores for the text-to-image direction. Two-stage
            re-ranking produces a different matrix per direction (each re-ranks its own query
            rows); by default ``sim_i2t.T`` is used.

    Returns ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}``;
    ``mean_recall`` is the mean of all six (the paper's MR).
    """
    sim = _as_array(sim_i2t, "sim_i2t", 2)
    img2txt, txt2img = _targets(img2txt, "img2txt"), _targets(txt2img, "txt2img")
    n_img, n_txt = sim.shape
    sim_t = sim.T if sim_t2i is None else _as_array(sim_t2i, "sim_t2i", 2)
    if sim_t.shape != (n_txt, n_img):
        raise ValueError(f"sim_t2i has shape {sim_t.shape}, expected {(n_txt, n_img)}")
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt has {len(img2txt)} entries but sim_i2t has {n_img} image rows")
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries but sim_i2t has {n_txt} text columns")
    i2t = recall_at_k(ranks_of_targets(sim, img2txt), ks)
    t2i = recall_at_k(ranks_of_targets(sim_t, txt2img), ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    out["mean_recall"] = float(np.mean(list(i2t.values()) + list(t2i.values())))
    return out


def t2i_metrics(
    sim_t2i: Any, txt2img: Sequence[Sequence[int]] | Sequence[int], ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Text-to-image recall only (MUGE reports this direction; a query may have several correct
    items). ``txt2img[j]`` is an int or a list of correct image indices."""
    sim = _as_array(sim_t2i, "sim_t2i", 2)
    txt2img = _targets(txt2img, "txt2img")
    if len(txt2img) != sim.shape[0]:
        raise ValueError(f"txt2img has {len(txt2img)} entries but sim_t2i has {sim.shape[0]} rows")
    rec = recall_at_k(ranks_of_targets(sim, txt2img), ks)
    out = {f"t2i_r{k}": v for k, v in rec.items()}
    out["mean_recall"] = float(np.mean(list(rec.values())))
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing their average rank (``scipy.stats.rankdata``'s
    default, written out here so importing the metrics does not pull in scipy.stats: seconds)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    bounds = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])  # tie-group starts, then n
    avg = (bounds[:-1] + bounds[1:] - 1) / 2.0 + 1.0  # mean of ranks start+1..end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, np.diff(bounds))
    return ranks


def auc(scores: Any, labels: Any) -> float:
    """ROC AUC (0-1) by the Mann-Whitney rank statistic; tied scores get average ranks, i.e. a tie
    between a positive and a negative counts one half, as in ``sklearn.metrics.roc_auc_score``.

    ``labels`` must be 0/1 (or bool) with both classes present."""
    s = _as_array(scores, "scores", 1)
    y = _as_array(labels, "labels", 1)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0/1, got values {sorted(set(y.tolist()))[:5]}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc is undefined with only one class in labels")
    r = _average_ranks(s)
    u = r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def binary_accuracy(scores: Any, labels: Any, threshold: float = 0.5) -> float:
    """Percent of pairs where ``score >= threshold`` agrees with the 0/1 label."""
    s = _as_array(scores, "scores", 1)
    y = _as_array(labels, "labels", 1)
    if s.shape != y.shape or s.size == 0:
        raise ValueError(f"scores {s.shape} and labels {y.shape}: need equal, non-empty shapes")
    return float(100.0 * np.mean((s >= threshold) == (y == 1)))


def topk_accuracy(logits: Any, targets: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Classification top-k accuracy in percent, keys ``top{k}``; ties broken as in retrieval
    (lower class index first). ``k`` larger than the number of classes is clamped."""
    x = _as_array(logits, "logits", 2)
    t = np.asarray(targets.detach().cpu().numpy() if hasattr(targets, "detach") else targets)
    if t.shape != (x.shape[0],):
        raise ValueError(f"targets shape {t.shape}, expected ({x.shape[0]},)")
    if t.size and (t.min() < 0 or t.max() >= x.shape[1]):
        raise ValueError(f"targets out of range [0, {x.shape[1]})")
    ranks = ranks_of_targets(x, [[int(v)] for v in t])
    return {f"top{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
