"""distill_kl edge cases beyond test_distill_kl.py (helpers and tolerances shared with it:
tests/_helpers/distill_kl.py): non-finite logits, fp64 paths, layouts the CUDA vector path must
refuse, the out variant, the current stream and CUDA graphs, opcheck, and int64 offsets. All but
the first need a GPU."""

from __future__ import annotations

import pytest
import torch

from _helpers.distill_kl import (
    GPU_TOL,
    assert_matches,
    need_backend,
    rand_logits,
    run_backend,
    run_ref,
)
from r2d2.kernels import distill_kl, distill_kl_ref


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_nan_logit_makes_the_row_nan(backend):
    """A NaN logit is never dropped: partial states (256-column chunks on cpp, per-thread parts on
    CUDA) holding only NaN / -inf must carry it into the merged row (it used to give a finite loss)."""
    need_backend(backend)
    s, t = rand_logits((4, 600), torch.float32), rand_logits((4, 600), torch.float32)
    t[0, 5] = float("nan")
    t[1, 256:512] = float("-inf")
    t[1, 300] = float("nan")
    s[2, 256:512] = float("-inf")
    t[2, 256:512] = float("-inf")
    s[2, 300] = float("nan")
    out = distill_kl(s, t, reduction="none", backend=backend)
    assert out[:3].isnan().all() and torch.isfinite(out[3])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(37, 1000), (3, 5000), (3, 1001), (2, 8193)], ids=str)
def test_gpu_cuda_float64_paths(shape):
    """fp64 vector one pass (1000), vector two pass (5000 > 4096), scalar (odd widths)."""
    need_backend("cuda", "cuda")
    s, t = rand_logits(shape, torch.float64, "cuda"), rand_logits(shape, torch.float64, "cuda")
    out, grad = run_backend("cuda", s, t, 2.0)
    assert_matches(out, grad, *run_ref(s, t, 2.0), torch.float64, 2.0, GPU_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cols", [301, 4096, 40000], ids=str)
def test_gpu_masked_and_nonfinite_logits(backend, cols):
    """-inf classes (whole warps without teacher mass, one class left), then -inf / NaN where
    they make the row infinite or NaN, the other rows untouched."""
    need_backend(backend, "cuda")
    s, t = (
        rand_logits((6, cols), torch.float32, "cuda"),
        rand_logits((6, cols), torch.float32, "cuda"),
    )
    t[:, 17 : cols // 2] = float("-inf")
    t[2, : cols - 1] = float("-inf")
    s[4, cols // 2 :] = float("-inf")
    t[4, cols // 2 :] = float("-inf")
    out, grad = run_backend(backend, s, t, 2.0, "none")
    assert_matches(out, grad, *run_ref(s, t, 2.0, "none"), torch.float32, 2.0, GPU_TOL)
    s2, t2 = s.clone(), t.clone()
    s2[0, 3] = float("-inf")
    t2[1, cols - 1] = float("nan")
    s2[3, cols - 2] = float("nan")
    with torch.no_grad():
        out2 = distill_kl(s2, t2, reduction="none", backend=backend)
    assert out2[0] == float("inf") and out2[1].isnan() and out2[3].isnan()
    assert torch.isfinite(out2[[2, 4, 5]]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_cuda_no_grad_noncontiguous_and_misaligned_teacher(dtype):
    need_backend("cuda", "cuda")
    s = rand_logits((64, 37), dtype, "cuda").t()  # non-contiguous [37, 64]
    t = rand_logits((37 * 64 + 1,), dtype, "cuda")[1:].view(37, 64)  # one element off 16 bytes
    ref = distill_kl_ref(s, t, 2.0, "none")
    with torch.no_grad():  # need_grad=False: the kernel's grad pointer is null
        out = distill_kl(s, t, temperature=2.0, reduction="none", backend="cuda")
    torch.testing.assert_close(out, ref, rtol=GPU_TOL[dtype][0], atol=GPU_TOL[dtype][0] * 4)
    out_g, grad = run_backend("cuda", s, t, 2.0, "none")
    assert_matches(out_g, grad, *run_ref(s, t, 2.0, "none"), dtype, 2.0, GPU_TOL)


@pytest.mark.gpu
def test_gpu_cuda_out_variant_with_misaligned_grad():
    need_backend("cuda", "cuda")
    s, t = rand_logits((5, 64), torch.float32, "cuda"), rand_logits((5, 64), torch.float32, "cuda")
    loss = torch.full((5,), float("nan"), device="cuda")
    gbuf = torch.full((5 * 64 + 1,), float("nan"), device="cuda")
    grad = gbuf[1:].view(5, 64)  # a vector store here would fault (misaligned address)
    torch.ops.r2d2.distill_kl_fwd_out(s, t, 2.0, 1.0, loss, grad)
    assert_matches(loss, grad, *run_ref(s, t, 2.0, "none"), torch.float32, 2.0, GPU_TOL)
    assert gbuf[0].isnan()  # nothing written before the view


@pytest.mark.gpu
def test_gpu_cuda_runs_on_the_current_stream():
    """Graph capture fails on a legacy-stream launch, and replay misses a side-stream one."""
    need_backend("cuda", "cuda")
    s, t = (
        rand_logits((33, 1000), torch.float16, "cuda"),
        rand_logits((33, 1000), torch.float16, "cuda"),
    )
    loss, grad = torch.empty(33, device="cuda"), torch.empty(33, 1000, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.r2d2.distill_kl_fwd_out(s, t, 2.0, 1.0, loss, grad)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.ops.r2d2.distill_kl_fwd_out(s, t, 2.0, 1.0, loss, grad)
    s.copy_(rand_logits((33, 1000), torch.float16, "cuda"))
    loss.fill_(float("nan"))
    grad.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert_matches(
        loss,
        grad,
        *run_ref(s.float(), t.float(), 2.0, "none"),
        torch.float16,
        2.0,
        GPU_TOL,
        grad_dtype=torch.float32,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("need_grad", [True, False])
def test_gpu_opcheck_cuda(need_grad):
    need_backend("cuda", "cuda")
    s, t = torch.randn(5, 33, device="cuda"), torch.randn(5, 33, device="cuda")
    torch.library.opcheck(torch.ops.r2d2.distill_kl_fwd.default, (s, t, 2.0, 0.2, need_grad))
    torch.library.opcheck(
        torch.ops.r2d2.distill_kl_fwd.default,
        (s.half().reshape(5, 3, 11), t.half().reshape(5, 3, 11), 1.0, 1.0, need_grad),
    )
    torch.library.opcheck(
        torch.ops.r2d2.distill_kl_fwd_out.default,
        (s, t, 2.0, 0.2, torch.empty(5, device="cuda"), torch.empty(5, 33, device="cuda")),
    )


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_cuda_rows_past_2_31_elements():
    """rows * cols > 2^31: the last rows' offsets need int64."""
    need_backend("cuda", "cuda")
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~40 GiB of GPU memory")
    rows, cols = 2**31 // 8192 + 3, 8192  # bf16, one-pass vector path, ~13 GB in all
    s = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    loss, grad = torch.ops.r2d2.distill_kl_fwd(s, t, 2.0, 1.0, True)
    tail = slice(rows - 4, rows)
    assert_matches(
        loss[tail],
        grad[tail],
        *run_ref(s[tail], t[tail], 2.0, "none"),
        torch.bfloat16,
        2.0,
        GPU_TOL,
    )
