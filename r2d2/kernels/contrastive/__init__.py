"""GCPR: global contrastive pre-ranking loss with multi-positive and teacher-softened targets.

Per rank: local L2-normalised features ``I_l, T_l`` ``[b, d]``; gathered over ``group``:
``I, T`` ``[B, d]`` (B = world * b), ids ``[B]`` (default: global position), scale ``s``.

    i2t logits  = s * I_l @ T^T         t2i logits = s * T_l @ I^T                 [b, B]
    hard[r, c]  = [id(r) == id(c)] / #{c : id(c) == id(r)}
    target      = (1 - alpha) * hard + alpha * softmax(s * teacher logits)          (optional)
    loss_r      = 1/2 (mean_r CE(target_i2t[r], logits_i2t[r])
                       + mean_r CE(target_t2i[r], logits_t2i[r]))

Gathering keeps gradients (backward sums the gathered gradients over ranks and returns each rank
its slice), so after DDP averages gradients over ranks they equal the gradient of the same loss
computed in one process over the concatenated global batch (equal b on every rank).

The eager reference ``contrastive_loss_ref`` materialises the ``[b, B]`` logits (and softmax /
gradient copies); it is the spec, the test oracle and the CPU fallback. The fused backends never
hold a ``[b, B]`` buffer: they stream tiles of the one similarity ``s I_l T^T`` per rank (the i2t
rows and the t2i columns of it, both from the same pass; contrastive_dist.py has the state, the
modes and the exact memory each holds):
  triton   contrastive_triton.py: tensor-core dots, fp32 accumulation
  cuda     csrc/contrastive/ via contrastive_cuda.py: the same design on CUDA cores (fp32 math)
``auto`` on a GPU picks triton first (tensor cores; the CUDA kernels are the plain CUDA-core twin
and have not been timed on a GPU), then cuda, then eager; on CPU it is eager (the interpreter is
for tests). Extra memory of the fused path, beyond inputs and gradients: per-row / per-column
statistics (fp32, ``nf <= 8`` of them per row or column: O(b + B) in gather mode, O(b) per hop in
ring mode), partial statistics of at most 32 row and 32 column programs
(``contrastive_dist.MAX_SLOTS``: O(b + B), and under 256 MiB by default), the gathered text
features ``[B, d]`` and their fp32 gradient in gather mode, two ``[b, d]`` blocks in flight in
ring mode. Not O(b + B) overall: the gathered features are O(B d).

Hard negatives (FGR) come from the same forward pass by streaming Gumbel-max over a counter-based
noise (``gumbel_noise``): every backend, world size, tiling and mode adds the very same noise to
a logit, so they draw the same negatives up to near-ties that the last bit of a logit decides
(summation order, tensor-core dots, fast-math logs differ there). With ``seed=None`` each rank
draws its own seed: the law is right, the draws are not reproducible; the engine passes a seed.
The sample is Gumbel-max over a 24-bit uniform evaluated in fp32 (see ``gumbel_noise``): the law
is the softmax up to that discretisation (tails cut at -2.86 / 17.33) and rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from r2d2.dist import all_equal_rows, dist_info, gather
from r2d2.kernels.dispatch import OpSpec, register_op, resolve


def hard_targets(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Equal mass on every column whose id equals the row's id: ``[len(row_ids), len(col_ids)]``."""
    pos = (row_ids[:, None] == col_ids[None, :]).float()
    return pos / pos.sum(1, keepdim=True).clamp_min(1.0)


