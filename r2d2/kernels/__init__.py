"""Fused ops for R2D2, each with an eager reference and backend dispatch (see dispatch.py).

    distill_kl(student_logits, teacher_logits, *, temperature, reduction, backend)
    DistillKLLoss(temperature, reduction, backend)  (module form of distill_kl)
    contrastive_loss(image_feat, text_feat, logit_scale, *, image_ids, teacher_*_feat,
                     distill_alpha, group, backend)
    attention(q, k, v, *, key_padding_mask, dropout_p, scale, backend)
"""

from r2d2.kernels.dispatch import (  # noqa: F401
    BACKENDS,
    BackendUnavailable,
    KernelConfig,
    auto_backend,
    describe,
    why_unavailable,
)
from r2d2.kernels.distill_kl import DistillKLLoss, distill_kl, distill_kl_ref  # noqa: F401
from r2d2.kernels.contrastive import ContrastiveOutput, contrastive_loss, contrastive_loss_ref  # noqa: F401
from r2d2.kernels.attention import attention, attention_ref  # noqa: F401


def state_dict() -> dict:
    """The kernels' process state worth keeping across a resume: the backends ``auto`` picked
    by measurement, JSON-able, keyed by op. A training checkpoint stores it so that a resumed run
    keeps each shape class on the backend it trained with instead of re-timing."""
    from r2d2.kernels.attention import export_picks

    return {"attention": export_picks()}


def load_state_dict(state: dict | list | None) -> int:
    """Take a :func:`state_dict` of an earlier run of the same job (every rank takes rank 0's,
    so after a resume all ranks agree). Picks for a device type this process does not use, or a
    backend that cannot run here, are left alone. A bare list is the attention picks of a
    checkpoint written before this function existed. Returns how many picks were taken."""
    import torch

    from r2d2.kernels.attention import load_picks

    if not state:
        return 0
    picks = state if isinstance(state, list) else state.get("attention") or []
    taken = 0
    for dev in sorted({p.get("device") for p in picks if isinstance(p, dict)} & {"cpu", "cuda"}):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        taken += load_picks([p for p in picks if p.get("device") == dev], dev)
    return taken
