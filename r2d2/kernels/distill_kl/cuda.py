"""Distillation KL, compiled backends ``cuda`` and ``cpp``: the op
``torch.ops.r2d2.distill_kl_fwd`` of r2d2._C (csrc/distill_kl/, one binding for both devices)
behind the forward signature the package's autograd function calls, and its fake (shape)
functions so torch.compile (FakeTensor) can trace it.

``fwd(student [R, C], teacher [R, C], temperature, grad_scale, need_grad)`` ->
``(row_loss [R] fp32 (fp64 for fp64), grad [R, C] in saved_grad_dtype, or [0] without need_grad)``.
"""

from __future__ import annotations

import torch

from r2d2 import _ext
from r2d2.kernels.distill_kl.reference import saved_grad_dtype

EXT_OP = "distill_kl_fwd"


def fwd(student, teacher, temperature, grad_scale, need_grad):
    return torch.ops.r2d2.distill_kl_fwd(student, teacher, temperature, grad_scale, need_grad)


def _register_fakes() -> None:
    if not _ext.has_op(EXT_OP):
        return

    @torch.library.register_fake("r2d2::distill_kl_fwd")
    def _fwd_fake(student, teacher, temperature, grad_scale=1.0, need_grad=True):
        rows = student.numel() // student.shape[-1]
        loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        row_loss = student.new_empty((rows,), dtype=loss_dtype)
        grad_dtype = saved_grad_dtype(student.dtype)
        grad = student.new_empty(student.shape if need_grad else (0,), dtype=grad_dtype)
        return row_loss, grad

    @torch.library.register_fake("r2d2::distill_kl_fwd_out")
    def _fwd_out_fake(student, teacher, temperature, grad_scale, row_loss, grad):
        return None


_register_fakes()
