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
