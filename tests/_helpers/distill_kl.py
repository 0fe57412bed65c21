"""distill_kl test helpers shared by the kernels' tests: the tolerances per dtype (CPU and GPU),
skipping a backend that cannot run here, random logits, one forward + backward through the
reference or a backend, and the comparison of the two."""

from __future__ import annotations

import pytest
import torch

from r2d2.kernels import distill_kl, distill_kl_ref
from r2d2.kernels.dispatch import why_unavailable

# dtype -> (loss rtol, grad rtol, grad atol as a fraction of max|grad|, grad atol absolute)
TOL = {
    torch.float32: (2e-5, 1e-4, 1e-6, 0.0),
    torch.float64: (1e-10, 1e-9, 1e-12, 0.0),
    torch.float16: (2e-5, 2e-3, 1e-4, 2.4e-7),  # 2.4e-7: four fp16 subnormal steps
    torch.bfloat16: (2e-5, 1.6e-2, 1e-4, 0.0),  # 2 bf16 ulps
}
GPU_TOL = {  # nvcc --use_fast_math exp/log: a few fp32 ulps more on the loss
    torch.float32: (1e-4, 1e-3, 1e-5, 0.0),
    torch.float16: (1e-4, 2e-3, 1e-4, 2.4e-7),
    torch.bfloat16: (1e-4, 1.6e-2, 1e-4, 0.0),
    torch.float64: (1e-10, 1e-9, 1e-12, 0.0),  # doubles get no fast-math exp/log
}


def need_backend(backend: str, device: str = "cpu") -> None:
    why = why_unavailable("distill_kl", backend, device)
    if why is not None:
        pytest.skip(why)


def rand_logits(shape, dtype, device="cpu", scale=3.0):
    # Scale 3 gives peaked, non-trivial distributions; fresh random values per call.
    return (torch.randn(shape, device=device) * scale).to(dtype)


def run_ref(student, teacher, temperature, reduction="batchmean", grad_out=None):
    s = student.detach().clone().requires_grad_(True)
    out = distill_kl_ref(s, teacher, temperature, reduction)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), s.grad


def run_backend(backend, student, teacher, temperature, reduction="batchmean", grad_out=None):
    s = student.detach().clone().requires_grad_(True)
    out = distill_kl(s, teacher, temperature=temperature, reduction=reduction, backend=backend)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), s.grad


def assert_matches(out, grad, ref_out, ref_grad, dtype, temperature, tol=TOL, grad_dtype=None):
    loss_rtol, grad_rtol, grad_arel, grad_aabs = tol[dtype]
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, ref_out, rtol=loss_rtol, atol=loss_rtol * temperature**2)
    assert grad.dtype == (grad_dtype or dtype) and grad.shape == ref_grad.shape
    gmax = ref_grad.abs().max().item()
    torch.testing.assert_close(
        grad.double(), ref_grad.double(), rtol=grad_rtol, atol=grad_arel * gmax + grad_aabs
    )
