"""CPU microbenchmarks as pytest-benchmark cases, so regressions show in its compare output.

    pytest benchmarks --benchmark-only                         # run and print the table
    pytest benchmarks --benchmark-only --benchmark-autosave    # keep a run in .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare     # compare with the last saved run

Not collected by a plain ``pytest`` (testpaths = tests). Sizes are small on purpose: these run on
shared CI CPUs and guard the CPU paths (eager references, the C++ distill_kl, SDPA dispatch);
GPU figures come from the bench_*.py scripts on a GPU, never from here. Each op's providers share
a ``group`` so pytest-benchmark prints them side by side.
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:  # before anything imports triton (see tests/conftest.py)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from r2d2.kernels import attention, contrastive_loss, distill_kl
from r2d2.kernels.dispatch import why_unavailable


def _fwd_bwd(loss_fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        loss_fn().backward()

    return run


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_distill_kl(benchmark, backend):
    why = why_unavailable("distill_kl", backend, "cpu")
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(128, 4096, generator=g) * 3).requires_grad_(True)
    t = torch.randn(128, 4096, generator=g) * 3
    benchmark.group = "distill_kl fwd+bwd 128x4096 fp32"
    benchmark(_fwd_bwd(lambda: distill_kl(s, t, temperature=2.0, backend=backend), [s]))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention(benchmark, backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 4, 64, 32, generator=g).requires_grad_(True) for _ in range(3))
    mask = torch.arange(64)[None, :] < torch.tensor([64, 40, 17, 1])[:, None]  # ragged padding
    benchmark.group = "attention fwd+bwd B4 H4 L64 D32 padded fp32"
    benchmark(
        _fwd_bwd(
            lambda: attention(q, k, v, key_padding_mask=mask, backend=backend).sum(), [q, k, v]
        )
    )


@pytest.mark.parametrize("backend", ["eager"])
def test_contrastive(benchmark, backend):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=-1).requires_grad_(
        True
    )
    txt = torch.nn.functional.normalize(torch.randn(256, 128, generator=g), dim=-1).requires_grad_(
        True
    )
    timg, ttxt = img.detach().roll(1, 1), txt.detach().roll(1, 1)
    scale = torch.tensor(1 / 0.07)
    benchmark.group = "contrastive fwd+bwd b256 d128 fp32 (+teacher)"
    benchmark(
        _fwd_bwd(
            lambda: contrastive_loss(
                img,
                txt,
                scale,
                teacher_image_feat=timg,
                teacher_text_feat=ttxt,
                distill_alpha=0.4,
                backend=backend,
            ),
            [img, txt],
        )
    )
