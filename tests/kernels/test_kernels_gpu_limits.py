"""GPU-only limits of the Triton kernels that the CPU interpreter cannot reach: grids past 65535
(batch x heads), tensors past 2^31 elements (int64 base offsets), fp32 head dim 256 (shared
memory: only the unpipelined config fits), the autotuner's trial runs leaving the tile counter
exact, launches on the tensors' device (two GPUs), and fp64 constants kept at fp64 precision.
Helpers and tolerances: tests/_helpers/ (shared with the kernels' CPU tests)."""

import pytest
import torch

from _helpers.attention import check_against_ref, make_inputs, tile_mask
from _helpers.distill_kl import assert_matches, need_backend, run_backend, run_ref
from r2d2.kernels import attention, attention_ref


@pytest.mark.gpu
def test_gpu_triton_attention_more_than_65535_batch_heads():
    # B*H = 66000: a (tiles, B*H) grid (axis 1 <= 65535) fails to launch.
    B, H, L, D = 8250, 8, 16, 16
    q, k, v = (
        torch.randn(B, H, L, D, device="cuda", dtype=torch.float16).requires_grad_()
        for _ in range(3)
    )
    out = attention(q, k, v, backend="triton")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    for b in (0, B - 1):
        leaves = [x[b : b + 1].detach().float().requires_grad_() for x in (q, k, v)]
        ref = attention_ref(*leaves)
        want = torch.autograd.grad(ref, leaves, do[b : b + 1].float())
        torch.testing.assert_close(out[b : b + 1].float(), ref, atol=2e-3, rtol=2e-3)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[b : b + 1].float(), w, atol=5e-3, rtol=5e-3)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_triton_attention_beyond_2_31_elements():
    # 131100 x 16 x 16 x 64 = 2.15e9 elements per tensor (4.3 GB fp16; ~35 GB in all): the last
    # (batch, head)'s base offset is past 2^31, where int32 pointer math wraps. L = 16 keeps the
    # FLOPs small (they grow with L, the elements do not have to).
    from r2d2.kernels.attention import triton as at

    if torch.cuda.get_device_properties(0).total_memory < 64 * 2**30:
        pytest.skip("needs a 64 GiB GPU (~35 GB in use)")
    B, H, L, D = 131100, 16, 16, 64
    assert B * H * L * D > 2**31
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16) for _ in range(4))
    o, lse = at.fwd(q, k, v, None, D**-0.5)
    dq, dk, dv = at.bwd(do, q, k, v, o, lse, None, D**-0.5)
    leaves = [x[-1:].float().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*leaves)
    want = torch.autograd.grad(ref, leaves, do[-1:].float())
    torch.testing.assert_close(o[-1:].float(), ref, atol=2e-3, rtol=2e-3)
    for g, w in zip((dq, dk, dv), want):
        torch.testing.assert_close(g[-1:].float(), w, atol=5e-3, rtol=5e-3)


@pytest.mark.gpu
def test_gpu_triton_attention_fp32_head_dim_256():
    # Every pipelined dK/dV and dQ config needs 192-416 KB of shared memory at fp32 D = 256;
    # only the small unpipelined config fits (sm_80 164 KB, sm_90 227 KB).
    q, k, v, m = make_inputs(2, 2, 97, 130, 256, device="cuda", mask="random")
    check_against_ref(q, k, v, m, "triton", tol=dict(atol=1e-4, rtol=1e-4))
    q, k, v, _ = make_inputs(2, 2, 97, 130, 256, device="cuda", mask=None)
    check_against_ref(q, k, v, None, "triton", tol=dict(atol=1e-4, rtol=1e-4))


@pytest.mark.gpu
def test_gpu_triton_attention_tile_count_on_first_call():
    # The autotuner runs each config on the caller's arguments; restore_value puts the tile
    # counter back, so the first call's count is the chosen config's.
    from r2d2.kernels.attention import triton as at

    B, H, Lq, Lk, D = 3, 2, 83, 3 * 64 + 5, 64  # an Lq no other test tunes
    q, k, v, _ = make_inputs(B, H, Lq, Lk, D, dtype=torch.float16, device="cuda", mask=None)
    q, k, v = q.detach(), k.detach(), v.detach()
    m = tile_mask(B, Lk, 64, device="cuda")
    cnt = torch.zeros(B * H, dtype=torch.int32, device="cuda")
    at.fwd(q, k, v, m, D**-0.5, tile_count=cnt)
    cfg = at._attn_fwd_kernel.best_config.kwargs
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    live = torch.stack([m[:, j : j + bn].any(-1) for j in range(0, Lk, bn)], -1).sum(-1)
    want = (live * -(-Lq // bm)).to(torch.int32).repeat_interleave(H)
    assert torch.equal(cnt, want)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_triton_kernels_launch_on_the_tensors_device():
    from r2d2.kernels import contrastive as C
    from r2d2.kernels import distill_kl

    with torch.cuda.device(0):
        q, k, v, m = make_inputs(
            2, 2, 33, 70, 64, dtype=torch.float16, device="cuda:1", mask="random"
        )
        out = attention(q, k, v, key_padding_mask=m, backend="triton")
        torch.testing.assert_close(
            out.float(), attention_ref(q, k, v, m).float(), atol=2e-3, rtol=2e-3
        )
        f = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda:1"), dim=1)
        s = torch.tensor(10.0, device="cuda:1")
        torch.testing.assert_close(
            C.contrastive_loss(f, f.flip(0), s, backend="triton"),
            C.contrastive_loss(f, f.flip(0), s, backend="eager"),
            atol=2e-5,
            rtol=1e-4,
        )
        x, y = torch.randn(2, 2, 50, device="cuda:1").unbind(0)
        torch.testing.assert_close(
            distill_kl(x, y, temperature=2.0, backend="triton"),
            distill_kl(x, y, temperature=2.0, backend="eager"),
            atol=1e-5,
            rtol=1e-4,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(37, 1000), (3, 32768)], ids=str)
def test_gpu_triton_distill_kl_float64_keeps_fp64_precision(shape):
    # A float kernel argument is fp32 on a GPU; T = 3 makes 1/T and the gradient scale inexact
    # in fp32 (~3e-8), far outside float64's tolerances. The interpreter cannot show this.
    need_backend("triton", "cuda")
    s = torch.randn(shape, dtype=torch.float64, device="cuda") * 3
    t = torch.randn(shape, dtype=torch.float64, device="cuda") * 3
    out, grad = run_backend("triton", s, t, 3.0)
    assert_matches(out, grad, *run_ref(s, t, 3.0), torch.float64, 3.0)
