"""Distillation KL, Triton kernel and launcher (the math and public API live in distill_kl.py).

One program handles ``BLOCK_R`` rows (several when rows are short, one when they are long), with
``a = s/T`` and ``b = t/T``. It keeps an online max / sum-exp for both distributions plus
``w = sum_j exp(b_j - m_b) ((b_j - m_b) - (a_j - m_a))``, so that
``row_loss = T^2 * (w / z_b + log z_a - log z_b)``. The differences are taken against the (running)
maxima so that a large common offset of the logits cancels exactly instead of rounding at its own
magnitude (see csrc/distill_kl/distill_kl_kernel.h for the derivation). With a gradient it writes
``grad = grad_scale * T * (softmax(a) - softmax(b))`` in ``saved_grad_dtype`` (fp32 for fp16 inputs).

Two paths, chosen by the launcher (``_blocks``):
  one tile   ``C <= MAX_ONE_TILE`` (16384; float64 on a GPU 4096, ``MAX_ONE_TILE_FP64``): the row
             is loaded once as one ``BLOCK_C`` tile, the statistics are exact tile reductions,
             and the gradient is written from the same registers: one read of s and t, 2 exp per
             element.
  streaming  wider rows: sweep 1 streams ``BLOCK_C`` tiles with the online max/sum (rescaling
             when a max moves); sweep 2 re-reads the row to write the gradient. A row of 32768+
             fp32 values of each input no longer fits one program's registers (a 16384-wide tile
             already takes 16 warps), and holding it in shared memory would cap C at ~227 KB for
             both inputs; the re-read rows are mostly L2 hits. 4 exp per element.
Accumulation is fp32 (fp64 for float64 inputs, whose 1/T, T^2 and gradient scale travel as
fp32 head + tail pairs: a float kernel argument is fp32 on a GPU).
Limits: inputs must be contiguous ``[R, C]`` on one device (the launcher checks and says which
argument is wrong); masked teacher logits (-inf) are fine, a row whose teacher logits are all
-inf is not a distribution and gives NaN.

Importing this module imports triton; distill_kl.py imports it lazily so the package works without
triton installed. On CPU tensors it runs only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl

from r2d2.kernels.dispatch import triton_interpret
from r2d2.kernels.distill_kl.reference import saved_grad_dtype


@triton.jit
def _distill_kl_fwd_kernel(
    s_ptr,  # [R, C] student logits, row-major contiguous
    t_ptr,  # [R, C] teacher logits, same dtype
    loss_ptr,  # [R] per-row T^2 * KL, ACC dtype
    grad_ptr,  # [R, C] saved_grad_dtype; untouched unless NEED_GRAD
    R,
    C,
    inv_t,  # 1 / T
    t_sq,  # T^2
    coef,  # grad_scale * T
    inv_t_lo,  # fp64 only: the parts of 1 / T, T^2, grad_scale * T below fp32 (see _split)
    t_sq_lo,
    coef_lo,
    NEED_GRAD: tl.constexpr,
    ONE_TILE: tl.constexpr,  # C <= BLOCK_C: load once, gradient from registers
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
):
    if ACC == tl.float64:  # noqa: SIM300 - ACC is a constexpr argument, not a constant
        # Float kernel arguments are fp32 on a GPU (the interpreter keeps Python's double): rebuild
        # the fp64 constants from their fp32 head and tail (~48 bits, far below fp64 tolerances).
        inv_t = tl.cast(inv_t, ACC) + tl.cast(inv_t_lo, ACC)
        t_sq = tl.cast(t_sq, ACC) + tl.cast(t_sq_lo, ACC)
        coef = tl.cast(coef, ACC) + tl.cast(coef_lo, ACC)
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    # Padding rows re-read the last real row rather than an all -inf tile, so their statistics stay
    # finite (no NaN warnings under the interpreter); they are never stored.
    base = tl.minimum(rows, R - 1).to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK_C)[None, :]
    ninf = float("-inf")

    if ONE_TILE:
        cm = cols < C
        a = tl.load(s_ptr + base + cols, mask=cm, other=ninf).to(ACC) * inv_t
        b = tl.load(t_ptr + base + cols, mask=cm, other=ninf).to(ACC) * inv_t
        # A row max that is -inf (nothing but -inf) shifts by 0, so exp(-inf - -inf) never forms.
        m_a = tl.max(a, axis=1)
        m_a = tl.where(m_a == ninf, 0.0, m_a)
        m_b = tl.max(b, axis=1)
        m_b = tl.where(m_b == ninf, 0.0, m_b)
        ea = tl.exp(a - m_a[:, None])
        db = b - m_b[:, None]
        e = tl.exp(db)
        z_a = tl.sum(ea, axis=1)
        z_b = tl.sum(e, axis=1)
        # Zero-probability classes (teacher -inf, padding included) add exactly 0: the limit
        # p log p -> 0, not 0 * inf. A student -inf under teacher mass adds +inf (the true KL).
        da = tl.where(b == ninf, 0.0, a - m_a[:, None])
        w = tl.sum(e * tl.where(e > 0, db - da, 0.0), axis=1)
        loss = t_sq * (w / z_b + tl.log(z_a) - tl.log(z_b))
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        if NEED_GRAD:
            # The exponentials are still in registers: softmax = e / z, no second read or exp.
            g = coef * (ea / z_a[:, None] - e / z_b[:, None])
            tl.store(
                grad_ptr + base + cols, g.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & cm
            )
    else:
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
            # New running maxima; one that is still -inf (nothing seen) shifts by 0 instead, so
            # that exp(-inf - -inf) never forms a NaN.
            m_a_new = tl.maximum(m_a, tl.max(a, axis=1))
            sh_a = tl.where(m_a_new == ninf, 0.0, m_a_new)
            m_b_new = tl.maximum(m_b, tl.max(b, axis=1))
            sh_b = tl.where(m_b_new == ninf, 0.0, m_b_new)
            # Old maxima; -inf (nothing seen: z = 0, w = 0, or w = +inf already) maps to the new
            # one so that the corrections below are exactly 0 rather than inf * 0.
            o_a = tl.where(m_a == ninf, sh_a, m_a)
            o_b = tl.where(m_b == ninf, sh_b, m_b)

            z_a = z_a * tl.exp(o_a - sh_a) + tl.sum(tl.exp(a - sh_a[:, None]), axis=1)

            # w's old terms (b - m_b) - (a - m_a) move to the new maxima, then get rescaled.
            alpha = tl.exp(o_b - sh_b)
            w = tl.where(alpha > 0, alpha * (w + z_b * ((o_b - sh_b) - (o_a - sh_a))), 0.0)
            z_b = z_b * alpha
            db = b - sh_b[:, None]
            e = tl.exp(db)
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
                tl.store(
                    grad_ptr + base + col,
                    g.to(grad_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & cm,
                )


MAX_ONE_TILE = 16384
"""Widest row the one-tile path takes (GPU: 16 warps, 32 fp32 values of each input per thread)."""
MAX_ONE_TILE_FP64 = 4096
"""Widest float64 row the one-tile path takes on a GPU; wider ones stream. A tile of more than
4096 columns takes 16 warps, and 512 threads get at most 128 registers each: compiled for sm_80 /
sm_90 (triton 3.9), the fp64 one-tile kernel spills there (8192 columns: 672+ bytes a thread,
16384: up to 13060), whereas 4096 columns at 8 warps (16 fp64 values of each input a thread)
and the 4096-wide streaming tile do not."""
STREAM_TILE = 4096
"""Column tile of the streaming path on a GPU (both operands stay in registers at 8 warps)."""


def _blocks(cols: int, itemsize: int = 4) -> tuple[int, int, int, bool]:
    """(BLOCK_R, BLOCK_C, num_warps, one_tile) for rows of ``cols`` elements of ``itemsize``
    bytes. Short rows share a program (BLOCK_R of them, up to 4096 elements); the interpreter pays
    per tile, not per element, so it streams 16384-wide tiles (and never uses warps)."""
    width = triton.next_power_of_2(cols)
    cap = MAX_ONE_TILE_FP64 if itemsize == 8 and not triton_interpret() else MAX_ONE_TILE
    if width <= cap:
        block_c = width
        block_r = max(1, min(64, STREAM_TILE // block_c))
        tile = block_r * block_c
        warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16
        return block_r, block_c, warps, True
    block_c = MAX_ONE_TILE if triton_interpret() else STREAM_TILE
    return 1, block_c, 8, False


GPU_WIDTH_CLASSES = tuple(2**i for i in range(15)) + (2 * MAX_ONE_TILE,)
"""One row width per distinct GPU choice of ``_blocks``: every power of two up to MAX_ONE_TILE
(one tile each; float64 streams above MAX_ONE_TILE_FP64), then the streaming path."""
NUM_STAGES = 3
"""Software-pipelining depth (triton's default; the streaming loop's loads are pipelined)."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _split(x: float) -> tuple[float, float]:
    """(head, tail): ``head`` is ``x`` rounded to fp32 (what a float kernel argument carries on a
    GPU), ``tail`` the rest, also fp32; head + tail equals ``x`` to ~2^-48 relative."""
    head = _fp32(x)
    return head, (_fp32(x - head) if math.isfinite(head) else 0.0)


