"""CLIP-style Vision Transformer (the image encoder).

pixels [B,3,S,S] -> conv patches [B,N,W] -> [cls; patches] + positions -> ln_pre -> pre-LN blocks
-> token states [B, 1+N, W]. No post-LN: R2D2 takes the global feature from the class token of the
last block *before* CLIP's ln_post, and feeds all token states to the cross encoders (this equals
HF ``CLIPVisionModel(...).last_hidden_state``). ``forward(pixels, keep)`` encodes only the class
token and the patches listed in ``keep`` (dropped patches never enter the blocks).
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
        scale = w**-0.5  # CLIP's init scale for the class token and positions
        self.cls_token = nn.Parameter(scale * torch.randn(w))
        self.pos_embed = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(
            ViTBlock(w, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps, cfg.dropout, kernels)
            for _ in range(cfg.layers)
        )

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + class + position embeddings, before ln_pre: ``[B, 1+N, W]``."""
        c = self.cfg
        if (
            pixel_values.dim() != 4
            or pixel_values.shape[1] != 3
            or tuple(pixel_values.shape[2:]) != (c.image_size, c.image_size)
        ):
            raise ValueError(
                f"images must be [B, 3, {c.image_size}, {c.image_size}], got "
                f"{tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"images must be a float tensor, got {pixel_values.dtype}")
        w = self.patch_embed.weight
        x = self.patch_embed(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], 1) + self.pos_embed.to(x.dtype)

    def forward(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token states ``[B, 1+N, W]``.

        ``keep`` (integer ``[B, K]``, indices in ``[0, N)`` of the visible patches, row-major patch
        order) drops every other patch token after the position embeddings, MAE-style: only the
        class token and those K patches enter the blocks, so the cost falls with K and the output
        is ``[B, 1+K, W]`` (row ``1+j`` is patch ``keep[:, j]``). This is FgD's masked student view
        (``r2d2.engine.losses``); ``select_tokens(full_states, keep)`` picks the same rows from a
        full view. Pass ``keep`` on the CPU: its range check then costs no device sync."""
        x = self.embed(pixel_values)
        if keep is not None:
            x = select_tokens(x, check_keep(keep, x.shape[0], self.cfg.num_patches))
        x = self.ln_pre(x)
        for blk in self.blocks:
            x = blk(x)
        return x


def check_keep(keep: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
    """Validate visible-patch indices ``[batch, K]`` (K <= num_patches) and return them."""
    if (
        not isinstance(keep, torch.Tensor)
        or keep.dim() != 2
        or keep.is_floating_point()
        or keep.dtype == torch.bool
    ):
        raise ValueError(
            f"keep must be an integer tensor [B, K] of visible patch indices, got "
            f"{getattr(keep, 'dtype', type(keep).__name__)} "
            f"{tuple(getattr(keep, 'shape', ()))}"
        )
    if keep.shape[0] != batch or keep.shape[1] > num_patches:
        raise ValueError(f"keep must be [B={batch}, K <= {num_patches}], got {tuple(keep.shape)}")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= num_patches):
        raise ValueError(
            f"keep indices must lie in [0, {num_patches}), got "
            f"[{int(keep.min())}, {int(keep.max())}]"
        )
    return keep


def select_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, 1+N, W]`` -> ``[B, 1+K, W]``: the class token, then the patches ``keep`` ``[B, K]``."""
    idx = keep.to(device=x.device, dtype=torch.long)[..., None].expand(-1, -1, x.shape[-1])
    return torch.cat([x[:, :1], x[:, 1:].gather(1, idx)], 1)
