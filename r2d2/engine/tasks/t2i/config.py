"""The run config's ``t2i`` section (read only when ``train.task=t2i``), also the sampling and
evaluation settings of ``r2d2 eval t2i`` (its ``t2i`` section).

A leaf module (it imports only :mod:`r2d2.engine.validate`): :mod:`r2d2.engine.config` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r2d2.engine.validate import (
    ConfigError,
    boolean,
    choice,
    in_range,
    is_int,
    positive,
)

SPACES = ("pixel", "latent")
SAMPLERS = ("ddim", "dpm", "ddpm")
PREDICTIONS = ("epsilon", "v_prediction")
CONDITIONS = ("text",)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class T2IConfig:
    """Text-to-image generator, training, sampling and evaluation settings.

    The generator is diffusers' ``UNet2DConditionModel`` built from these fields (random init),
    conditioned by cross-attention on a linear projection of the R2D2 text encoder's token states.
    ``condition`` is ``text`` only: the text-image cross encoder's states need an image to attend
    to, and at sampling time there is none (feeding the noisy sample itself would make the
    condition change along the trajectory and cost a cross-encoder pass per step)."""

    # ---------------------------------------------------------------- generator
    space: str = "pixel"
    """pixel: diffuse RGB at data.image_size | latent: diffuse the latents of a local diffusers
    AutoencoderKL folder (``vae``), image size / 2^(VAE levels - 1) per side"""
    vae: str | None = None
    """latent space: a local diffusers AutoencoderKL folder (config.json + weights); never
    downloaded"""
    block_out_channels: list = field(default_factory=lambda: [32, 64, 64])
    """UNet channels per resolution level (each divisible by norm_groups)"""
    attention_levels: list = field(default_factory=lambda: [False, True, True])
    """which levels (same length as block_out_channels) have cross-attention to the text"""
    layers_per_block: int = 1
    """ResNet layers per UNet level"""
    attention_head_dim: int = 8
    """channels per attention head in the UNet's transformer blocks"""
    norm_groups: int = 8
    """GroupNorm groups in the UNet"""
    cross_dim: int = 64
    """UNet cross-attention width: the R2D2 token states are projected to it"""
    pooled: bool = True
    """also condition on the prompt's pooled R2D2 embedding (the dual encoder's text embedding),
    added to the UNet's timestep embedding as Imagen does: every ResNet block sees it. With
    cross-attention alone the tiny preset's UNet ignored the prompt after 400 steps (its noise
    prediction moved by < 0.01 between prompts)"""
    condition: str = "text"
    """which R2D2 states condition the UNet: text (the text encoder's token states)"""
    finetune_text: bool = False
    """train the R2D2 text encoder too (default: frozen, only the projection and UNet train)"""
    # ---------------------------------------------------------------- diffusion training
    train_timesteps: int = 1000
    """DDPM training noise schedule length"""
    beta_schedule: str = "squaredcos_cap_v2"
    """DDPM betas: linear | scaled_linear | squaredcos_cap_v2 (cosine, better for small images)"""
    prediction: str = "epsilon"
    """what the UNet predicts: epsilon | v_prediction"""
    cond_dropout: float = 0.1
    """probability of training a sample with the null (empty-prompt) condition, for
    classifier-free guidance"""
    ema_decay: float = 0.999
    """EMA of the UNet + projection + null condition after every optimizer step (0 = the EMA
    copy follows the weights exactly); the EMA weights are what is exported and sampled"""
    ema_warmup: bool = True
    """use decay min(ema_decay, (1 + n) / (10 + n)) at update n, so a short run's EMA is not
    dominated by the random init"""
    # ---------------------------------------------------------------- sampling
    sampler: str = "dpm"
    """ddim | dpm (DPM-Solver++ multistep) | ddpm"""
    steps: int = 25
    """sampling steps"""
    guidance: float = 3.0
    """classifier-free guidance scale (1 = conditional only, 0 = unconditional)"""
    seed: int = 0
    """sampling seed (torch.Generator): the same seed and prompts give the same images"""
    # ---------------------------------------------------------------- evaluation
    eval_prompts: int = 100
    """held-out prompts generated for (distinct captions, the first N of the held-out split)"""
    eval_candidates: int = 100
    """R-precision: each image's prompt is ranked among itself and this many minus one other
    distinct held-out prompts (chance = 1 / eval_candidates)"""
    eval_batch_size: int = 50
    """prompts per sampling batch in the evaluation"""
    grid_prompts: int = 8
    """prompts in the evaluation's picture grid (grid.png)"""
    grid_per_prompt: int = 4
    """images per prompt in the grid"""
    evaluator: str | None = None
    """R2D2 save_pretrained folder that scores the images (R-precision, ITM); default: the
    generator's own R2D2 model (the text encoder's source)"""
    inception_weights: str | None = None
    """FID / Inception score: a local pt_inception-2015-12-05 weights file for torch-fidelity;
    unset = skipped (said so in the JSON)"""

    def __post_init__(self) -> None:
        choice("t2i", "space", self.space, SPACES)
        choice("t2i", "sampler", self.sampler, SAMPLERS)
        choice("t2i", "prediction", self.prediction, PREDICTIONS)
        choice("t2i", "condition", self.condition, CONDITIONS)
        choice("t2i", "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.space == "latent" and not self.vae:
            raise ConfigError(
                "t2i.space=latent needs t2i.vae: a local diffusers AutoencoderKL folder"
            )
        n = len(self.block_out_channels) if isinstance(self.block_out_channels, list) else 0
        if n < 1 or not all(is_int(c) and c > 0 for c in self.block_out_channels):
            raise ConfigError(
                f"t2i.block_out_channels={self.block_out_channels!r} must be a list of positive ints"
            )
        if not isinstance(self.attention_levels, list) or len(self.attention_levels) != n:
            raise ConfigError(
                f"t2i.attention_levels={self.attention_levels!r} must be a list of {n} bools "
                "(one per block_out_channels level)"
            )
        if not all(isinstance(a, bool) for a in self.attention_levels) or not any(
            self.attention_levels
        ):
            raise ConfigError(
                f"t2i.attention_levels={self.attention_levels!r} must be bools, at least one "
                "true (the text conditions the UNet through cross-attention)"
            )
        positive(
            "t2i",
            self,
            "layers_per_block",
            "attention_head_dim",
            "norm_groups",
            "cross_dim",
            "train_timesteps",
            "steps",
            "eval_prompts",
            "eval_batch_size",
            "grid_prompts",
            "grid_per_prompt",
            integer=True,
        )
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad:
            raise ConfigError(
                f"t2i.block_out_channels={self.block_out_channels} must be divisible by "
                f"t2i.norm_groups={self.norm_groups}"
            )
        if not is_int(self.eval_candidates) or self.eval_candidates < 2:
            raise ConfigError(f"t2i.eval_candidates={self.eval_candidates!r} must be an int >= 2")
        if self.steps > self.train_timesteps:
            raise ConfigError(
                f"t2i.steps={self.steps} must not exceed t2i.train_timesteps={self.train_timesteps}"
            )
        in_range("t2i", self, "cond_dropout", "ema_decay")
        positive("t2i", self, "guidance", allow_zero=True)
        boolean("t2i", self, "finetune_text", "ema_warmup", "pooled")
        if not is_int(self.seed):
            raise ConfigError(f"t2i.seed={self.seed!r} must be an int")
        for name in ("vae", "evaluator", "inception_weights"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"t2i.{name}={v!r} must be a path or null")