def _fp32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond fp32's range: what the fp32 argument would hold
        return math.copysign(math.inf, x)


def _check(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    row_loss: torch.Tensor,
    grad: torch.Tensor | None,
) -> None:
    """The launcher's contract, each failure naming the argument (the kernel itself would read or
    write out of bounds on a mismatch)."""
    where = "distill_kl (triton)"
    for name, x in (
        ("student", student),
        ("teacher", teacher),
        ("row_loss", row_loss),
        ("grad", grad),
    ):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(x).__name__}")
    if student.dim() != 2:
        raise ValueError(f"{where}: student must be 2-D [R, C], got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"{where}: teacher shape {tuple(teacher.shape)} must equal student shape "
            f"{tuple(student.shape)}"
        )
    if student.dtype not in _DTYPES:
        raise TypeError(
            f"{where}: student dtype {student.dtype} is not supported; expected one "
            f"of {[str(d) for d in _DTYPES]}"
        )
    if teacher.dtype != student.dtype:
        raise TypeError(
            f"{where}: teacher dtype {teacher.dtype} must equal student dtype {student.dtype}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")
    rows = student.shape[0]
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    outs = [("row_loss", row_loss, (rows,), loss_dtype)]
    if grad is not None:
        outs.append(("grad", grad, tuple(student.shape), saved_grad_dtype(student.dtype)))
    for name, x, _, _ in [("teacher", teacher, None, None)] + outs:
        if x.device != student.device:
            raise ValueError(
                f"{where}: {name} is on {x.device} but student is on "
                f"{student.device}; all must be on one device"
            )
    if student.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{where}: tensors on {student.device.type} are not supported")
    for name, x in (("student", student), ("teacher", teacher)):
        if not x.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous (call .contiguous())")
    for name, x, shape, dtype in outs:
        if tuple(x.shape) != shape or x.dtype != dtype or not x.is_contiguous():
            raise ValueError(
                f"{where}: {name} must be a contiguous {dtype} tensor of shape "
                f"{shape}, got {x.dtype} {tuple(x.shape)}"
                f"{'' if x.is_contiguous() else ' (non-contiguous)'}"
            )


