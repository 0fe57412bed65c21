"""BERT / RoBERTa-wwm encoder (post-LN, GELU), the MLM head, and the BERT-layer cross encoders.

Text encoder: word + position + token-type embeddings -> LN -> L post-LN layers -> ``[B, L, W]``
(equals HF ``BertModel(...).last_hidden_state``; no pooler: R2D2 uses the [CLS] state directly).
Cross encoder: L BERT layers with cross-attention after self-attention (the ALBEF/official
``BertModel(encoder_embeds=...)`` path): queries are given states, keys/values the other modality.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from r2d2 import kernels as K
from r2d2.engine.model.config import TextConfig
from r2d2.engine.model.layers import BertLayer, as_bool_mask


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, kernels: K.KernelConfig | None = None):
        super().__init__()
        kernels = kernels or K.KernelConfig()
        self.cfg = cfg
        w = cfg.width
        self.word_embed = nn.Embedding(cfg.vocab_size, w, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_positions, w)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, w)
        self.embed_ln = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            BertLayer(w, cfg.heads, cfg.intermediate, cfg.layer_norm_eps, cfg.dropout, kernels)
            for _ in range(cfg.layers)
        )

    def check_inputs(self, input_ids, attention_mask):
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.is_floating_point()
        ):
            raise ValueError(
                f"input_ids must be an integer tensor [B, L], got "
                f"{getattr(input_ids, 'shape', type(input_ids).__name__)}"
            )
        if input_ids.shape[1] > self.cfg.max_positions:
            raise ValueError(
                f"input_ids has length {input_ids.shape[1]} > text.max_positions="
                f"{self.cfg.max_positions}"
            )
        mask = as_bool_mask(attention_mask, tuple(input_ids.shape), "attention_mask")
        return mask if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """``[B, L]`` ids and mask (1/True = real token) -> token states ``[B, L, W]``."""
        mask = self.check_inputs(input_ids, attention_mask)
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.word_embed(input_ids) + self.pos_embed(pos)[None] + self.type_embed(types)
        x = self.drop(self.embed_ln(x))
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CrossEncoder(nn.Module):
    """BERT layers with cross-attention; ``forward(x, mask, context, context_mask)`` -> ``[B, Lq, W]``."""

    def __init__(self, cfg: TextConfig, layers: int, context_width: int, kernels: K.KernelConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            BertLayer(
                cfg.width,
                cfg.heads,
                cfg.intermediate,
                cfg.layer_norm_eps,
                cfg.dropout,
                kernels,
                cross_width=context_width,
            )
            for _ in range(layers)
        )

    def forward(self, x, mask, context, context_mask):
        for layer in self.layers:
            x = layer(x, mask, context, context_mask)
        return x


class MLMHead(nn.Module):
    """BERT LM head: dense -> GELU -> LN -> decoder (weight optionally tied to word embeddings)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.width, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x))))
