"""Building blocks shared by the encoders: attention via ``r2d2.kernels.attention``, the CLIP
pre-LN block and the BERT post-LN layer (optionally with cross-attention).

Every attention call goes through the kernel dispatcher with the backend named by the
``KernelConfig`` that the owning model shares with all its blocks (``R2D2Model.set_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from r2d2 import kernels as K


class QuickGELU(nn.Module):
    """CLIP's x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head (self or cross) attention with separate q/k/v projections.

    x ``[B, Lq, width]``, context ``[B, Lk, kv_width]`` (None = self-attention), mask ``[B, Lk]``
    bool True = attend -> ``[B, Lq, width]``."""

    def __init__(
        self,
        width: int,
        heads: int,
        kernels: K.KernelConfig,
        kv_width: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        kv_width = width if kv_width is None else kv_width
        self.heads, self.dropout, self.kernels = heads, dropout, kernels
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        B, Lq, W = x.shape
        Lk, H = context.shape[1], self.heads

        def split(t, L):
            return t.view(B, L, H, W // H).transpose(1, 2)

        q, k, v = (
            split(self.query(x), Lq),
            split(self.key(context), Lk),
            split(self.value(context), Lk),
        )
        o = K.attention(
            q,
            k,
            v,
            key_padding_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.kernels.attention,
        )
        return self.out(o.transpose(1, 2).reshape(B, Lq, W))


class Checkpointable(nn.Module):
    """A block whose forward can be recomputed in backward (activation checkpointing)."""

    checkpointing: bool = False

    def __call__(self, *args, **kwargs):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


class ViTBlock(Checkpointable):
    """CLIP residual block: x + attn(ln_1 x); x + mlp(ln_2 x), quick-GELU."""

    def __init__(self, width, heads, mlp_ratio, eps, dropout, kernels):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, kernels, dropout=dropout)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        hidden = round(width * mlp_ratio)
        self.fc1, self.act, self.fc2 = (
            nn.Linear(width, hidden),
            QuickGELU(),
            nn.Linear(hidden, width),
        )

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.fc2(self.act(self.fc1(self.ln_2(x))))


class BertLayer(Checkpointable):
    """BERT post-LN layer: self-attention, optional cross-attention to ``context``, GELU FFN.

    Each sub-layer: x = LN(x + dropout(sublayer(x)))."""

    def __init__(
        self, width, heads, intermediate, eps, dropout, kernels, cross_width: int | None = None
    ):
        super().__init__()
        self.attn = Attention(width, heads, kernels, dropout=dropout)
        self.attn_ln = nn.LayerNorm(width, eps=eps)
        self.cross = None
        if cross_width is not None:
            self.cross = Attention(width, heads, kernels, kv_width=cross_width, dropout=dropout)
            self.cross_ln = nn.LayerNorm(width, eps=eps)
        self.fc1, self.fc2 = nn.Linear(width, intermediate), nn.Linear(intermediate, width)
        self.mlp_ln = nn.LayerNorm(width, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, context=None, context_mask=None):
        x = self.attn_ln(x + self.drop(self.attn(x, mask=mask)))
        if self.cross is not None:
            x = self.cross_ln(x + self.drop(self.cross(x, context, context_mask)))
        return self.mlp_ln(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


def as_bool_mask(
    mask: torch.Tensor | None, shape: tuple[int, int], name: str
) -> torch.Tensor | None:
    """Validate a ``[B, L]`` padding mask (bool or 0/1 ints) and return it as bool True = keep."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B, L], got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0
