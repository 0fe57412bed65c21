"""Analytic FLOPs of an R2D2 training step and per-device peak FLOP/s, for TFLOP/s and MFU.

Counting: matmul FLOPs only (2 per multiply-add: linear layers, the patch convolution, attention
scores and weighted sums, the contrastive similarities); norms, softmax, activations and
embedding look-ups are ignored, as in the PaLM / nanoGPT MFU convention and as
``torch.utils.flop_counter.FlopCounterMode`` counts (tests/engine/test_flops.py holds the two
together on the real objective). A transformer layer of width ``d``, MLP ratio ``r`` and ``n`` tokens costs
per token in the forward pass

    self-attention projections 8 d^2  +  MLP 4 r d^2  +  scores and weighted sum 4 n d

and a cross-attention sub-layer (queries of width ``d`` over ``m`` tokens of width ``d_kv``) adds
    2 d^2 (Q) + 2 d^2 (out) + 4 m d   per query token, and 4 d d_kv (K, V) per *key* token.

Backward costs twice the forward of every matmul whose inputs both need a gradient (all of them in
the student, including attention over the student's own states), once for the patch convolution
(pixels need no gradient): a trained pass is 3x its forward, the convolution 2x. The EMA teacher
runs under ``no_grad``: 1x.

One sample (image + caption; ``L`` text tokens, ``1+P`` image tokens, ``E`` embedding width,
``B`` the global contrastive batch) runs, term by term of :class:`~r2d2.engine.losses.LossConfig`
(``objective_flops`` follows its flags; each line is what ``R2D2ForPretraining.forward`` calls):

  student encoders  image + text encoder and the two projections, trained (3x) when a loss uses
                    them: the image states feed GCPR, FGR and MLM, the text states GCPR and FGR
                    (MLM and FgD re-encode their own masked text)
  gcpr              similarity GEMMs ``[b, d] x [d, B]`` both ways: 4 B E forward, 8 B E backward;
                    with TgD the teacher's projections and its two similarity GEMMs (4 B E), 1x.
                    This is the loss as defined (and as the eager backend runs it: one logits
                    matrix per direction). The fused backends get both directions from one
                    similarity per rank (2 B E forward; 8 B E backward: two recomputes and two
                    gradient GEMMs; r2d2/kernels/contrastive_dist.py): for them the count is
                    the work of the definition, not of the kernel, the same numerator for every
                    configuration, which keeps TFLOP/s and MFU comparable across them
  fgr               3 pairs per sample (the positive, an image with a hard-negative text, a text
                    with a hard-negative image) through both cross encoders, ``image_cross_proj``
                    and both ITM heads, 3x; with TgD the teacher's cross encoders on the same 3
                    pairs, 1x; ``fgr_negatives="local"`` on several ranks adds two detached local
                    similarity GEMMs (4 b E, forward only)
  mlm               the masked caption re-encoded by the text encoder, the text-image cross
                    encoder over the image states, and the MLM head (dense + decoder over the
                    vocabulary) on the selected tokens only, 3x
  fgd               the student re-encodes the masked image (the class token and the 1+N-round
                    (ratio N) patches it keeps: dropped patches skip the ViT blocks, not the
                    patch convolution) and the masked caption, 3x; with
                    ``fgd_features="global"`` also both projections, 3x, and the teacher's, 1x
  teacher           image + text encoders forward, 1x, when TgD or FgD is on (the EMA teacher
                    exists only then)

The MLM head runs on ``mlm_probability x L x text_valid_frac`` tokens on average (the real tokens
chosen); pass ``mlm_tokens`` to give the exact count. Training with a per-sample count ``F`` at
``S`` samples/s achieves ``F * S`` FLOP/s; MFU divides that by the device's dense peak for the
training dtype (:data:`PEAK_TFLOPS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRAINED, FORWARD, CONV_TRAINED = 3.0, 1.0, 2.0  # forward multiples (see the module docstring)


def layer_flops(tokens: int, width: int, mlp_ratio: float = 4.0, ctx: int | None = None) -> float:
    """Forward FLOPs of one self-attention transformer layer over ``tokens`` tokens."""
    ctx = tokens if ctx is None else ctx
    return tokens * (8 * width**2 + 4 * mlp_ratio * width**2 + 4 * ctx * width)


def cross_layer_flops(
    tokens: int, width: int, kv_tokens: int, kv_width: int, mlp_ratio: float = 4.0
) -> float:
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
    """only read by the legacy :func:`r2d2_flops_per_sample` (no teacher = TgD and FgD off)"""
    patch_size: int = 0
    """ViT patch side in pixels (the patch convolution's cost); 0 leaves it out"""


def shape_from_config(
    cfg, text_len: int, image_size: int | None = None, teacher: bool = True
) -> R2D2Shape:
    """An :class:`R2D2Shape` from ``r2d2.engine.model.ModelConfig`` (``vision``, ``text``,
    ``cross_layers``, ``embed_dim``). The cross encoders have the text encoder's width."""
    v, t = cfg.vision, cfg.text
    size = image_size or v.image_size
    return R2D2Shape(
        image_layers=v.layers,
        image_width=v.width,
        image_tokens=(size // v.patch_size) ** 2 + 1,
        text_layers=t.layers,
        text_width=t.width,
        text_tokens=text_len,
        cross_layers=cfg.cross_layers,
        image_mlp_ratio=round(v.width * v.mlp_ratio) / v.width,
        text_mlp_ratio=t.intermediate / t.width,
        vocab_size=t.vocab_size,
        embed_dim=cfg.embed_dim,
        teacher=teacher,
        patch_size=v.patch_size,
    )


def _image_blocks(s: R2D2Shape, tokens: int) -> float:
    return s.image_layers * layer_flops(tokens, s.image_width, s.image_mlp_ratio)


def _passes(s: R2D2Shape) -> dict[str, float]:
    """Forward FLOPs per sample of each piece the objective calls."""
    P1, L, wv, wt, E = s.image_tokens, s.text_tokens, s.image_width, s.text_width, s.embed_dim
    ti = s.cross_layers * cross_layer_flops(L, wt, P1, wv, s.text_mlp_ratio)
    it = 2.0 * P1 * wv * wt + s.cross_layers * cross_layer_flops(P1, wt, L, wt, s.text_mlp_ratio)
    return {
        "image_blocks": _image_blocks(s, P1),
        "conv": 2.0 * (P1 - 1) * 3 * s.patch_size**2 * wv,  # every patch, kept or not
        "text": s.text_layers * layer_flops(L, wt, s.text_mlp_ratio),
        "proj": 2.0 * (wv + wt) * E,
        "text_image": ti,  # text queries over image tokens
        "pair": ti + it + 2 * (2 * wt * 2),  # both cross encoders + image_cross_proj + ITM heads
        "mlm_token": 2.0 * wt * wt + 2.0 * wt * s.vocab_size,  # MLM head: dense + decoder
    }


def fgd_image_tokens(s: R2D2Shape, mask_ratio: float) -> int:
    """Tokens of FgD's masked student view: the class token and the patches it keeps
    (``R2D2ForPretraining.fgd_view`` drops exactly round(ratio * N) before the ViT blocks)."""
    n = s.image_tokens - 1
    return 1 + n - min(n, round(mask_ratio * n))


def objective_flops(
    s: R2D2Shape,
    loss=None,
    *,
    global_batch: int,
    world: int = 1,
    text_valid_frac: float = 1.0,
    mlm_tokens: float | None = None,
) -> dict[str, float]:
    """Training FLOPs per sample by term (``student_encoders``, ``gcpr``, ``fgr``, ``mlm``,
    ``fgd``, ``teacher``) and their ``total``, for the objective ``loss`` (a
    :class:`~r2d2.engine.losses.LossConfig`; None = its defaults, every term on).

    ``global_batch``: the contrastive batch B (all ranks); ``world``: ranks (only
    ``fgr_negatives="local"`` reads it); ``text_valid_frac``: mean fraction of real tokens per
    caption, for the expected MLM token count; ``mlm_tokens``: that count per sample, exactly."""
    if loss is None:
        from r2d2.engine.losses import LossConfig

        loss = LossConfig()
    if (loss.fgr or loss.mlm) and not s.cross_layers:
        raise ValueError(
            "objective_flops: fgr / mlm need the cross encoders, but cross_layers=0 "
            "(prd2): pass a loss config with fgr=False and mlm=False"
        )
    if global_batch < 1 or world < 1:
        raise ValueError(
            f"objective_flops: global_batch={global_batch} and world={world} must be >= 1"
        )
    p, E, B = _passes(s), s.embed_dim, float(global_batch)

    def use(trained: bool) -> float:
        return TRAINED if trained else FORWARD

    def conv(mult: float) -> float:  # pixels need no gradient: the convolution trains at 2x
        return p["conv"] * (CONV_TRAINED if mult == TRAINED else mult)

    teacher = loss.tgd or loss.fgd
    img_use = use(loss.gcpr or loss.fgr or loss.mlm)
    out = {
        "student_encoders": (
            p["image_blocks"] * img_use
            + conv(img_use)
            + p["text"] * use(loss.gcpr or loss.fgr)
            + p["proj"] * use(loss.gcpr)
        ),
        "gcpr": 0.0,
        "fgr": 0.0,
        "mlm": 0.0,
        "fgd": 0.0,
        "teacher": (p["image_blocks"] + p["conv"] + p["text"]) * FORWARD if teacher else 0.0,
    }
    if loss.gcpr:
        out["gcpr"] = 12.0 * B * E + ((p["proj"] + 4.0 * B * E) * FORWARD if loss.tgd else 0.0)
    if loss.fgr:
        out["fgr"] = 3 * p["pair"] * TRAINED + (3 * p["pair"] * FORWARD if loss.tgd else 0.0)
        if loss.fgr_negatives == "local" and world > 1:
            out["fgr"] += 4.0 * (B / world) * E * FORWARD
    if loss.mlm:
        n = (
            mlm_tokens
            if mlm_tokens is not None
            else (loss.mlm_probability * s.text_tokens * text_valid_frac)
        )
        out["mlm"] = (p["text"] + p["text_image"] + n * p["mlm_token"]) * TRAINED
    if loss.fgd:
        kept = fgd_image_tokens(s, loss.fgd_image_mask_ratio)
        out["fgd"] = (_image_blocks(s, kept) + p["text"]) * TRAINED + conv(TRAINED)
        if loss.fgd_features == "global":
            out["fgd"] += p["proj"] * TRAINED + p["proj"] * FORWARD
    out["total"] = sum(out.values())
    return out


def flops_per_sample(
    model_config,
    loss=None,
    *,
    text_len: int,
    global_batch: int,
    image_size: int | None = None,
    world: int = 1,
    text_valid_frac: float = 1.0,
) -> float:
    """Total training FLOPs per sample of ``R2D2ForPretraining(R2D2Model(model_config), loss)``:
    what the trainer and bench_step.py divide by step time (see :func:`objective_flops`)."""
    shape = shape_from_config(model_config, text_len, image_size)
    return objective_flops(
        shape, loss, global_batch=global_batch, world=world, text_valid_frac=text_valid_frac
    )["total"]


def r2d2_flops_per_sample(
    s: R2D2Shape, itm_pairs: int = 3, mask_prob: float = 0.15, global_batch: int = 1
) -> float:
    """Legacy entry: every term of the default objective when ``s.teacher``, else GCPR + FGR +
    MLM without TgD/FgD. Prefer :func:`flops_per_sample` with the run's ``LossConfig``."""
    from r2d2.engine.losses import LossConfig

    if itm_pairs != 3:
        raise ValueError("r2d2_flops_per_sample: the objective always forms 3 ITM pairs per sample")
    has_cross = s.cross_layers > 0
    loss = LossConfig(
        fgr=has_cross, mlm=has_cross, tgd=s.teacher, fgd=s.teacher, mlm_probability=mask_prob
    )
    return objective_flops(s, loss, global_batch=global_batch)["total"]


def dual_encoder_flops_per_sample(s: R2D2Shape, global_batch: int = 1) -> float:
    """PRD2 / contrastive-only training (GCPR alone, no teacher): the two encoders trained."""
    from r2d2.engine.losses import LossConfig

    loss = LossConfig(fgr=False, mlm=False, tgd=False, fgd=False)
    return objective_flops(s, loss, global_batch=global_batch)["total"]


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
