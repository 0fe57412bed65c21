"""Fused ops for R2D2, each with an eager reference and backend dispatch (see dispatch.py).

    distill_kl(student_logits, teacher_logits, *, temperature, reduction, backend)
    DistillKLLoss(temperature, reduction, backend)  (module form of distill_kl)
    contrastive_loss(image_feat, text_feat, logit_scale, *, image_ids, teacher_*_feat,
                     distill_alpha, group, backend)
    attention(q, k, v, *, key_padding_mask, dropout_p, scale, backend)

Layout: one package per op (``distill_kl/``, ``contrastive/``, ``attention/``, as ``csrc/<op>/``):
``__init__.py`` the public function, its validation and autograd, and its ``OpSpec``;
``reference.py`` the eager reference (the spec); ``cuda.py`` the r2d2._C wrapper and its fake
functions; the Triton kernels and launcher; ``contrastive/distributed.py`` the gather / ring
drivers; ``attention/library.py`` the backends of other libraries (SDPA, xformers). Shared:
``dispatch.py`` (backend selection), ``autotune.py`` (measured ``auto``), ``common.py``.
"""

from r2d2.kernels.attention import attention, attention_ref  # noqa: F401
from r2d2.kernels.contrastive import (  # noqa: F401
    ContrastiveOutput,
    contrastive_loss,
    contrastive_loss_ref,
)
from r2d2.kernels.dispatch import (  # noqa: F401
    BACKENDS,
    BackendUnavailable,
    KernelConfig,
    auto_backend,
    describe,
    load_state_dict,
    state_dict,
    why_unavailable,
)
from r2d2.kernels.distill_kl import DistillKLLoss, distill_kl, distill_kl_ref  # noqa: F401