def launch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    grad_scale: float,
    row_loss: torch.Tensor,
    grad: torch.Tensor | None,
) -> None:
    """Fill ``row_loss`` ``[R]`` (fp32; fp64 for float64) and, unless ``grad`` is None, ``grad``
    ``[R, C]`` in ``saved_grad_dtype`` (caller-owned: tests poison them). ``student``/``teacher``:
    contiguous ``[R, C]`` of one floating dtype on one device; anything else raises."""
    _check(student, teacher, temperature, row_loss, grad)
    rows, cols = student.shape
    if rows == 0 or cols == 0:
        return
    block_r, block_c, warps, one_tile = _blocks(cols, student.element_size())
    acc = tl.float64 if student.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(rows, block_r),)
    (inv_t, inv_t_lo), (t_sq, t_sq_lo), (coef, coef_lo) = (
        _split(1.0 / temperature),
        _split(temperature * temperature),
        _split(grad_scale * temperature),
    )
    args = (
        student,
        teacher,
        row_loss,
        grad if grad is not None else row_loss,
        rows,
        cols,
        inv_t,
        t_sq,
        coef,
        inv_t_lo,
        t_sq_lo,
        coef_lo,
    )
    # Triton launches on the current device; make it the inputs' device.
    guard = torch.cuda.device(student.device) if student.is_cuda else contextlib.nullcontext()
    with guard:
        _distill_kl_fwd_kernel[grid](
            *args,
            NEED_GRAD=grad is not None,
            ONE_TILE=one_tile,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            ACC=acc,
            num_warps=warps,
            num_stages=NUM_STAGES,
        )


def fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    grad_scale: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``torch.ops.r2d2.distill_kl_fwd`` on ``[R, C]`` inputs (made contiguous
    here, as the compiled op does)."""
    student = student.contiguous()
    teacher = teacher.contiguous()
    rows = student.shape[0]
    loss_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=loss_dtype, device=student.device)
    grad = torch.empty(
        student.shape if need_grad else (0,),
        dtype=saved_grad_dtype(student.dtype),
        device=student.device,
    )
    launch(student, teacher, temperature, grad_scale, row_loss, grad if need_grad else None)
    return row_loss, grad
