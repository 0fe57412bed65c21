"""AdamW with decoupled weight decay on weight matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_HINTS = ("bias", "norm", "embed", "temp", "logit_scale", "pos_", "cls_token", "ln_")
"""parameter-name parts that mark norms, biases, embeddings and temperatures (no weight decay)"""


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; not on norms, biases, embeddings, temperatures."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        (no_decay if p.ndim < 2 or any(h in low for h in NO_DECAY_HINTS) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(module: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    return torch.optim.AdamW(
        param_groups(module, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt, cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
