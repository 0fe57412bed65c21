"""Distillation KL: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the last dim.

For logits ``[..., C]`` (rows = every leading position), with ``a = student/T``, ``b = teacher/T``,
``q = softmax(a)``, ``p = softmax(b)``::

    row_loss[r] = T^2 * sum_j p_j (log p_j - log q_j)
                = T^2 * (sum_j p_j (b_j - a_j) + lse(a) - lse(b))
    d row_loss[r] / d student[r, j] = T * (q_j - p_j)

The ``T^2`` factor keeps gradient magnitudes independent of T (Hinton et al., 2015). The teacher
is a constant: it receives no gradient (its logits come from the EMA teacher under no_grad).

Backends (see dispatch.py): ``eager`` is ``distill_kl_ref`` (reference.py; fp32 math, the spec and
test oracle); ``triton`` (distill_kl/triton.py), ``cuda`` and ``cpp`` (cuda.py over r2d2._C,
csrc/distill_kl/) stream each row once with online max/sum for both distributions and, when the
student needs a gradient, write ``d row_loss / d student = T * (q - p)`` during the forward (from
registers for rows that fit one tile; wider rows are read a second time, see the kernel files).
Backward is then one scale by ``grad_output`` (times ``1/rows`` for batchmean, per row for
``"none"``), computed in fp32 and rounded to the student's dtype (the Liger-Kernel recipe). The
saved gradient is fp32 for fp32 and fp16 students (one rounding in all), bf16 for bf16 students
(bf16 has fp32's range, so nothing underflows; it is rounded when saved and again after the
scale: two bf16 roundings).

The saved gradient carries no upstream scale: a loss scale (GradScaler's 2^16) or ``1/rows`` is
applied in backward, as eager applies it, so small elements are not flushed before the scale can
lift them. For the same reason float16 inputs save it in float32 (fp16's 5-bit exponent flushes
values below 6e-8); bfloat16 has fp32's range and saves it in bfloat16 (``saved_grad_dtype``).
Memory: the fused backends keep one student-sized gradient between forward and backward instead of
eager's fp32 log-probabilities of both inputs.

Limits: student and teacher must share shape, dtype (float16/bfloat16/float32/float64) and device.
The loss is float32 (float64 for float64 inputs).

Non-finite logits, the same on every backend (eager, triton, cuda, cpp):
  * A teacher logit of -inf (a masked class) is a zero-probability class; a student logit of -inf
    where the teacher has mass gives +inf (with a finite gradient), as it should.
  * A row is NaN (loss and every element of its student gradient) when its teacher has a NaN or a
    +inf logit, when its teacher logits are all -inf (not a distribution), or when its student
    has a NaN or a +inf logit or is all -inf. No backend takes the limit for +inf logits: such a
    row is never given a finite value. Other rows are unaffected (``"none"``); the reductions
    carry the NaN.

``auto`` is cuda, then triton, then eager on CUDA tensors; eager on CPU tensors (the C++ kernel is a
scalar correctness path for the binding, slower than eager's vectorised ops: docs/benchmarks.md).

Empty inputs: the class dimension C must be >= 1 (ValueError). Zero rows (a leading dimension of
0) are a defined empty batch on every backend: ``"none"`` returns an empty tensor shaped
``student_logits.shape[:-1]``, ``"sum"`` returns 0 (as torch's ``kl_div``), and ``"batchmean"``
returns 0 too (the sum over ``max(rows, 1)``; torch's ``kl_div`` gives 0/0 = NaN there), so an
empty batch adds nothing to a loss; the student's gradient is an empty tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from r2d2.kernels.dispatch import OpSpec, register_op, resolve
from r2d2.kernels.distill_kl import cuda as cuda_impl
from r2d2.kernels.distill_kl.reference import (  # saved_grad_dtype: public, as before
    DTYPES,
    REDUCTIONS,
    distill_kl_ref,
    reduce,
    saved_grad_dtype,
)

__all__ = ["REDUCTIONS", "DistillKLLoss", "distill_kl", "distill_kl_ref", "saved_grad_dtype"]

# (student [R, C], teacher [R, C], temperature, grad_scale, need_grad) -> (row_loss [R], grad)
FwdFn = Callable[
    [torch.Tensor, torch.Tensor, float, float, bool], tuple[torch.Tensor, torch.Tensor]
]


def _temperature(value: object) -> float:
    """``temperature`` as a float: a real number or a 0-d real tensor, finite and > 0.

    A tensor that requires grad is refused rather than silently detached: no gradient flows to the
    temperature here, so a learnable one would never learn. A CUDA tensor costs one host sync.
    """
    accepted = "a Python int/float or a 0-d real tensor (no grad)"
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"distill_kl: temperature must be {accepted}; got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        if value.requires_grad:
            raise ValueError(
                "distill_kl: temperature is a constant here (no gradient flows to "
                "it); pass temperature.detach() or a float"
            )
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(
            f"distill_kl: temperature must be a finite number > 0 ({accepted}), got {value!r}"
        )
    return float(value)


def _validate(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> None:
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"distill_kl: {name} must be a tensor, got {type(x).__name__}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"distill_kl: student_logits shape {tuple(student.shape)} must equal "
            f"teacher_logits shape {tuple(teacher.shape)}"
        )
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(
            f"distill_kl: logits need a non-empty last (class) dimension, got shape "
            f"{tuple(student.shape)}"
        )
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if x.dtype not in DTYPES:
            raise TypeError(
                f"distill_kl: {name} dtype {x.dtype} is not supported; expected one of "
                f"{[str(d) for d in DTYPES]}"
            )
    if teacher.dtype != student.dtype:
        raise TypeError(
            f"distill_kl: teacher_logits dtype {teacher.dtype} must equal "
            f"student_logits dtype {student.dtype}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"distill_kl: student_logits is on {student.device} but teacher_logits is "
            f"on {teacher.device}; both must be on one device"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"distill_kl: reduction={reduction!r}; expected one of {REDUCTIONS}")


def _fwd_triton(student, teacher, temperature, grad_scale, need_grad):
    # Imports triton: only when this backend runs, so the package works without triton.
    from r2d2.kernels.distill_kl import triton as triton_impl

    return triton_impl.fwd(student, teacher, temperature, grad_scale, need_grad)


_FWD: dict[str, FwdFn] = {"triton": _fwd_triton, "cuda": cuda_impl.fwd, "cpp": cuda_impl.fwd}


class _DistillKLFunction(torch.autograd.Function):
    """Shared by triton/cuda/cpp: the forward already wrote ``d row_loss / d student``, so
    backward only scales it by grad_output (and ``1/rows`` for batchmean) in fp32."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, reduction, lead_shape, fwd):
        row_loss, grad = fwd(student, teacher, temperature, 1.0, True)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.student_dtype = student.dtype
        return reduce(row_loss, reduction, lead_shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors  # [R, C]: T * (q - p), no upstream scale yet
        acc = torch.promote_types(grad.dtype, torch.float32)
        if ctx.reduction == "none":
            scale = grad_out.reshape(-1, 1).to(acc)  # per row
        else:
            # [1, 1], not 0-d: a 0-d operand would not promote a bfloat16 product to fp32.
            scale = grad_out.to(acc).reshape(1, 1)
            if ctx.reduction == "batchmean":
                scale = scale / max(grad.shape[0], 1)
        # fp32 product, rounded once into the student's dtype; out of place, so a retained graph
        # can run backward again.
        out = torch.empty(grad.shape, dtype=ctx.student_dtype, device=grad.device)
        return torch.mul(grad, scale, out=out), None, None, None, None, None


def distill_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    reduction: str = "batchmean",
    backend: str = "auto",
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the last dim of ``[..., C]``.

    Args:
        student_logits: ``[..., C]`` float16/bfloat16/float32/float64; receives the gradient.
        teacher_logits: same shape, dtype and device; treated as a constant (no gradient flows to
            it, whether or not it requires grad).
        temperature: softmax temperature T > 0 for both distributions: a Python number or a
            0-d tensor (read once with ``.item()``; it receives no gradient).
        reduction: ``"batchmean"`` (mean over rows), ``"sum"``, or ``"none"`` (per-row values shaped
            ``student_logits.shape[:-1]``).
        backend: ``"auto" | "eager" | "triton" | "cuda" | "cpp"`` (see ``r2d2.kernels.dispatch``).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or per-row values for ``"none"``.
        A row whose teacher or student is not a distribution (a NaN or +inf logit, or all -inf)
        is NaN on every backend; zero rows give 0 for ``"sum"`` and ``"batchmean"`` (see the
        module docstring).
    """
    _validate(student_logits, teacher_logits, reduction)
    temperature = _temperature(temperature)
    chosen = resolve("distill_kl", backend, student_logits.device)
    if chosen == "eager":
        return distill_kl_ref(student_logits, teacher_logits, temperature, reduction)
    fwd = _FWD[chosen]
    lead_shape = student_logits.shape[:-1]
    cols = student_logits.shape[-1]
    student = student_logits.reshape(-1, cols)
    teacher = teacher_logits.detach().reshape(-1, cols)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return _DistillKLFunction.apply(student, teacher, temperature, reduction, lead_shape, fwd)
    row_loss, _ = fwd(student, teacher, temperature, 1.0, False)  # no gradient sweep
    return reduce(row_loss, reduction, lead_shape)


class DistillKLLoss(torch.nn.Module):
    """Module form of :func:`distill_kl` (``forward(student_logits, teacher_logits)``)."""

    def __init__(
        self,
        temperature: float | torch.Tensor = 1.0,
        reduction: str = "batchmean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return distill_kl(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )


# auto on CPU tensors is eager: the C++ kernel is a scalar correctness path (no SIMD exp), slower
# than eager's vectorised ops (docs/benchmarks.md); backend="cpp" still runs it.
SPEC = register_op(
    OpSpec(
        name="distill_kl",
        backends=("eager", "triton", "cuda", "cpp"),
        ext_op=cuda_impl.EXT_OP,
        auto_cpu=("eager",),
    )
)