def _check(image_feat, text_feat, logit_scale, image_ids, teacher_image_feat, teacher_text_feat,
           distill_alpha):
    for name, x, optional in (("image_feat", image_feat, False), ("text_feat", text_feat, False),
                              ("image_ids", image_ids, True),
                              ("teacher_image_feat", teacher_image_feat, True),
                              ("teacher_text_feat", teacher_text_feat, True)):
        if not (isinstance(x, torch.Tensor) or (optional and x is None)):
            raise TypeError(f"contrastive_loss: {name} must be a tensor{' or None' * optional}, "
                            f"got {type(x).__name__}")
    if image_feat.dim() != 2 or text_feat.shape != image_feat.shape:
        raise ValueError(f"contrastive_loss: image_feat and text_feat must both be [b, d]; got "
                         f"{tuple(image_feat.shape)} and {tuple(text_feat.shape)}")
    if not image_feat.is_floating_point() or text_feat.dtype != image_feat.dtype:
        raise TypeError(f"contrastive_loss: features must share one floating dtype; got "
                        f"{image_feat.dtype} and {text_feat.dtype}")
    if image_feat.device != text_feat.device:
        raise ValueError(f"contrastive_loss: features on different devices: {image_feat.device}, "
                         f"{text_feat.device}")
    if not torch.is_tensor(logit_scale) or logit_scale.numel() != 1:
        raise TypeError("contrastive_loss: logit_scale must be a one-element tensor (the scale s, "
                        "not its log)")
    if image_ids is not None and tuple(image_ids.shape) != (image_feat.shape[0],):
        raise ValueError(f"contrastive_loss: image_ids must be [b={image_feat.shape[0]}], got "
                         f"{tuple(image_ids.shape)}")
    if (teacher_image_feat is None) != (teacher_text_feat is None):
        raise ValueError("contrastive_loss: give both teacher_image_feat and teacher_text_feat "
                         "or neither")
    if teacher_image_feat is not None and (teacher_image_feat.shape != image_feat.shape
                                           or teacher_text_feat.shape != image_feat.shape):
        raise ValueError("contrastive_loss: teacher features must have the student's shape "
                         f"{tuple(image_feat.shape)}")
    if not 0.0 <= distill_alpha <= 1.0:
        raise ValueError(f"contrastive_loss: distill_alpha must be in [0, 1], got {distill_alpha}")
    if distill_alpha > 0 and teacher_image_feat is None:
        raise ValueError("contrastive_loss: distill_alpha > 0 needs teacher features")


def global_ids(image_ids: torch.Tensor | None, b: int, device, group=None) -> torch.Tensor:
    """Gathered ids ``[B]``; default ids are global positions (targets on the diagonal)."""
    rank, world = dist_info(group)
    if image_ids is None:
        return torch.arange(world * b, device=device)
    return gather(image_ids.to(device=device, dtype=torch.long), group, with_grad=False)


