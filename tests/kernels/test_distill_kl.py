"""distill_kl: every backend that can run here against the fp32 reference, values and student
gradients; the compiled op's contract (opcheck, fake, errors); GPU cases marked ``gpu``.

Tolerances: the kernels read the same low-precision inputs the reference upcasts, so losses agree
to fp32 accumulation-order error in every input dtype; gradients are rounded once to the student's
dtype by both, so they agree to about one unit in the last place of that dtype (plus a few
subnormal steps for fp16, where the per-element gradients of wide rows are tiny).
"""

from __future__ import annotations

import pytest
import torch

from _helpers.distill_kl import (
    GPU_TOL,
    TOL,
    assert_matches,
    need_backend,
    rand_logits,
    run_backend,
    run_ref,
)
from r2d2 import _ext
from r2d2.kernels import BackendUnavailable, DistillKLLoss, distill_kl, distill_kl_ref
from r2d2.kernels.distill_kl import saved_grad_dtype

HAS_CUDA = torch.cuda.is_available()
HAS_OP = _ext.has_op("distill_kl_fwd")

SHAPES = [
    (1, 1),
    (37, 1),
    (3, 7),
    (37, 7),
    (1, 1000),
    (37, 1000),
    (3, 32768),
    (2, 3, 7),
    (5, 1, 257),
]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, shape, temperature, dtype):
    need_backend(backend)
    s, t = rand_logits(shape, dtype), rand_logits(shape, dtype)
    out, grad = run_backend(backend, s, t, temperature)
    assert_matches(out, grad, *run_ref(s, t, temperature), dtype, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_eager_backend_is_the_reference(dtype):
    s, t = rand_logits((7, 63), dtype), rand_logits((7, 63), dtype)
    out, grad = run_backend("eager", s, t, 2.0)
    ref_out, ref_grad = run_ref(s, t, 2.0)
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    # ...and the reference is the definition: T^2 * mean_rows sum p (log p - log q), in float64.
    p = torch.softmax(t.double() / 2.0, -1)
    log_q = torch.log_softmax(s.double() / 2.0, -1)
    expect = 4.0 * (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_and_leading_dims(backend, reduction):
    need_backend(backend)
    shape = (2, 3, 257)
    s, t = rand_logits(shape, torch.float32), rand_logits(shape, torch.float32)
    # A random upstream gradient checks the per-row scaling of "none".
    g = torch.rand(2, 3) + 0.5 if reduction == "none" else torch.tensor(1.7)
    out, grad = run_backend(backend, s, t, 2.0, reduction, grad_out=g)
    ref_out, ref_grad = run_ref(s, t, 2.0, reduction, grad_out=g)
    assert out.shape == ((2, 3) if reduction == "none" else ())
    assert_matches(out, grad, ref_out, ref_grad, torch.float32, 2.0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_wide_rows_100k(backend):
    need_backend(backend)
    s, t = rand_logits((3, 100000), torch.float32), rand_logits((3, 100000), torch.float32)
    out, grad = run_backend(backend, s, t, 1.0)
    assert_matches(out, grad, *run_ref(s, t, 1.0), torch.float32, 1.0)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_extreme_logits(backend, dtype):
    """+-1e4 logits (fp16 can hold them): near one-hot distributions, huge KL, finite values."""
    need_backend(backend)
    shape = (37, 257)
    s = ((torch.rand(shape) * 2 - 1) * 1e4).to(dtype)
    t = ((torch.rand(shape) * 2 - 1) * 1e4).to(dtype)
    # Same tolerances as ordinary logits: the kernels form softmax as exp((x - max) - log z), so
    # the 1e4 magnitude cancels exactly instead of rounding at ulp(1e4) ~ 1e-3.
    tol = TOL
    for temperature in (1.0, 4.0):
        out, grad = run_backend(backend, s, t, temperature, "none")
        ref_out, ref_grad = run_ref(s, t, temperature, "none")
        assert ref_out.min() > 1.0  # the test means something: the distributions differ a lot
        assert_matches(out, grad, ref_out, ref_grad, dtype, temperature, tol)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_equal_distributions_with_huge_offset(backend):
    """Student = teacher + 1e4: same distribution, KL = 0 up to the inputs' own rounding."""
    need_backend(backend)
    t = rand_logits((3, 1000), torch.float32)
    s = t + 1e4
    out, grad = run_backend(backend, s, t, 1.0, "none")
    # Rounding s to fp32 at 1e4 perturbs each logit by up to 5e-4 (half an ulp), so the true KL
    # is ~1e-7 and the gradient ~1e-4: both must come out at that scale, not at ulp(1e4).
    truth, truth_grad = run_ref(s.double(), t.double(), 1.0, "none")
    assert (out.double() - truth).abs().max() < 1e-6
    assert truth_grad.abs().max() > 1e-5
    torch.testing.assert_close(grad.double(), truth_grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_masked_teacher_classes(backend):
    """Teacher logits of -inf are zero-probability classes: they add 0, never NaN."""
    need_backend(backend)
    s, t = rand_logits((5, 300), torch.float32), rand_logits((5, 300), torch.float32)
    t[:, 17:130] = float("-inf")
    t[2, :299] = float("-inf")  # one row with a single class left
    s[4, 200:] = float("-inf")  # masked in the student where the teacher has no mass too
    t[4, 200:] = float("-inf")
    out, grad = run_backend(backend, s, t, 2.0, "none")
    ref_out, ref_grad = run_ref(s, t, 2.0, "none")
    assert torch.isfinite(ref_out).all()
    assert_matches(out, grad, ref_out, ref_grad, torch.float32, 2.0)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_student_minus_inf_where_teacher_has_mass_is_inf(backend):
    need_backend(backend)
    s, t = rand_logits((2, 9), torch.float32), rand_logits((2, 9), torch.float32)
    s[0, 3] = float("-inf")
    out = distill_kl(s, t, reduction="none", backend=backend)
    assert out[0] == float("inf") and torch.isfinite(out[1])


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_zero_rows_are_an_empty_batch(backend):
    """No rows: sum is 0 (as torch), none is empty, batchmean is 0 too (not 0/0 = NaN)."""
    need_backend(backend)
    for reduction, check in (
        ("batchmean", lambda x: x == 0),
        ("sum", lambda x: x == 0),
        ("none", lambda x: torch.tensor(x.shape == (4, 0))),
    ):
        s = torch.randn(4, 0, 7, requires_grad=True)
        out = distill_kl(s, torch.randn(4, 0, 7), reduction=reduction, backend=backend)
        assert check(out)
        out.sum().backward()
        assert s.grad.shape == (4, 0, 7)


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_teacher_gets_no_gradient(backend):
    need_backend(backend)
    s = rand_logits((3, 7), torch.float32).requires_grad_(True)
    t = rand_logits((3, 7), torch.float32).requires_grad_(True)
    distill_kl(s, t, temperature=2.0, backend=backend).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_noncontiguous_and_no_grad(backend):
    need_backend(backend)
    s = rand_logits((63, 9), torch.float32).t()  # [9, 63], non-contiguous
    t = rand_logits((9, 63), torch.float32)
    ref = distill_kl_ref(s, t, 2.0, "none")
    with torch.no_grad():
        out = distill_kl(s, t, temperature=2.0, reduction="none", backend=backend)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-5)
    out, grad = run_backend(backend, s, t, 2.0)
    assert_matches(out, grad, *run_ref(s, t, 2.0), torch.float32, 2.0)


def test_module_and_backward_twice():
    s = rand_logits((4, 33), torch.float32).requires_grad_(True)
    t = rand_logits((4, 33), torch.float32)
    loss = DistillKLLoss(temperature=2.0)(s, t)
    loss.backward(retain_graph=True)
    g1 = s.grad.clone()
    loss.backward()  # the saved gradient must not have been scaled in place
    torch.testing.assert_close(s.grad, 2 * g1)
    torch.testing.assert_close(g1, run_ref(s, t, 2.0)[1], rtol=1e-4, atol=1e-7)


# ---- loss scaling: the saved gradient must not lose what a GradScaler's scale would keep ----


def _assert_grad_like_eager(grad, ref_grad, s, t, temperature, scale_rows, fp32_ulps=8):
    """Element-wise, with no tolerance relative to the largest element (which would hide small
    elements flushed to zero). Allowed: two roundings of the dtype, four of its subnormal steps,
    and the fp32 error of forming q - p (a few ulps of max(q, p), times the scale) that eager and
    kernel both carry. ``scale_rows``: each row's d loss / d row_loss."""
    assert grad.dtype == ref_grad.dtype
    fi = torch.finfo(grad.dtype)
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)
    fp32_err = (
        fp32_ulps
        * torch.finfo(torch.float32).eps
        * temperature
        * torch.maximum(q, p)
        * (scale_rows.double().abs().reshape(-1, 1))
    )
    bound = 2 * fi.eps * ref_grad.double().abs() + 4 * fi.smallest_normal * fi.eps + fp32_err
    err = (grad.double() - ref_grad.double()).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{bad.sum().item()} elements off; worst err {err.max().item():.3g}, "
        f"e.g. got {grad[bad][:4].tolist()} want {ref_grad[bad][:4].tolist()}"
    )
    # The same elements are exactly zero (eager underflows only where the scaled value does).
    zeros, ref_zeros = (grad == 0).sum().item(), (ref_grad == 0).sum().item()
    assert abs(zeros - ref_zeros) <= 1e-4 * grad.numel(), (zeros, ref_zeros)


LOSS_SCALE_CASES = [  # (reduction, upstream): GradScaler's 2^16 on a mean; a scale on a sum
    ("batchmean", lambda rows: torch.tensor(65536.0)),
    ("sum", lambda rows: torch.tensor(256.0)),
    # per row: a large, uneven upstream (a weighted, scaled per-sample loss)
    ("none", lambda rows: (torch.rand(rows) + 0.5) * (65536.0 / rows)),
]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOSS_SCALE_CASES, ids=lambda c: c[0])
def test_gradient_under_loss_scaling_matches_eager(backend, dtype, case):
    """Loss * 2^16 (what torch.amp.GradScaler does): eager applies the scale before its single
    rounding to the student's dtype, so the fused paths must too. An fp16 gradient stored
    pre-multiplied by 1/rows zeroed 61% of its elements at (4096, 1000); at (512, 1000) it leaves
    1.5% zero and 74% more than two roundings off, and even an unscaled fp16 store puts 0.7% off
    (those below fp16's 6e-8). bf16 has fp32's range: a guard that it stays one rounding away."""
    need_backend(backend)
    reduction, upstream = case
    rows, cols = 512, 1000
    s, t = rand_logits((rows, cols), dtype), rand_logits((rows, cols), dtype)
    g = upstream(rows)
    out, grad = run_backend(backend, s, t, 2.0, reduction, grad_out=g)
    ref_out, ref_grad = run_ref(s, t, 2.0, reduction, grad_out=g)
    assert torch.isfinite(ref_grad).all() and (ref_grad != 0).float().mean() > 0.99
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=1e-4)
    scale_rows = g / rows if reduction == "batchmean" else g.expand(rows)
    _assert_grad_like_eager(grad, ref_grad, s, t, 2.0, scale_rows)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_saved_gradient_dtype(backend):
    """fp16 saves the gradient in fp32 (fp16's range flushes it), the other dtypes in their own."""
    need_backend(backend)
    fwd = {"cpp": torch.ops.r2d2.distill_kl_fwd if HAS_OP else None}.get(backend)
    if backend == "triton":
        from r2d2.kernels.distill_kl import triton as distill_kl_triton

        fwd = distill_kl_triton.fwd
    for dtype, want in (
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ):
        s, t = rand_logits((3, 7), dtype), rand_logits((3, 7), dtype)
        _, grad = fwd(s, t, 2.0, 1.0, True)
        assert grad.dtype == want == saved_grad_dtype(dtype)


