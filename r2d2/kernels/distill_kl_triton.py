"""Distillation KL, Triton kernel and launcher (the math and public API live in distill_kl.py).

One program handles ``BLOCK_R`` rows (several when rows are short, one when they are long) and
streams them in ``BLOCK_C`` column tiles:

  sweep 1   online max / sum-exp for the student ``a = s/T`` and the teacher ``b = t/T``, plus
            ``w = sum_j exp(b_j - m_b) ((b_j - m_b) - (a_j - m_a))``; then
            ``row_loss = T^2 * (w / z_b + log z_a - log z_b)``. The differences are taken against
            the running maxima (corrected when they move) so that a large common offset of the
            logits cancels exactly instead of rounding at its own magnitude (see the CUDA header
            csrc/distill_kl/distill_kl_kernel.h for the derivation).
  sweep 2   (only when the student needs a gradient)
            ``grad = grad_scale * T * (softmax(a) - softmax(b))``
            written in the student's dtype, so backward is one scale by grad_output.

Budget per element: sweep 1 reads s and t, sweep 2 reads them again (L2-resident for rows of a
few MB) and writes grad; 4 exp. Accumulation is fp32 (fp64 for float64 inputs).
Limits: inputs are made contiguous ``[R, C]``; masked teacher logits (-inf) are fine, a row whose
teacher logits are all -inf is not a distribution and gives NaN.

Importing this module imports triton; distill_kl.py imports it lazily so the package works without
triton installed. On CPU tensors it runs only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from r2d2.kernels.dispatch import triton_interpret


@triton.jit
def _distill_kl_fwd_kernel(
    s_ptr,  # [R, C] student logits, row-major contiguous
    t_ptr,  # [R, C] teacher logits, same dtype
    loss_ptr,  # [R] per-row T^2 * KL, ACC dtype
    grad_ptr,  # [R, C] student dtype; untouched unless NEED_GRAD
    R,
    C,
    inv_t,  # 1 / T
    t_sq,  # T^2
    coef,  # grad_scale * T
    NEED_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    # Padding rows re-read the last real row rather than an all -inf tile, so their statistics stay
    # finite (no NaN warnings under the interpreter); they are never stored.
    base = tl.minimum(rows, R - 1).to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK_C)[None, :]
    ninf = float("-inf")

    m_a = tl.full([BLOCK_R], ninf, ACC)
    z_a = tl.zeros([BLOCK_R], ACC)
    m_b = tl.full([BLOCK_R], ninf, ACC)
    z_b = tl.zeros([BLOCK_R], ACC)
    w = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, C, BLOCK_C):
        col = c0 + cols
        cm = col < C
        a = tl.load(s_ptr + base + col, mask=cm, other=ninf).to(ACC) * inv_t
        b = tl.load(t_ptr + base + col, mask=cm, other=ninf).to(ACC) * inv_t
        # New running maxima; one that is still -inf (nothing seen) shifts by 0 instead, so that
        # exp(-inf - -inf) never forms a NaN.
        m_a_new = tl.maximum(m_a, tl.max(a, axis=1))
        sh_a = tl.where(m_a_new == ninf, 0.0, m_a_new)
        m_b_new = tl.maximum(m_b, tl.max(b, axis=1))
        sh_b = tl.where(m_b_new == ninf, 0.0, m_b_new)
        # Old maxima; -inf (nothing seen: z = 0, w = 0, or w = +inf already) maps to the new one
        # so that the corrections below are exactly 0 rather than inf * 0.
        o_a = tl.where(m_a == ninf, sh_a, m_a)
        o_b = tl.where(m_b == ninf, sh_b, m_b)

        z_a = z_a * tl.exp(o_a - sh_a) + tl.sum(tl.exp(a - sh_a[:, None]), axis=1)

        # w's old terms (b - m_b) - (a - m_a) move to the new maxima, then get rescaled.
        alpha = tl.exp(o_b - sh_b)
        w = tl.where(alpha > 0, alpha * (w + z_b * ((o_b - sh_b) - (o_a - sh_a))), 0.0)
        z_b = z_b * alpha
        db = b - sh_b[:, None]
        e = tl.exp(db)
        # Zero-probability classes (teacher -inf, padding included) add exactly 0: the limit
        # p log p -> 0, not 0 * inf. A student -inf under teacher mass adds +inf (the true KL).
        da = tl.where(b == ninf, 0.0, a - sh_a[:, None])
        w += tl.sum(e * tl.where(e > 0, db - da, 0.0), axis=1)
        z_b += tl.sum(e, axis=1)
        m_a = m_a_new
        m_b = m_b_new

    loss = t_sq * (w / z_b + tl.log(z_a) - tl.log(z_b))
    tl.store(loss_ptr + rows, loss, mask=row_ok)

    if NEED_GRAD:
        # softmax = exp((x - m) - log z): x - m is exact, whereas x - (m + log z) would round
        # log z away at the logits' magnitude (ulp(1e4) ~ 1e-3).
        m_a2, lz_a = m_a[:, None], tl.log(z_a)[:, None]
        m_b2, lz_b = m_b[:, None], tl.log(z_b)[:, None]
        for c0 in range(0, C, BLOCK_C):
            col = c0 + cols
            cm = col < C
            a = tl.load(s_ptr + base + col, mask=cm, other=ninf).to(ACC) * inv_t
            b = tl.load(t_ptr + base + col, mask=cm, other=ninf).to(ACC) * inv_t
            g = coef * (tl.exp((a - m_a2) - lz_a) - tl.exp((b - m_b2) - lz_b))
            tl.store(grad_ptr + base + col, g.to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & cm)


def _blocks(cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps). The interpreter pays per tile, not per element, so it gets
    bigger tiles; on a GPU a 4096-element tile keeps both operands in registers."""
    tile = 16384 if triton_interpret() else 4096
    block_c = min(triton.next_power_of_2(cols), tile)
    block_r = max(1, min(64, tile // block_c))
    warps = 4 if block_r * block_c <= 1024 else 8
    return block_r, block_c, warps


def launch(student: torch.Tensor, teacher: torch.Tensor, temperature: float, grad_scale: float,
           row_loss: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Fill ``row_loss`` ``[R]`` and, unless ``grad`` is None, ``grad`` ``[R, C]`` (both contiguous,
    caller-owned: tests poison them). ``student``/``teacher``: ``[R, C]`` of one floating dtype."""
    student = student.contiguous()
    teacher = teacher.contiguous()
    rows, cols = student.shape
    if row_loss.numel() != rows or not row_loss.is_contiguous():
        raise ValueError(f"distill_kl (triton): row_loss must be a contiguous tensor of {rows} "
                         f"elements, got shape {tuple(row_loss.shape)}")
    if grad is not None and (grad.shape != student.shape or grad.dtype != student.dtype
                             or not grad.is_contiguous()):
        raise ValueError(f"distill_kl (triton): grad must be a contiguous {student.dtype} tensor "
                         f"of shape {tuple(student.shape)}, got {grad.dtype} {tuple(grad.shape)}")
    if rows == 0:
        return
    block_r, block_c, warps = _blocks(cols)
    acc = tl.float64 if student.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(rows, block_r),)
    args = (student, teacher, row_loss, grad if grad is not None else row_loss, rows, cols,
            1.0 / temperature, temperature * temperature, grad_scale * temperature)
    # Triton launches on the current device; make it the inputs' device.
    guard = torch.cuda.device(student.device) if student.is_cuda else contextlib.nullcontext()
    with guard:
        _distill_kl_fwd_kernel[grid](*args, NEED_GRAD=grad is not None, BLOCK_R=block_r,
                                     BLOCK_C=block_c, ACC=acc, num_warps=warps)


def fwd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, grad_scale: float,
        need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``torch.ops.r2d2.distill_kl_fwd`` on ``[R, C]`` inputs."""
    rows = student.shape[0]
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=loss_dtype, device=student.device)
    grad = (torch.empty(student.shape, dtype=student.dtype, device=student.device) if need_grad
            else student.new_empty(0))
    launch(student, teacher, temperature, grad_scale, row_loss, grad if need_grad else None)
    return row_loss, grad

