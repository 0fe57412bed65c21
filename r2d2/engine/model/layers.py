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

    def forward(self, x, context=None, mask=None, causal=False, cache=None):
        """``causal``: query i sees key j iff j <= i + Lk - Lq (bottom-right aligned, so a step
        of new queries against cached keys sees the whole prefix). ``cache`` (a dict this call
        reads and fills; None = no cache) makes incremental decoding cost one new row per step:
        self-attention (``context`` None) appends this call's keys/values to ``cache["k"]`` /
        ``cache["v"]`` and attends over all of them (``mask``, if given, covers them all);
        cross-attention projects ``context`` into ``cache["k"]`` / ``cache["v"]`` on the first
        call and reuses them afterwards (``context`` may then be None)."""
        B, Lq, W = x.shape
        H = self.heads

        def split(t):
            return t.view(B, t.shape[1], H, W // H).transpose(1, 2)

        q = split(self.query(x))
        if cache is not None and cache.get("static"):  # cross-attention: the context's, once
            k, v = cache["k"], cache["v"]
        else:
            src = x if context is None else context
            k, v = split(self.key(src)), split(self.value(src))
            if cache is not None:
                if context is None and "k" in cache:  # self-attention: the prefix's, then ours
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache.update(k=k, v=v, static=context is not None)
        o = K.attention(
            q,
            k,
            v,
            key_padding_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            causal=causal,
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


class ModelPlumbing(nn.Module):
    """What a whole model (R2D2, the captioner) does to all its blocks at once: one shared
    ``KernelConfig`` for every op, and activation checkpointing on or off."""

    kernels: K.KernelConfig

    def set_kernels(self, kernels: K.KernelConfig) -> None:
        """Use ``kernels`` for every op of this model from now on."""
        if not isinstance(kernels, K.KernelConfig):
            raise TypeError(f"kernels must be a KernelConfig, got {type(kernels).__name__}")
        self.kernels = kernels
        for m in self.modules():
            if hasattr(m, "kernels") and m is not self:
                m.kernels = kernels

    def set_activation_checkpointing(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, Checkpointable):
                m.checkpointing = bool(on)


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

    def forward(self, x, mask=None, context=None, context_mask=None, causal=False, cache=None):
        """``causal`` masks the self-attention (decoder); ``cache`` is this layer's KV cache,
        ``{"self": {}, "cross": {}}`` to start (see :meth:`Attention.forward`): with it, ``x``
        holds only the new positions and ``context`` may be None after the first call."""
        sc = cc = None
        if cache is not None:
            sc, cc = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = self.attn_ln(x + self.drop(self.attn(x, mask=mask, causal=causal, cache=sc)))
        if self.cross is not None:
            if cc is not None and context is None and "k" not in cc:
                raise ValueError("BertLayer: the first cached call needs the context")
            x = self.cross_ln(x + self.drop(self.cross(x, context, context_mask, cache=cc)))
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
