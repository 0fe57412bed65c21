"""GCPR, the eager reference (the spec, the test oracle, the CPU fallback) and the sampling
references: hard targets, the counter-based Gumbel noise every backend draws, hard negatives.

``contrastive_loss_ref`` materialises the ``[b, B]`` logits (and softmax / gradient copies) in
``compute_dtype`` (fp32 by default); the package docstring has the math. The noise is a 32-bit
integer hash of (key, global row, global column), so that the fused kernels (which draw it tile
by tile, on any rank, in any ring order) and this reference draw the very same numbers; the
kernels' twins are ``_gumbel_tl`` in contrastive/triton.py and ``gumbel()`` in csrc/contrastive.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from r2d2.dist import dist_info, gather


def hard_targets(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Equal mass on every column whose id equals the row's id: ``[len(row_ids), len(col_ids)]``."""
    pos = (row_ids[:, None] == col_ids[None, :]).float()
    return pos / pos.sum(1, keepdim=True).clamp_min(1.0)


def global_ids(image_ids: torch.Tensor | None, b: int, device, group=None) -> torch.Tensor:
    """Gathered ids ``[B]``; default ids are global positions (targets on the diagonal)."""
    _, world = dist_info(group)
    if image_ids is None:
        return torch.arange(world * b, device=device)
    return gather(image_ids.to(device=device, dtype=torch.long), group, with_grad=False)


