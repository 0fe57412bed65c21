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

The eager reference ``contrastive_loss_ref`` (reference.py) materialises the ``[b, B]`` logits (and
softmax / gradient copies); it is the spec, the test oracle and the CPU fallback. The fused
backends never hold a ``[b, B]`` buffer: they stream tiles of the one similarity ``s I_l T^T`` per
rank (the i2t rows and the t2i columns of it, both from the same pass; distributed.py has the
state, the modes, the autograd and the exact memory each holds):
  triton   contrastive/triton.py: tensor-core dots, fp32 accumulation
  cuda     csrc/contrastive/ via cuda.py: the same design on CUDA cores (fp32 math)
``auto`` on a GPU picks triton first (tensor cores; the CUDA kernels are the plain CUDA-core twin),
then cuda, then eager; on CPU it is eager (the interpreter is for tests). Extra memory of the
fused path, beyond inputs and gradients: per-row / per-column statistics (fp32, ``nf <= 8`` of
them per row or column: O(b + B) in gather mode, O(b) per hop in ring mode), partial statistics of
at most 32 row and 32 column programs (``distributed.MAX_SLOTS``: O(b + B), and under 256 MiB by
default), the gathered text features ``[B, d]`` and their fp32 gradient in gather mode, two
``[b, d]`` blocks in flight in ring mode. Not O(b + B) overall: the gathered features are O(B d).