# ---- the Triton kernel's one-tile (one read) and streaming (two sweeps) paths ----


def test_triton_one_tile_up_to_16384_columns():
    need_backend("triton")
    from r2d2.kernels.distill_kl import triton as k

    for cols in (1, 7, 1000, 4096, 16384):
        assert k._blocks(cols)[3], cols
    for cols in (16385, 32768, 100000):
        assert not k._blocks(cols)[3], cols


@pytest.mark.parametrize("cols", [16384, 16385], ids=["one_tile", "streaming"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_paths_at_the_boundary(cols, dtype):
    need_backend("triton")
    s, t = rand_logits((3, cols), dtype), rand_logits((3, cols), dtype)
    t[1, ::5] = float("-inf")  # masked classes on both paths
    g = torch.rand(3) + 0.5
    out, grad = run_backend("triton", s, t, 2.0, "none", grad_out=g)
    ref_out, ref_grad = run_ref(s, t, 2.0, "none", grad_out=g)
    assert_matches(out, grad, ref_out, ref_grad, dtype, 2.0)


# ---- temperature: a number or a 0-d tensor ----


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_temperature_as_a_0d_tensor(backend):
    need_backend(backend)
    s, t = rand_logits((5, 33), torch.float32), rand_logits((5, 33), torch.float32)
    want = distill_kl(s, t, temperature=2.0, reduction="none", backend=backend)
    for temp in (torch.tensor(2.0), torch.tensor(2.0, dtype=torch.float64), torch.tensor(2), 2):
        got = distill_kl(s, t, temperature=temp, reduction="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert DistillKLLoss(temperature=torch.tensor(2.0), backend=backend)(s, t) == want.mean()


def test_temperature_rejections_say_what_is_accepted():
    s = torch.randn(3, 7)
    accepted = r"a Python int/float or a 0-d real tensor"
    with pytest.raises(ValueError, match=accepted + r".*shape \(1,\)"):
        distill_kl(s, s, temperature=torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"temperature is a constant here.*detach\(\)"):
        distill_kl(s, s, temperature=torch.tensor(2.0, requires_grad=True))
    for bad in (True, "2", None, float("nan"), float("inf"), -1.0, torch.tensor(0.0)):
        with pytest.raises(ValueError, match=accepted):
            distill_kl(s, s, temperature=bad)


# ---- the Triton launcher checks its arguments (the kernel would read out of bounds) ----


def test_triton_launcher_validates_its_arguments():
    need_backend("triton")
    from r2d2.kernels.distill_kl import triton as k

    s, t = torch.randn(4, 9), torch.randn(4, 9)
    loss, grad = torch.empty(4), torch.empty(4, 9)
    k.launch(s, t, 2.0, 1.0, loss, grad)  # the valid call the cases below break one at a time
    cases = [
        (
            (s, torch.randn(3, 9), 2.0, 1.0, loss, grad),
            ValueError,
            r"teacher shape \(3, 9\) must equal student shape \(4, 9\)",
        ),
        (
            (s.reshape(2, 2, 9), t.reshape(2, 2, 9), 2.0, 1.0, loss, grad),
            ValueError,
            r"student must be 2-D",
        ),
        (
            (s, t.double(), 2.0, 1.0, loss, grad),
            TypeError,
            "teacher dtype torch.float64 must equal student dtype torch.float32",
        ),
        ((s.long(), t.long(), 2.0, 1.0, loss, grad), TypeError, "student dtype torch.int64"),
        (
            (s, torch.empty(4, 9, device="meta"), 2.0, 1.0, loss, grad),
            ValueError,
            "teacher is on meta but student is on cpu",
        ),
        ((s, t, 2.0, 1.0, torch.empty(4, device="meta"), grad), ValueError, "row_loss is on meta"),
        (
            (torch.randn(9, 4).t(), t, 2.0, 1.0, loss, grad),
            ValueError,
            "student must be contiguous",
        ),
        (
            (s, torch.randn(9, 4).t(), 2.0, 1.0, loss, grad),
            ValueError,
            "teacher must be contiguous",
        ),
        (
            (s, t, 2.0, 1.0, torch.empty(3), grad),
            ValueError,
            r"row_loss must be a contiguous torch.float32 tensor of shape \(4,\)",
        ),
        (
            (s, t, 2.0, 1.0, loss, torch.empty(4, 8)),
            ValueError,
            r"grad must be a contiguous torch.float32 tensor of shape \(4, 9\)",
        ),
        ((s, t, 2.0, 1.0, loss, torch.empty(9, 4).t()), ValueError, r"\(non-contiguous\)"),
        (
            (s.half(), t.half(), 2.0, 1.0, loss, grad.half()),
            ValueError,
            "grad must be a contiguous torch.float32",
        ),  # fp16 saves its gradient in fp32
        ((s, t, 0.0, 1.0, loss, grad), ValueError, "temperature must be a finite number > 0"),
        ((s, [1.0], 2.0, 1.0, loss, grad), TypeError, "teacher must be a tensor, got list"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            k.launch(*args)


# ---- poisoned output buffers: an element the kernel does not write stays NaN and fails ----


def _poisoned_launch(backend, s, t, temperature, grad_scale):
    rows = s.numel() // s.shape[-1]
    loss_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    row_loss = torch.full((rows,), float("nan"), dtype=loss_dtype, device=s.device)
    grad = torch.full(s.shape, float("nan"), dtype=saved_grad_dtype(s.dtype), device=s.device)
    if backend == "triton":
        from r2d2.kernels.distill_kl import triton as distill_kl_triton

        distill_kl_triton.launch(s, t, temperature, grad_scale, row_loss, grad)
    else:
        torch.ops.r2d2.distill_kl_fwd_out(s, t, temperature, grad_scale, row_loss, grad)
    return row_loss, grad


def _check_poisoned(backend, shape, dtype, device, tol):
    s, t = rand_logits(shape, dtype, device), rand_logits(shape, dtype, device)
    rows = shape[0]
    row_loss, grad = _poisoned_launch(backend, s, t, 2.0, 1.0 / rows)
    ref_out, ref_grad = run_ref(
        s.to(saved_grad_dtype(dtype)),
        t.to(saved_grad_dtype(dtype)),
        2.0,
        "none",
        grad_out=torch.full((rows,), 1.0 / rows, device=device),
    )
    assert_matches(
        row_loss, grad, ref_out, ref_grad, dtype, 2.0, tol, grad_dtype=saved_grad_dtype(dtype)
    )


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 7), (3, 1000), (65, 33)], ids=str)
def test_every_output_element_written(backend, shape, dtype):
    need_backend(backend)
    _check_poisoned(backend, shape, dtype, "cpu", TOL)


# ---- float64 gradcheck and the compiled op's contract ----


@pytest.mark.parametrize("backend", ["eager", "cpp"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_float64(backend, reduction):
    need_backend(backend)
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: distill_kl(x, t, temperature=2.0, reduction=reduction, backend=backend), (s,)
    )


@pytest.mark.skipif(not HAS_OP, reason="r2d2._C with distill_kl_fwd is not built")
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck_cpp(need_grad):
    s, t = torch.randn(5, 33), torch.randn(5, 33)
    torch.library.opcheck(torch.ops.r2d2.distill_kl_fwd.default, (s, t, 2.0, 0.2, need_grad))
    s16, t16 = s.half().reshape(5, 3, 11), t.half().reshape(5, 3, 11)
    torch.library.opcheck(torch.ops.r2d2.distill_kl_fwd.default, (s16, t16, 1.0, 1.0, need_grad))


@pytest.mark.skipif(not HAS_OP, reason="r2d2._C with distill_kl_fwd is not built")
def test_opcheck_cpp_out_variant():
    s, t = torch.randn(5, 33), torch.randn(5, 33)
    torch.library.opcheck(
        torch.ops.r2d2.distill_kl_fwd_out.default,
        (s, t, 2.0, 0.2, torch.empty(5), torch.empty(5, 33)),
    )


@pytest.mark.skipif(not HAS_OP, reason="r2d2._C with distill_kl_fwd is not built")
# Dispatch looks its answers up through lru_cache'd helpers; dynamo traces through them and says so.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_traces_the_op():
    fn = torch.compile(
        lambda a, b: distill_kl(a, b, temperature=2.0, backend="cpp"),
        backend="aot_eager",
        fullgraph=True,
    )
    s = torch.randn(5, 33, requires_grad=True)
    t = torch.randn(5, 33)
    out = fn(s, t)
    out.backward()
    ref_out, ref_grad = run_ref(s, t, 2.0)
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_cuda_reduction_order_on_host(tmp_path):
    """The CUDA kernel's merge order (strided per-thread states, empty threads, warp butterflies,
    cross-warp merge) replayed on the host with the kernel's own State, vs float64."""
    import shutil
    import subprocess
    from pathlib import Path

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parents[2]
    exe = tmp_path / "block_reduce"
    subprocess.run(
        [
            cxx,
            "-std=c++17",
            "-O2",
            "-I",
            str(root / "csrc"),
            str(root / "tests/cpp/distill_kl_block_reduce.cc"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert "144 cases, 0 mismatches" in run.stdout


# ---- clear errors ----


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_errors_name_the_argument(backend):
    need_backend(backend)
    s = torch.randn(3, 7)
    with pytest.raises(
        ValueError, match=r"student_logits shape \(3, 7\).*teacher_logits shape \(3, 8\)"
    ):
        distill_kl(s, torch.randn(3, 8), backend=backend)
    with pytest.raises(TypeError, match=r"student_logits dtype torch\.int64"):
        distill_kl(
            torch.ones(3, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.long), backend=backend
        )
    with pytest.raises(TypeError, match=r"teacher_logits dtype torch\.float16 must equal"):
        distill_kl(s, s.half(), backend=backend)
    with pytest.raises(ValueError, match="student_logits is on cpu but teacher_logits is on meta"):
        distill_kl(s, torch.empty(3, 7, device="meta"), backend=backend)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0 .*, got 0$"):
        distill_kl(s, s, temperature=0, backend=backend)
    with pytest.raises(ValueError, match="reduction='mean'"):
        distill_kl(s, s, reduction="mean", backend=backend)
    with pytest.raises(ValueError, match="non-empty last"):
        distill_kl(torch.randn(3, 0), torch.randn(3, 0), backend=backend)


@pytest.mark.skipif(not HAS_OP, reason="r2d2._C with distill_kl_fwd is not built")
def test_compiled_op_checks_its_arguments():
    """The C++ boundary checks too (for callers of torch.ops.r2d2.distill_kl_fwd)."""
    op = torch.ops.r2d2.distill_kl_fwd
    with pytest.raises(
        RuntimeError,
        match=r"student_logits shape \[3, 7\] must equal "
        r"teacher_logits shape \[3, 8\]",
    ):
        op(torch.randn(3, 7), torch.randn(3, 8), 1.0)
    with pytest.raises(RuntimeError, match="student_logits dtype Long is not supported"):
        op(torch.ones(3, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        op(torch.randn(3, 7), torch.randn(3, 7), -1.0)
    with pytest.raises(RuntimeError, match="row_loss must be a contiguous Float tensor of 3"):
        torch.ops.r2d2.distill_kl_fwd_out(
            torch.randn(3, 7), torch.randn(3, 7), 1.0, 1.0, torch.empty(4), torch.empty(3, 7)
        )


def test_cuda_backend_on_cpu_tensors_says_why():
    s = torch.randn(3, 7)
    with pytest.raises(BackendUnavailable, match="backend='cuda' needs CUDA tensors"):
        distill_kl(s, s, backend="cuda")


# ---- GPU: cuda and triton in every dtype (run on the lent GPU machine) ----

# One-pass / two-pass boundaries: CUDA (bf16 16384 | 16392, fp32 8192 | 16384, unvectorized
# rows 1001 | 9001), Triton 16384 for every dtype.
GPU_SHAPES = [
    (1, 1),
    (37, 7),
    (3, 1000),
    (257, 4096),
    (3, 32768),
    (2, 100000),
    (7, 1001),
    (2, 8192),
    (2, 16384),
    (2, 16392),
    (3, 9001),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_matches_reference(backend, shape, dtype):
    need_backend(backend, "cuda")
    s, t = rand_logits(shape, dtype, "cuda"), rand_logits(shape, dtype, "cuda")
    out, grad = run_backend(backend, s, t, 2.0)
    assert_matches(out, grad, *run_ref(s, t, 2.0), dtype, 2.0, GPU_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 7), (65, 4096), (3, 100000)], ids=str)
def test_gpu_every_output_element_written(backend, shape, dtype):
    need_backend(backend, "cuda")
    _check_poisoned(backend, shape, dtype, "cuda", GPU_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_extreme_logits_and_reductions(backend, dtype):
    need_backend(backend, "cuda")
    shape = (4, 9, 1000)
    s = ((torch.rand(shape, device="cuda") * 2 - 1) * 1e4).to(dtype)
    t = ((torch.rand(shape, device="cuda") * 2 - 1) * 1e4).to(dtype)
    # Looser gradient tolerance than CPU: fast-math exp's error grows with |argument| (~1e4 here).
    tol = {dtype: (GPU_TOL[dtype][0], max(GPU_TOL[dtype][1], 2e-3), 2e-3, GPU_TOL[dtype][3])}
    for reduction in ("batchmean", "sum", "none"):
        out, grad = run_backend(backend, s, t, 4.0, reduction)
        assert_matches(out, grad, *run_ref(s, t, 4.0, reduction), dtype, 4.0, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOSS_SCALE_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("cols", [1000, 32768], ids=["one_pass", "two_pass"])
def test_gpu_gradient_under_loss_scaling_matches_eager(backend, dtype, case, cols):
    need_backend(backend, "cuda")
    reduction, upstream = case
    rows = 512
    s, t = rand_logits((rows, cols), dtype, "cuda"), rand_logits((rows, cols), dtype, "cuda")
    g = upstream(rows).cuda()
    out, grad = run_backend(backend, s, t, 2.0, reduction, grad_out=g)
    ref_out, ref_grad = run_ref(s, t, 2.0, reduction, grad_out=g)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-3)
    scale_rows = g / rows if reduction == "batchmean" else g.expand(rows)
    # fast-math exp carries a few more ulps (GPU_TOL's reasoning)
    _assert_grad_like_eager(grad, ref_grad, s, t, 2.0, scale_rows, fp32_ulps=32)


@pytest.mark.gpu
def test_gpu_cuda_misaligned_rows_use_the_scalar_path():
    """A row start that is not 16-byte aligned must not take the vector-load path."""
    need_backend("cuda", "cuda")
    buf = torch.randn(2, 7 * 64 + 1, device="cuda").half()
    s = buf[0, 1:].view(7, 64)  # contiguous, data pointer offset by one element
    t = buf[1, 1:].view(7, 64)
    assert s.is_contiguous() and s.data_ptr() % 16 != 0
    out, grad = run_backend("cuda", s, t, 1.0)
    assert_matches(out, grad, *run_ref(s, t, 1.0), torch.float16, 1.0, GPU_TOL)


@pytest.mark.gpu
def test_gpu_gradcheck_cuda_float64():
    need_backend("cuda", "cuda")
    s = torch.randn(3, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(
        lambda x: distill_kl(x, t, temperature=2.0, backend="cuda"), (s,)
    )
