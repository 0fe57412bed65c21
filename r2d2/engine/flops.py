"""Analytic FLOPs of an R2D2 training step and per-device peak FLOP/s, for TFLOP/s and MFU.

Counting (matmul FLOPs only, 2 per multiply-add; norms, softmax and activations are ignored as in
the PaLM / nanoGPT MFU convention). A transformer layer of width ``d``, MLP ratio ``r`` and ``n``
tokens costs per token in the forward pass

    self-attention projections 8 d^2  +  MLP 4 r d^2  +  scores and weighted sum 4 n d

and a cross-attention layer (queries of width ``d`` over ``m`` tokens of width ``d_kv``) adds
    2 d^2 (Q) + 2 d^2 (out) + 4 d d_kv (K, V: counted per *key* token: 4 m d_kv d / n per query
    token) + 4 m d.

One R2D2 pre-training sample (image + caption) runs, with ``T`` text tokens, ``P`` image tokens:
  * the image encoder and text encoder (students): forward + backward = 3x forward;
  * the MLM pass: the masked caption through the text encoder and the text-image cross encoder, 3x;
  * ITM: the positive and two hard-negative pairs through both cross encoders (3 pairs), 3x;
  * the EMA teacher: image + text encoders forward only (1x), if the loss uses one.
Training with a per-sample count ``F`` at ``S`` samples/s achieves ``F * S`` FLOP/s; MFU divides
that by the device's dense peak for the training dtype (:data:`PEAK_TFLOPS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def layer_flops(tokens: int, width: int, mlp_ratio: float = 4.0, ctx: int | None = None) -> float:
    """Forward FLOPs of one self-attention transformer layer over ``tokens`` tokens."""
    ctx = tokens if ctx is None else ctx
    return tokens * (8 * width**2 + 4 * mlp_ratio * width**2 + 4 * ctx * width)


def cross_layer_flops(tokens: int, width: int, kv_tokens: int, kv_width: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of a layer with self-attention, cross-attention over ``kv_tokens`` and an MLP."""
    cross = tokens * (4 * width**2 + 4 * kv_tokens * width) + kv_tokens * 4 * kv_width * width
    return layer_flops(tokens, width, mlp_ratio) + cross


@dataclass
class R2D2Shape:
    """The sizes the FLOPs count depends on (read from a ModelConfig by :func:`shape_from_config`)."""

    image_layers: int
    image_width: int
    image_tokens: int
    text_layers: int
    text_width: int
    text_tokens: int
    cross_layers: int
    image_mlp_ratio: float = 4.0
    text_mlp_ratio: float = 4.0
    vocab_size: int = 0
    embed_dim: int = 0
    teacher: bool = True


def shape_from_config(cfg, text_len: int, image_size: int | None = None, teacher: bool = True) -> R2D2Shape:
    """An :class:`R2D2Shape` from ``r2d2.engine.model.ModelConfig`` (``vision``, ``text``,
    ``cross_layers``, ``embed_dim``). The cross encoders have the text encoder's width."""
    v, t = cfg.vision, cfg.text
    size = image_size or v.image_size
    return R2D2Shape(
        image_layers=v.layers, image_width=v.width, image_tokens=(size // v.patch_size) ** 2 + 1,
        text_layers=t.layers, text_width=t.width, text_tokens=text_len, cross_layers=cfg.cross_layers,
        image_mlp_ratio=v.mlp_ratio, text_mlp_ratio=t.intermediate / t.width,
        vocab_size=t.vocab_size, embed_dim=cfg.embed_dim, teacher=teacher)


def _encoders(s: R2D2Shape) -> tuple[float, float, float]:
    img = s.image_layers * layer_flops(s.image_tokens, s.image_width, s.image_mlp_ratio)
    txt = s.text_layers * layer_flops(s.text_tokens, s.text_width, s.text_mlp_ratio)
    proj = 2 * (s.image_width + s.text_width) * s.embed_dim
    return img, txt, proj


def r2d2_flops_per_sample(s: R2D2Shape, itm_pairs: int = 3, mask_prob: float = 0.15) -> float:
    """Training FLOPs (forward + backward, plus teacher forward) for one image-text sample."""
    img, txt, proj = _encoders(s)
    w, r = s.text_width, s.text_mlp_ratio
    ti = s.cross_layers * cross_layer_flops(s.text_tokens, w, s.image_tokens, s.image_width, r)
    it = s.cross_layers * cross_layer_flops(s.image_tokens, w, s.text_tokens, s.text_width, r)
    mlm = (txt + ti + 2 * s.text_tokens * w * s.vocab_size * mask_prob) if s.cross_layers else 0.0
    itm = itm_pairs * (ti + it)
    forward_student = img + txt + proj + mlm + itm
    teacher = (img + txt + proj) if s.teacher else 0.0
    return 3.0 * forward_student + teacher


def dual_encoder_flops_per_sample(s: R2D2Shape) -> float:
    """PRD2 / contrastive-only training: the two encoders, forward + backward."""
    img, txt, proj = _encoders(s)
    return 3.0 * (img + txt + proj)


# Dense (no sparsity) peak TFLOP/s by device-name substring: (bf16/fp16 tensor core, fp32 non-TF32).
# Sources: NVIDIA data sheets (SXM variants unless the name says PCIe).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp32": 30.3},
    "A10G": {"bf16": 70.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.0, "fp32": 82.6},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # fp16 tensor cores; V100 has no bf16
    "T4": {"bf16": 65.0, "fp32": 8.1},
}


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_tflops(name: str, dtype: str = "bf16") -> float | None:
    """Peak dense TFLOP/s of the device named ``name`` for ``dtype``; None when unknown (CPUs)."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return PEAK_TFLOPS[key].get(dtype)
    return None


def mfu(flops_per_s: float, name: str, dtype: str = "bf16") -> float | None:
    """Model FLOPs utilisation in [0, 1] (None on a device without a table entry)."""
    peak = peak_tflops(name, dtype)
    return None if not peak else flops_per_s / (peak * 1e12)