def contrastive_loss_ref(image_feat, text_feat, logit_scale, *, image_ids=None,
                         teacher_image_feat=None, teacher_text_feat=None, distill_alpha=0.0,
                         group=None, return_negatives=False, seed=None,
                         compute_dtype=torch.float32):
    """Eager GCPR (+TgD targets), the spec: fp32 by default. Returns the local loss (mean over
    local rows), or a ``ContrastiveOutput`` with sampled hard negatives when ``return_negatives``.

    ``compute_dtype`` = the features' own low precision gives open_clip's eager computation
    (logits, softmax and their gradients in that dtype): the baseline of the benchmarks and of
    the low-precision test tolerances, not a second spec."""
    rank, world = dist_info(group)
    b = image_feat.shape[0]
    I_all = gather(image_feat, group).to(compute_dtype)
    T_all = gather(text_feat, group).to(compute_dtype)
    ids = global_ids(image_ids, b, image_feat.device, group)
    local_ids = ids[rank * b:(rank + 1) * b]
    I_l, T_l = I_all[rank * b:(rank + 1) * b], T_all[rank * b:(rank + 1) * b]
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
            soft_i2t = torch.softmax(sd * tI[rank * b:(rank + 1) * b] @ tT.t(), 1)
            soft_t2i = torch.softmax(sd * tT[rank * b:(rank + 1) * b] @ tI.t(), 1)
        tgt_i2t = (1 - distill_alpha) * tgt + distill_alpha * soft_i2t
        tgt_t2i = (1 - distill_alpha) * tgt + distill_alpha * soft_t2i
    loss_i2t = -(tgt_i2t * torch.log_softmax(logits_i2t, 1)).sum(1).mean()
    loss_t2i = -(tgt_t2i * torch.log_softmax(logits_t2i, 1)).sum(1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    if not return_negatives:
        return loss
    seed = _resolve_seed(seed)
    neg_t = sample_negatives_ref(logits_i2t.detach(), local_ids, ids, seed, 0, rank * b)
    neg_i = sample_negatives_ref(logits_t2i.detach(), local_ids, ids, seed, 1, rank * b)
    return ContrastiveOutput(loss, neg_t, neg_i)


class ContrastiveOutput(NamedTuple):
    loss: torch.Tensor
    neg_text_for_image: torch.Tensor   # [b] global text index per local image, -1 if none
    neg_image_for_text: torch.Tensor   # [b] global image index per local text, -1 if none


# Counter-based noise: a 32-bit integer hash of (key, global row, global column), so that the
# fused kernels (which draw it tile by tile, on any rank, in any ring order) and this reference
# draw the very same numbers. The kernels' twin is _gumbel_tl in contrastive_triton.py.
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
    no log of a number near 1). The kernels (contrastive_triton._gumbel_tl, the CUDA
    gumbel()) run the same steps. Departures from an exact Gumbel sample: the 2^24-point grid of u
    (so the tails are cut at those bounds) and fp32 rounding of g (about 1e-6)."""
    r = rows.to(torch.int64)[:, None] & _U32
    c = cols.to(torch.int64)[None, :] & _U32
    a = _mix32(r ^ key)
    h = _mix32((a + _mul32(c, _GOLD)) & _U32)
    return gumbel_from_bits(h >> 8)


def gumbel_from_bits(k: torch.Tensor) -> torch.Tensor:
    """The noise of the 24-bit integers ``k`` (int64 in [0, 2^24)); see ``gumbel_noise``."""
    u = (2 * k + 1).to(torch.float32) * 2.0**-25          # exact where k < 2^23
    v = (2**25 - 1 - 2 * k).to(torch.float32) * 2.0**-25  # exact where k >= 2^23
    t = v / (2.0 - v)
    t2 = t * t
    p = torch.full_like(t, _ATANH[-1])
    for coef in reversed(_ATANH[:-1]):
        p = p * t2 + coef
    e = torch.where(k >= 2**23, 2.0 * t * p, -torch.log(u))
    return -torch.log(e)


def _resolve_seed(seed) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return int(seed)


def sample_negatives_ref(logits, row_ids, col_ids, seed=None, stream=0, row_offset=0):
    """One column per row drawn from softmax(logits) over the columns whose id differs from the
    row's (Gumbel-max: argmax(logits + Gumbel noise) is a softmax sample). -1 when a row has no
    such column. The noise of (row, column) depends only on (seed, stream, row_offset + row,
    column), so the fused backends draw the same sample."""
    key = seed_key(_resolve_seed(seed), stream)
    dev = logits.device
    rows = torch.arange(logits.shape[0], device=dev) + row_offset
    gumbel = gumbel_noise(key, rows, torch.arange(logits.shape[1], device=dev))
    same = row_ids[:, None] == col_ids[None, :]
    z = (logits.float() + gumbel).masked_fill(same, float("-inf"))
    idx = z.argmax(1)
    return torch.where(same.all(1), torch.full_like(idx, -1), idx)


SPEC = register_op(OpSpec(
    name="contrastive",
    backends=("eager", "triton", "cuda"),
    ext_op="contrastive_fwd",
    # The Triton kernels use tensor-core dots; the CUDA ones are the plain CUDA-core twin (and
    # have not been measured on a GPU yet), so auto prefers Triton on a GPU.
    auto_cuda=("triton", "cuda", "eager"),
))

MODES = ("gather", "ring")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def contrastive_loss(image_feat, text_feat, logit_scale, *, image_ids=None, teacher_image_feat=None,
                     teacher_text_feat=None, distill_alpha=0.0, group=None, backend="auto",
                     return_negatives=False, seed=None, mode="gather", check_ranks=True):
    """GCPR loss over features gathered from every rank of ``group``; see the module docstring.

    With ``return_negatives`` it returns ``ContrastiveOutput(loss, neg_text_for_image,
    neg_image_for_text)``: for FGR, one hard negative per local row sampled from the softmax of
    the (scaled) global similarity with same-id columns excluded; ``seed`` makes it reproducible
    (the same seed gives the same negatives on every backend, world size and mode, up to
    near-ties decided by a logit's last bit).

    Every rank of ``group`` must bring the same ``b``: ``check_ranks`` (default) verifies it with
    one small all_gather and raises the same ValueError on every rank otherwise (unequal gathers
    abort gloo and hang NCCL); a caller that has checked already (the engine's objective) passes
    ``check_ranks=False``.

    ``mode`` (fused backends, several ranks): ``"gather"`` all-gathers the text features,
    ``"ring"`` passes them round a ring of isend/irecv with O(b d) memory; both are exact. The
    eager backend always gathers both modalities.

    Arguments that are not tensors (a list, a NumPy array) raise TypeError naming the argument.
    An empty batch (``b = 0``) raises ValueError on every backend (the loss is a mean over pairs,
    softmaxes over no column are undefined); it is checked after the ranks' ``b`` are compared,
    so every rank raises it together. ``d = 0`` is allowed: every logit is 0 and the loss is
    ``log B``."""
    _check(image_feat, text_feat, logit_scale, image_ids, teacher_image_feat, teacher_text_feat,
           distill_alpha)
    if mode not in MODES:
        raise ValueError(f"contrastive_loss: mode must be one of {MODES}, got {mode!r}")
    if check_ranks:
        all_equal_rows(image_feat.shape[0], image_feat.device, group, "contrastive_loss")
    if image_feat.shape[0] == 0:
        raise ValueError("contrastive_loss: image_feat and text_feat have 0 rows (b = 0); the loss "
                         "is a mean over image-text pairs and needs b >= 1")
    picked = resolve("contrastive", backend, image_feat.device)
    if picked == "eager":
        return contrastive_loss_ref(image_feat, text_feat, logit_scale, image_ids=image_ids,
                                    teacher_image_feat=teacher_image_feat,
                                    teacher_text_feat=teacher_text_feat,
                                    distill_alpha=distill_alpha, group=group,
                                    return_negatives=return_negatives, seed=seed)
    if image_feat.dtype not in _FUSED_DTYPES:
        raise TypeError(f"contrastive_loss: backend={picked!r} takes float16, bfloat16 or float32 "
                        f"features, got {image_feat.dtype} (use backend='eager')")
    from r2d2.kernels import contrastive_dist

    if picked == "triton":
        from r2d2.kernels import contrastive_triton as kern
    else:
        kern = contrastive_cuda
    keys = (0, 0)
    if return_negatives:
        seed = _resolve_seed(seed)
        keys = (seed_key(seed, 0), seed_key(seed, 1))
    loss, neg_t, neg_i = contrastive_dist.fused_contrastive(
        kern, image_feat, text_feat, logit_scale, image_ids=image_ids,
        teacher_image_feat=teacher_image_feat, teacher_text_feat=teacher_text_feat,
        distill_alpha=float(distill_alpha), group=group, keys=keys, neg=return_negatives,
        mode=mode, tiles=kern.Tiles())
    if not return_negatives:
        return loss
    return ContrastiveOutput(loss, neg_t, neg_i)


# Imported last: it registers the fake (shape) functions of the compiled ops, and needs nothing
# from this module.
from r2d2.kernels import contrastive_cuda  # noqa: E402