Hard negatives (FGR) come from the same forward pass by streaming Gumbel-max over a counter-based
noise (``gumbel_noise``, reference.py): every backend, world size, tiling and mode adds the very
same noise to a logit, so they draw the same negatives up to near-ties that the last bit of a
logit decides (summation order, tensor-core dots, fast-math logs differ there). With ``seed=None`` each rank
draws its own seed: the law is right, the draws are not reproducible; the engine passes a seed.
The sample is Gumbel-max over a 24-bit uniform evaluated in fp32 (see ``gumbel_noise``): the law
is the softmax up to that discretisation (tails cut at -2.86 / 17.33) and rounding.
"""

from __future__ import annotations

import torch

from r2d2.dist import all_equal_rows
from r2d2.kernels.contrastive import (
    cuda as cuda_impl,  # registers the compiled ops' fakes
)
from r2d2.kernels.contrastive.distributed import fused_contrastive
from r2d2.kernels.contrastive.reference import (
    ContrastiveOutput,
    contrastive_loss_ref,
    global_ids,
    gumbel_from_bits,
    gumbel_noise,
    hard_targets,
    resolve_seed,
    sample_negatives_ref,
    seed_key,
)
from r2d2.kernels.dispatch import OpSpec, register_op, resolve

__all__ = [
    "MODES",
    "ContrastiveOutput",
    "contrastive_loss",
    "contrastive_loss_ref",
    "global_ids",
    "gumbel_from_bits",
    "gumbel_noise",
    "hard_targets",
    "sample_negatives_ref",
    "seed_key",
]


def _check(
    image_feat,
    text_feat,
    logit_scale,
    image_ids,
    teacher_image_feat,
    teacher_text_feat,
    distill_alpha,
):
    for name, x, optional in (
        ("image_feat", image_feat, False),
        ("text_feat", text_feat, False),
        ("image_ids", image_ids, True),
        ("teacher_image_feat", teacher_image_feat, True),
        ("teacher_text_feat", teacher_text_feat, True),
    ):
        if not (isinstance(x, torch.Tensor) or (optional and x is None)):
            raise TypeError(
                f"contrastive_loss: {name} must be a tensor{' or None' * optional}, "
                f"got {type(x).__name__}"
            )
    if image_feat.dim() != 2 or text_feat.shape != image_feat.shape:
        raise ValueError(
            f"contrastive_loss: image_feat and text_feat must both be [b, d]; got "
            f"{tuple(image_feat.shape)} and {tuple(text_feat.shape)}"
        )
    if not image_feat.is_floating_point() or text_feat.dtype != image_feat.dtype:
        raise TypeError(
            f"contrastive_loss: features must share one floating dtype; got "
            f"{image_feat.dtype} and {text_feat.dtype}"
        )
    if image_feat.device != text_feat.device:
        raise ValueError(
            f"contrastive_loss: features on different devices: {image_feat.device}, "
            f"{text_feat.device}"
        )
    if not torch.is_tensor(logit_scale) or logit_scale.numel() != 1:
        raise TypeError(
            "contrastive_loss: logit_scale must be a one-element tensor (the scale s, not its log)"
        )
    if image_ids is not None and tuple(image_ids.shape) != (image_feat.shape[0],):
        raise ValueError(
            f"contrastive_loss: image_ids must be [b={image_feat.shape[0]}], got "
            f"{tuple(image_ids.shape)}"
        )
    if (teacher_image_feat is None) != (teacher_text_feat is None):
        raise ValueError(
            "contrastive_loss: give both teacher_image_feat and teacher_text_feat or neither"
        )
    if teacher_image_feat is not None and (
        teacher_image_feat.shape != image_feat.shape or teacher_text_feat.shape != image_feat.shape
    ):
        raise ValueError(
            "contrastive_loss: teacher features must have the student's shape "
            f"{tuple(image_feat.shape)}"
        )
    if not 0.0 <= distill_alpha <= 1.0:
        raise ValueError(f"contrastive_loss: distill_alpha must be in [0, 1], got {distill_alpha}")
    if distill_alpha > 0 and teacher_image_feat is None:
        raise ValueError("contrastive_loss: distill_alpha > 0 needs teacher features")


SPEC = register_op(
    OpSpec(
        name="contrastive",
        backends=("eager", "triton", "cuda"),
        ext_op="contrastive_fwd",
        # The Triton kernels use tensor-core dots; the CUDA ones are the plain CUDA-core twin, so
        # auto prefers Triton on a GPU.
        auto_cuda=("triton", "cuda", "eager"),
    )
)

MODES = ("gather", "ring")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def contrastive_loss(
    image_feat,
    text_feat,
    logit_scale,
    *,
    image_ids=None,
    teacher_image_feat=None,
    teacher_text_feat=None,
    distill_alpha=0.0,
    group=None,
    backend="auto",
    return_negatives=False,
    seed=None,
    mode="gather",
    check_ranks=True,
):
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
    _check(
        image_feat,
        text_feat,
        logit_scale,
        image_ids,
        teacher_image_feat,
        teacher_text_feat,
        distill_alpha,
    )
    if mode not in MODES:
        raise ValueError(f"contrastive_loss: mode must be one of {MODES}, got {mode!r}")
    if check_ranks:
        all_equal_rows(image_feat.shape[0], image_feat.device, group, "contrastive_loss")
    if image_feat.shape[0] == 0:
        raise ValueError(
            "contrastive_loss: image_feat and text_feat have 0 rows (b = 0); the loss "
            "is a mean over image-text pairs and needs b >= 1"
        )
    picked = resolve("contrastive", backend, image_feat.device)
    if picked == "eager":
        return contrastive_loss_ref(
            image_feat,
            text_feat,
            logit_scale,
            image_ids=image_ids,
            teacher_image_feat=teacher_image_feat,
            teacher_text_feat=teacher_text_feat,
            distill_alpha=distill_alpha,
            group=group,
            return_negatives=return_negatives,
            seed=seed,
        )
    if image_feat.dtype not in _FUSED_DTYPES:
        raise TypeError(
            f"contrastive_loss: backend={picked!r} takes float16, bfloat16 or float32 "
            f"features, got {image_feat.dtype} (use backend='eager')"
        )
    if picked == "triton":
        # Imports triton: only when this backend runs, so the package works without triton.
        from r2d2.kernels.contrastive import triton as kern
    else:
        kern = cuda_impl
    keys = (0, 0)
    if return_negatives:
        seed = resolve_seed(seed)
        keys = (seed_key(seed, 0), seed_key(seed, 1))
    loss, neg_t, neg_i = fused_contrastive(
        kern,
        image_feat,
        text_feat,
        logit_scale,
        image_ids=image_ids,
        teacher_image_feat=teacher_image_feat,
        teacher_text_feat=teacher_text_feat,
        distill_alpha=float(distill_alpha),
        group=group,
        keys=keys,
        neg=return_negatives,
        mode=mode,
        tiles=kern.Tiles(),
    )
    if not return_negatives:
        return loss
    return ContrastiveOutput(loss, neg_t, neg_i)
