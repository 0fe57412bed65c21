"""Attention, CUDA backend: the compiled ops ``torch.ops.r2d2.attention_fwd`` /
``attention_bwd`` (csrc/attention/, CUDA builds only) behind the launcher API the package's
autograd function calls (the Triton launcher's: ``fwd`` -> (o, lse), ``bwd`` -> (dq, dk, dv)),
and their fake (shape) functions so torch.compile (FakeTensor) can trace them.

``causal`` (bottom-right, see the package docstring) is a runtime switch of the same kernels;
lse is fp32 ``[B * H, Lq]``; dropout draws from the Philox stream of (seed, offset), the same
stream as the Triton kernels.
"""

from __future__ import annotations

import torch

from r2d2 import _ext

EXT_OP = "attention_fwd"


def fwd(q, k, v, mask, scale, dropout_p, seed, offset, causal=False):
    return torch.ops.r2d2.attention_fwd(q, k, v, mask, scale, dropout_p, seed, offset, causal)


def bwd(do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset, causal=False):
    return torch.ops.r2d2.attention_bwd(
        do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset, causal
    )


def _register_fakes() -> None:
    if not _ext.has_op(EXT_OP):
        return

    @torch.library.register_fake("r2d2::attention_fwd")
    def _fwd_fake(q, k, v, mask, scale, dropout_p, seed, offset, causal=False):
        B, H, Lq, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B * H, Lq), dtype=torch.float32)

    @torch.library.register_fake("r2d2::attention_bwd")
    def _bwd_fake(do, q, k, v, o, lse, mask, scale, dropout_p, seed, offset, causal=False):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_register_fakes()
