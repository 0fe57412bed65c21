"""Distillation KL, the plain-PyTorch reference (the spec, the test oracle, the eager backend),
and the parts of the contract every backend shares: the reductions, the dtypes, the dtype of the
gradient the fused forwards save.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("batchmean", "sum", "none")
"""batchmean: mean over rows (what torch's KLDivLoss calls batchmean for 2-D inputs); sum: sum
over rows; none: per-row values shaped like the leading dims ``student_logits.shape[:-1]``."""

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient the fused forwards write (``grad_dtype`` in csrc/distill_kl): fp32
    for fp16 students (fp16's 5-bit exponent would flush small elements before the loss scale
    lifts them), the student's own dtype otherwise (bf16 has fp32's range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def reduce(row_loss: torch.Tensor, reduction: str, lead_shape: torch.Size) -> torch.Tensor:
    """Per-row losses ``[R]`` reduced as ``reduction`` says (``"none"``: shaped ``lead_shape``)."""
    if reduction == "batchmean":
        # No rows: 0 (the sum over max(rows, 1)), not mean()'s 0/0 = NaN.
        return row_loss.mean() if row_loss.numel() else row_loss.sum()
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.reshape(lead_shape)


def distill_kl_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Plain-PyTorch reference in fp32 (fp64 for float64 inputs): the spec and the test oracle.

    Both distributions go through log_softmax, so logits of +-1e4 stay finite; classes the teacher
    gives zero probability contribute exactly 0 (``p log p -> 0``), not ``0 * -inf = NaN``. A
    teacher row that is not a distribution (a NaN or +inf logit, or all -inf) has NaN
    probabilities; they are kept, so the row's loss and gradient are NaN (package docstring).
    """
    cdt = torch.promote_types(student_logits.dtype, torch.float32)
    t = float(temperature)
    log_q = torch.log_softmax(student_logits.to(cdt) / t, dim=-1)
    log_p = torch.log_softmax(teacher_logits.detach().to(cdt) / t, dim=-1)
    p = log_p.exp()
    # Only p == 0 is dropped: a NaN p (teacher row with a NaN or +inf logit, or all -inf) must
    # reach the sum, as it does in the fused kernels.
    terms = torch.where(
        p == 0, torch.zeros((), dtype=cdt, device=student_logits.device), p * (log_p - log_q)
    )
    row_loss = terms.sum(-1) * (t * t)
    return reduce(row_loss.reshape(-1), reduction, student_logits.shape[:-1])