def contrastive_loss_ref(
    image_feat,
    text_feat,
    logit_scale,
    *,
    image_ids=None,
    teacher_image_feat=None,
    teacher_text_feat=None,
    distill_alpha=0.0,
    group=None,
    return_negatives=False,
    seed=None,
    compute_dtype=torch.float32,
):
    """Eager GCPR (+TgD targets), the spec: fp32 by default. Returns the local loss (mean over
    local rows), or a ``ContrastiveOutput`` with sampled hard negatives when ``return_negatives``.

    ``compute_dtype`` = the features' own low precision gives open_clip's eager computation
    (logits, softmax and their gradients in that dtype): the baseline of the benchmarks and of
    the low-precision test tolerances, not a second spec."""
    rank, _ = dist_info(group)
    b = image_feat.shape[0]
    I_all = gather(image_feat, group).to(compute_dtype)
    T_all = gather(text_feat, group).to(compute_dtype)
    ids = global_ids(image_ids, b, image_feat.device, group)
    local_ids = ids[rank * b : (rank + 1) * b]
    I_l, T_l = I_all[rank * b : (rank + 1) * b], T_all[rank * b : (rank + 1) * b]
    s = logit_scale.to(compute_dtype).reshape(())
    logits_i2t = s * I_l @ T_all.t()
    logits_t2i = s * T_l @ I_all.t()
    tgt = hard_targets(local_ids, ids).to(compute_dtype)
    tgt_i2t, tgt_t2i = tgt, tgt
    if distill_alpha > 0:
        with torch.no_grad():
            tI = gather(teacher_image_feat.detach(), group, with_grad=False).to(compute_dtype)
            tT = gather(teacher_text_feat.detach(), group, with_grad=False).to(compute_dtype)
            sd = s.detach()
            soft_i2t = torch.softmax(sd * tI[rank * b : (rank + 1) * b] @ tT.t(), 1)
            soft_t2i = torch.softmax(sd * tT[rank * b : (rank + 1) * b] @ tI.t(), 1)
        tgt_i2t = (1 - distill_alpha) * tgt + distill_alpha * soft_i2t
        tgt_t2i = (1 - distill_alpha) * tgt + distill_alpha * soft_t2i
    loss_i2t = -(tgt_i2t * torch.log_softmax(logits_i2t, 1)).sum(1).mean()
    loss_t2i = -(tgt_t2i * torch.log_softmax(logits_t2i, 1)).sum(1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    if not return_negatives:
        return loss
    seed = resolve_seed(seed)
    neg_t = sample_negatives_ref(logits_i2t.detach(), local_ids, ids, seed, 0, rank * b)
    neg_i = sample_negatives_ref(logits_t2i.detach(), local_ids, ids, seed, 1, rank * b)
    return ContrastiveOutput(loss, neg_t, neg_i)


class ContrastiveOutput(NamedTuple):
    loss: torch.Tensor
    neg_text_for_image: torch.Tensor  # [b] global text index per local image, -1 if none
    neg_image_for_text: torch.Tensor  # [b] global image index per local text, -1 if none


# Counter-based noise (module docstring).
_M1, _M2, _GOLD, _U32 = 0x7FEB352D, 0x846CA68B, 0x9E3779B9, 0xFFFFFFFF  # lowbias32 multipliers


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _U32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def seed_key(seed: int, stream: int) -> int:
    """The 32-bit hash key of a user seed and a stream (0: i2t negatives, 1: t2i negatives)."""
    k = torch.tensor([(int(seed) * 0x9E37 + int(stream) * 0x85EB + 0x632BE5AB) & _U32])
    key = int(_mix32(_mix32(k))[0])
    # Triton turns an int argument equal to 1 into a compile-time constant; keep keys off it.
    return 3 if key == 1 else key


# -log(u) = 2 atanh(t) = 2 t (1 + t^2/3 + t^4/5 + ...), t = v / (2 - v), v = 1 - u <= 1/2:
# t <= 1/3, so nine terms reach fp32 precision.
_ATANH = tuple(1.0 / (2 * i + 1) for i in range(9))


def gumbel_noise(key: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[len(rows), len(cols)]`` (fp32) for global row / column indices.

    The uniform is u = (k + 1/2) / 2^24 with k the hash's top 24 bits, so u lies strictly inside
    (0, 1) and the noise is finite for every hash: -2.86 <= g <= 17.33. It is evaluated in fp32
    from exact inputs: u itself below 1/2 (-log u), v = 1 - u above (-log u by the atanh series,
    no log of a number near 1). The kernels (contrastive.triton._gumbel_tl, the CUDA
    gumbel()) run the same steps. Departures from an exact Gumbel sample: the 2^24-point grid of u
    (so the tails are cut at those bounds) and fp32 rounding of g (about 1e-6)."""
    r = rows.to(torch.int64)[:, None] & _U32
    c = cols.to(torch.int64)[None, :] & _U32
    a = _mix32(r ^ key)
    h = _mix32((a + _mul32(c, _GOLD)) & _U32)
    return gumbel_from_bits(h >> 8)


def gumbel_from_bits(k: torch.Tensor) -> torch.Tensor:
    """The noise of the 24-bit integers ``k`` (int64 in [0, 2^24)); see ``gumbel_noise``."""
    u = (2 * k + 1).to(torch.float32) * 2.0**-25  # exact where k < 2^23
    v = (2**25 - 1 - 2 * k).to(torch.float32) * 2.0**-25  # exact where k >= 2^23
    t = v / (2.0 - v)
    t2 = t * t
    p = torch.full_like(t, _ATANH[-1])
    for coef in reversed(_ATANH[:-1]):
        p = p * t2 + coef
    e = torch.where(k >= 2**23, 2.0 * t * p, -torch.log(u))
    return -torch.log(e)


def resolve_seed(seed) -> int:
    """``seed``, or a fresh one drawn from torch's CPU generator when None."""
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return int(seed)


def sample_negatives_ref(logits, row_ids, col_ids, seed=None, stream=0, row_offset=0):
    """One column per row drawn from softmax(logits) over the columns whose id differs from the
    row's (Gumbel-max: argmax(logits + Gumbel noise) is a softmax sample). -1 when a row has no
    such column. The noise of (row, column) depends only on (seed, stream, row_offset + row,
    column), so the fused backends draw the same sample."""
    key = seed_key(resolve_seed(seed), stream)
    dev = logits.device
    rows = torch.arange(logits.shape[0], device=dev) + row_offset
    gumbel = gumbel_noise(key, rows, torch.arange(logits.shape[1], device=dev))
    same = row_ids[:, None] == col_ids[None, :]
    z = (logits.float() + gumbel).masked_fill(same, float("-inf"))
    idx = z.argmax(1)
    return torch.where(same.all(1), torch.full_like(idx, -1), idx)
