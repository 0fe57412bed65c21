"""CLIP-style Vision Transformer (the image encoder).

pixels [B,3,S,S] -> conv patches [B,N,W] -> [cls; patches] + positions -> ln_pre -> pre-LN blocks
-> token states [B, 1+N, W]. No post-LN: R2D2 takes the global feature from the class token of the
last block *before* CLIP's ln_post, and feeds all token states to the cross encoders (this equals
HF ``CLIPVisionModel(...).last_hidden_state``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from r2d2 import kernels as K
from r2d2.engine.model.config import VisionConfig
from r2d2.engine.model.layers import ViTBlock


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, kernels: K.KernelConfig | None = None):
        super().__init__()
        kernels = kernels or K.KernelConfig()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w ** -0.5  # CLIP's init scale for the class token and positions
        self.cls_token = nn.Parameter(scale * torch.randn(w))
        self.pos_embed = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(ViTBlock(w, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps,
                                             cfg.dropout, kernels) for _ in range(cfg.layers))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + class + position embeddings, before ln_pre: ``[B, 1+N, W]``."""
        c = self.cfg
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or \
                tuple(pixel_values.shape[2:]) != (c.image_size, c.image_size):
            raise ValueError(f"images must be [B, 3, {c.image_size}, {c.image_size}], got "
                             f"{tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"images must be a float tensor, got {pixel_values.dtype}")
        w = self.patch_embed.weight
        x = self.patch_embed(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], 1) + self.pos_embed.to(x.dtype)

    def forward(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token states ``[B, 1+N, W]``. ``keep`` (bool ``[B, N]``, True = visible) masks patches
        out of attention (FgD's masked student view); masked tokens still get (unused) states."""
        x = self.ln_pre(self.embed(pixel_values))
        mask = None
        if keep is not None:
            mask = torch.cat([keep.new_ones(keep.shape[0], 1), keep], 1)
        for blk in self.blocks:
            x = blk(x, mask)
        return x
