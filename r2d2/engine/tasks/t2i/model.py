"""The text-to-image generator: diffusers' ``UNet2DConditionModel`` conditioned on the R2D2 text
encoder, trained with the DDPM noise schedule, sampled with DDIM / DPM-Solver++ / DDPM.

    text states   S = r2d2.text_tokens(ids, mask)                [B, L, Wt]  (frozen by default)
    condition     C = proj(S), mask = tokenizer mask            [B, L, D]   D = t2i.cross_dim
                  (t2i.pooled) p = sqrt(E) normalize(text_proj(S[:, 0]))  [B, E], the dual
                  encoder's text embedding, into the UNet's class embedding (added to the
                  timestep embedding)
    null cond     C0 = (null token, masked padding), mask0 = [1, 0, ..., 0], p0   (learned)
    training      x0 = image in [-1, 1] (pixel) or VAE latent * scaling_factor (latent)
                  t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
                  target = eps (epsilon) or sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (v_prediction)
                  C := C0 for a Bernoulli(cond_dropout) share of the batch
                  loss = mean (unet(x_t, t, C) - target)^2
    guidance      e = e(C0) + g (e(C) - e(C0));  g = 1: e(C) alone, g = 0: e(C0) alone

The trainable part (UNet + projection + null token) is one :class:`Denoiser`; its EMA copy is a
submodule of :class:`T2IModel`, so checkpoints and ``--resume`` carry it, and it is what
``save_pretrained`` writes and what sampling uses. The VAE (latent space) is frozen and held
outside the module tree: it is never in a checkpoint, only its folder's path is saved.

A ``save_pretrained`` folder::

    config.json                model_type r2d2-t2i, the t2i settings, image size, text length
    unet/                      diffusers UNet2DConditionModel (EMA weights)
    conditioner.safetensors    projection + null token (EMA weights)
    scheduler/                 the DDPM training schedule (samplers are built from it)
    r2d2/                      the R2D2 model the text encoder comes from (+ vocab.txt)
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from r2d2.engine.data.loader import Tokenize
from r2d2.engine.data.transforms import CLIP_MEAN, CLIP_STD
from r2d2.engine.errors import UsageError
from r2d2.engine.model import R2D2Model
from r2d2.engine.tasks.t2i.config import T2IConfig
from r2d2.engine.tokenizer import build_tokenizer
from r2d2.engine.validate import build

CONFIG_NAME, COND_NAME = "config.json", "conditioner.safetensors"
MODEL_TYPE = "r2d2-t2i"


class MissingDependency(UsageError):
    """An optional dependency of text-to-image is not installed (exit status 2)."""


def diffusers_module():
    """``diffusers``, or a one-line error saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise MissingDependency(
            "text-to-image needs diffusers: pip install r2d2-engine[t2i]"
        ) from None
    return diffusers


def build_unet(
    cfg: T2IConfig, channels: int, sample_size: int, pooled_dim: int | None = None
) -> nn.Module:
    """A randomly initialised ``UNet2DConditionModel`` of ``cfg``'s shape; with ``pooled_dim``
    its class-embedding input takes a pooled text vector of that width."""
    d = diffusers_module()
    levels = list(zip(cfg.block_out_channels, cfg.attention_levels))
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for _, a in levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for _, a in reversed(levels))
    return d.UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_groups,
        class_embed_type="projection" if pooled_dim else None,
        projection_class_embeddings_input_dim=pooled_dim,
    )


def noise_scheduler(cfg: T2IConfig):
    """The DDPM training schedule (what the samplers are built from)."""
    return diffusers_module().DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction,
        clip_sample=False,
    )


def sampler_scheduler(kind: str, train_config, pixel: bool = True):
    """A fresh sampler (``ddim`` | ``dpm`` | ``ddpm``) on the training schedule ``train_config``.

    In pixel space every sampler keeps its x0 prediction inside the data range [-1, 1] (DDIM /
    DDPM ``clip_sample``, DPM-Solver++ dynamic thresholding), as pixel-space models do (Imagen,
    DeepFloyd IF): under the cosine schedule abar at the first steps is ~1e-4, so the x0
    prediction (x - sigma eps) / alpha amplifies the noise prediction's error a hundredfold, and
    DPM-Solver++, which steps on x0 predictions, ends with every pixel saturated without it.
    Latents have no fixed range: nothing is clipped there."""
    d = diffusers_module()
    if kind == "ddim":
        return d.DDIMScheduler.from_config(train_config, clip_sample=pixel, set_alpha_to_one=False)
    if kind == "dpm":
        return d.DPMSolverMultistepScheduler.from_config(
            train_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=pixel,
            sample_max_value=1.0,
        )
    if kind == "ddpm":
        return d.DDPMScheduler.from_config(train_config, clip_sample=pixel)
    raise UsageError(f"sampler {kind!r} is not one of ('ddim', 'dpm', 'ddpm')")


def load_vae(path: str):
    """A frozen ``AutoencoderKL`` from a local diffusers folder (never downloaded)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(
            f"t2i.vae={path!r}: no diffusers AutoencoderKL folder there (expected config.json "
            "and the weights; nothing is downloaded)"
        )
    try:
        vae = diffusers_module().AutoencoderKL.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as e:
        msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UsageError(f"t2i.vae={path!r}: not a loadable AutoencoderKL folder ({msg})") from None
    vae.requires_grad_(False)
    return vae.eval()


@dataclasses.dataclass
class T2IModelConfig:
    """What a generator is, beyond the weights: its settings, the image size it makes and the
    text length it was trained with (prompts are tokenised to it)."""

    t2i: T2IConfig
    image_size: int
    max_text_len: int

    def to_dict(self) -> dict:
        return {
            "model_type": MODEL_TYPE,
            "image_size": self.image_size,
            "max_text_len": self.max_text_len,
            "t2i": dataclasses.asdict(self.t2i),
        }

    @classmethod
    def from_dict(cls, d: dict) -> T2IModelConfig:
        return cls(build(T2IConfig, d["t2i"], "t2i."), int(d["image_size"]), int(d["max_text_len"]))


class Denoiser(nn.Module):
    """The trainable generator: UNet, the projection of R2D2 token states to its cross-attention
    width, and the learned null condition (one token; the rest of its sequence is masked). With
    ``pooled_dim`` the UNet also takes the prompt's pooled R2D2 embedding through its
    class-embedding input (added to the timestep embedding, Imagen's pooled conditioning), with
    a learned null vector of its own.

    A condition is the triple ``(C [B, L, D], mask [B, L], pooled [B, P] or None)``."""

    def __init__(
        self, unet: nn.Module, text_width: int, cross_dim: int, pooled_dim: int | None = None
    ) -> None:
        super().__init__()
        self.unet = unet
        self.proj = nn.Linear(text_width, cross_dim)
        self.null = nn.Parameter(torch.randn(cross_dim) * 0.02)
        self.null_pooled = (
            nn.Parameter(torch.randn(pooled_dim) * 0.02) if pooled_dim is not None else None
        )

    def condition(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> tuple:
        """The condition of the text ``states``; rows where ``drop`` is True get the null
        condition. ``torch.where`` keeps the null parameters in the graph for every batch, so DDP
        sees all parameters used whether or not a row was dropped."""
        c = self.proj(states)
        mask = mask.to(c.dtype)
        if self.null_pooled is None:
            pooled = None
        elif pooled is None:
            raise ValueError("this generator is conditioned on the pooled text embedding too")
        if drop is None:
            return c, mask, pooled
        nc, nm, npool = self.null_condition(c.shape[0], c.shape[1])
        d = drop.view(-1, 1, 1)
        c = torch.where(d, nc.to(c.dtype), c)
        mask = torch.where(d[..., 0], nm.to(mask.dtype), mask)
        if pooled is not None:
            pooled = torch.where(d[..., 0], npool.to(pooled.dtype), pooled)
        return c, mask, pooled

    def null_condition(self, n: int, length: int) -> tuple:
        """The null condition for ``n`` rows of ``length`` positions."""
        dev, dt = self.null.device, self.null.dtype
        first = torch.zeros(n, length, 1, device=dev, dtype=dt)
        first[:, 0] = 1.0
        c = first * self.null  # the null token at position 0, zeros (masked) after it
        m = first[..., 0]
        p = None if self.null_pooled is None else self.null_pooled.expand(n, -1)
        return c, m, p

    def forward(self, x, t, cond: tuple) -> torch.Tensor:
        c, mask, pooled = cond
        return self.unet(
            x, t, encoder_hidden_states=c, encoder_attention_mask=mask, class_labels=pooled
        ).sample


def cat_conditions(a: tuple, b: tuple) -> tuple:
    """Two conditions stacked along the batch (for one guided forward)."""
    return tuple(None if x is None else torch.cat([x, y]) for x, y in zip(a, b))


class T2IModel(nn.Module):
    """Generator + R2D2 text encoder + EMA copy. ``tokenizer`` (the R2D2 vocabulary) turns
    prompts into ids; the trainer and ``from_pretrained`` set it."""

    def __init__(
        self,
        r2d2: R2D2Model,
        config: T2IModelConfig,
        unet: nn.Module | None = None,
        vae=None,
    ) -> None:
        super().__init__()
        cfg = config.t2i
        self.config = config
        self.r2d2 = r2d2
        self.tokenizer = r2d2.tokenizer
        self._vae = [vae]  # a list: outside the module tree (never in a state dict)
        if cfg.space == "latent" and vae is None:
            self._vae = [load_vae(cfg.vae)]
        vae = self._vae[0]
        if vae is not None:
            levels = len(vae.config.block_out_channels) - 1
            if config.image_size % (2**levels):
                raise UsageError(
                    f"data.image_size={config.image_size} must be divisible by the VAE's "
                    f"downsampling factor {2**levels}"
                )
            self.channels = int(vae.config.latent_channels)
            self.sample_size = config.image_size // 2**levels
            self.latent_scale = float(getattr(vae.config, "scaling_factor", 1.0))
        else:
            self.channels, self.sample_size, self.latent_scale = 3, config.image_size, 1.0
        pooled_dim = r2d2.config.embed_dim if cfg.pooled else None
        if unet is None:
            unet = build_unet(cfg, self.channels, self.sample_size, pooled_dim)
        self.denoiser = Denoiser(unet, r2d2.config.text.width, cfg.cross_dim, pooled_dim)
        self.ema = copy.deepcopy(self.denoiser)
        self.ema.requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.scheduler = noise_scheduler(cfg)
        self.r2d2.requires_grad_(False)
        if cfg.finetune_text:
            self.r2d2.text.requires_grad_(True)
            self.r2d2.text_proj.requires_grad_(cfg.pooled)
        self.r2d2.eval()

    def train(self, mode: bool = True) -> T2IModel:
        super().train(mode)
        self.r2d2.eval()  # frozen parts: no dropout; a fine-tuned text encoder trains
        if mode and self.config.t2i.finetune_text:
            self.r2d2.text.train()
        self.ema.eval()
        return self

    @property
    def vae(self):
        return self._vae[0]

    # ------------------------------------------------------------------ spaces
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Engine-normalised images (CLIP mean/std) -> what the UNet diffuses: pixels in [-1, 1],
        or VAE latents times the VAE's scaling factor."""
        mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
        x = (images.float() * std + mean) * 2 - 1
        if self.vae is None:
            return x
        vae = self.vae.to(x.device)
        with torch.no_grad():
            return vae.encode(x).latent_dist.sample() * self.latent_scale

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A denoised sample -> images in [0, 1] ``[B, 3, H, W]``."""
        if self.vae is not None:
            vae = self.vae.to(x.device)
            with torch.no_grad():
                x = vae.decode(x / self.latent_scale).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ conditioning
    def text_states(self, ids: torch.Tensor, mask: torch.Tensor):
        """``(token states [B, L, Wt], pooled [B, E] or None)`` of the R2D2 text encoder (no graph
        unless it is fine-tuned). Pooled: the dual encoder's L2-normalised text embedding, scaled
        by sqrt(E) to unit-variance entries, the vector R2D2 matches against images."""
        train_text = self.config.t2i.finetune_text and self.training
        with torch.set_grad_enabled(train_text and torch.is_grad_enabled()):
            states = self.r2d2.text_tokens(ids, mask)
            if not self.config.t2i.pooled:
                return states, None
            pooled = self.r2d2.text_embed(states) * self.r2d2.config.embed_dim**0.5
            return states, pooled.to(states.dtype)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise UsageError("the generator has no tokenizer (its r2d2/vocab.txt is missing)")
        ids, mask = Tokenize(self.tokenizer, self.config.max_text_len)(list(prompts))
        return ids.to(self.r2d2.device), mask.to(self.r2d2.device)

    def encode_prompts(self, prompts: list[str], denoiser: nn.Module | None = None) -> tuple:
        """The condition of each prompt; an empty prompt gets the null condition (what
        condition dropout trained), so "" samples the unconditional model."""
        den = self.ema if denoiser is None else denoiser
        ids, mask = self.tokenize(prompts)
        states, pooled = self.text_states(ids, mask)
        empty = torch.tensor([not p.strip() for p in prompts], device=states.device)
        return den.condition(states, mask, pooled, drop=empty if empty.any() else None)

    # ------------------------------------------------------------------ training
    def loss(self, images, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """The diffusion loss of one batch (t, noise and condition dropout from the global RNG,
        which the trainer checkpoints: a resumed run draws the same)."""
        cfg = self.config.t2i
        x0 = self.to_model_space(images)
        b = x0.shape[0]
        dev = x0.device
        t = torch.randint(0, cfg.train_timesteps, (b,), device=dev)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        target = noise if cfg.prediction == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        drop = self.drop_mask(b, dev)
        states, pooled = self.text_states(input_ids, attention_mask)
        cond = self.denoiser.condition(states, attention_mask, pooled, drop)
        pred = self.denoiser(xt, t, cond)
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss, "dropped": drop.float().mean()}

    def drop_mask(self, n: int, device) -> torch.Tensor:
        """Which of ``n`` training rows get the null condition: Bernoulli(``cond_dropout``)."""
        return torch.rand(n, device=device) < self.config.t2i.cond_dropout

    @torch.no_grad()
    def ema_update(self) -> None:
        """ema = d * ema + (1 - d) * weights; with ``ema_warmup`` d = min(decay, (1+n)/(10+n))."""
        cfg = self.config.t2i
        n = int(self.ema_updates)
        d = min(cfg.ema_decay, (1 + n) / (10 + n)) if cfg.ema_warmup else cfg.ema_decay
        e, s = list(self.ema.parameters()), list(self.denoiser.parameters())
        torch._foreach_lerp_(e, s, 1.0 - d)
        for eb, sb in zip(self.ema.buffers(), self.denoiser.buffers()):
            eb.copy_(sb)
        self.ema_updates += 1

    # ------------------------------------------------------------------ sampling
    def guided(self, den, x, t, cond: tuple, null: tuple, guidance: float) -> torch.Tensor:
        """The classifier-free-guided prediction ``e(C0) + g (e(C) - e(C0))``; g = 1 runs the
        conditional branch only and g = 0 the unconditional one (exactly, and half the cost).
        For other g, ``x`` and ``t`` are those of one branch: both run as one batch."""
        if guidance == 1:
            return den(x, t, cond)
        if guidance == 0:
            return den(x, t, null)
        both = den(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(null, cond))
        eu, ec = both.chunk(2)
        return eu + guidance * (ec - eu)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        batch_size: int = 64,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Images in [0, 1] ``[len(prompts), 3, H, W]``, one per prompt (repeat a prompt for
        several). The starting noise of all images is drawn first, in order, from one CPU
        ``torch.Generator(seed)``: the same prompts and seed give the same images."""
        cfg = self.config.t2i
        steps = cfg.steps if steps is None else steps
        guidance = cfg.guidance if guidance is None else guidance
        seed = cfg.seed if seed is None else seed
        if not isinstance(steps, int) or steps < 1 or steps > cfg.train_timesteps:
            raise UsageError(f"steps={steps!r} must be an int in [1, {cfg.train_timesteps}]")
        if guidance < 0:
            raise UsageError(f"guidance={guidance!r} must be >= 0")
        den = self.ema if use_ema else self.denoiser
        dev = self.r2d2.device
        g = torch.Generator().manual_seed(int(seed))
        shape = (len(prompts), self.channels, self.sample_size, self.sample_size)
        noise = torch.randn(shape, generator=g)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            cond = self.encode_prompts(chunk, den)
            null = den.null_condition(len(chunk), cond[0].shape[1])
            sch = sampler_scheduler(
                sampler or cfg.sampler, self.scheduler.config, pixel=self.vae is None
            )
            sch.set_timesteps(steps)
            takes_gen = "generator" in inspect.signature(sch.step).parameters
            x = noise[i : i + batch_size].to(dev) * sch.init_noise_sigma
            for t in sch.timesteps:
                xin = sch.scale_model_input(x, t)
                tt = t.to(dev).expand(xin.shape[0])
                e = self.guided(den, xin, tt, cond, null, guidance)
                kw = {"generator": g} if takes_gen else {}
                x = sch.step(e, t, x, **kw).prev_sample
            out.append(self.to_pixels(x).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def generate(self, prompts: list[str], per_prompt: int = 1, **kw):
        """PIL images, ``per_prompt`` per prompt (prompt-major order); ``kw`` as :meth:`sample`."""
        rows = [p for p in prompts for _ in range(per_prompt)]
        return to_pil(self.sample(rows, **kw))

    # ------------------------------------------------------------------ files
    def save_pretrained(self, path: str) -> None:
        """One folder (see the module docstring): the EMA weights, which sampling uses."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.config.to_dict(), f, indent=2, ensure_ascii=False)
        self.ema.unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
        cond = {k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}
        save_file(
            {k: v for k, v in cond.items() if not k.startswith("unet.")},
            os.path.join(path, COND_NAME),
        )
        self.scheduler.save_pretrained(os.path.join(path, "scheduler"))
        if self.r2d2.tokenizer is None:
            self.r2d2.tokenizer = self.tokenizer
        self.r2d2.save_pretrained(os.path.join(path, "r2d2"))

    @classmethod
    def from_pretrained(cls, path: str, vae: str | None = None) -> T2IModel:
        """Load a :meth:`save_pretrained` folder (``vae`` overrides the saved VAE folder)."""
        from safetensors.torch import load_file

        d = diffusers_module()
        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise UsageError(f"{path}: no config.json (expected a text-to-image model folder)")
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("model_type") != MODEL_TYPE:
            raise UsageError(
                f"{path}: model_type {raw.get('model_type')!r} is not a text-to-image model "
                f"({MODEL_TYPE}; train one with r2d2 finetune --config t2i_tiny)"
            )
        if vae:
            raw["t2i"]["vae"] = vae
        config = T2IModelConfig.from_dict(raw)
        r2d2 = R2D2Model.from_pretrained(os.path.join(path, "r2d2"))
        unet = d.UNet2DConditionModel.from_pretrained(
            os.path.join(path, "unet"), local_files_only=True, low_cpu_mem_usage=False
        )
        model = cls(r2d2, config, unet=unet)
        cond = load_file(os.path.join(path, COND_NAME))
        for den in (model.denoiser, model.ema):
            missing, unexpected = den.load_state_dict(cond, strict=False)
            if unexpected or any(not k.startswith("unet.") for k in missing):
                raise UsageError(f"{path}: {COND_NAME} does not fit the model")
        vocab = os.path.join(path, "r2d2", "vocab.txt")
        if os.path.isfile(vocab):  # prompts tokenised exactly as in training
            model.tokenizer = build_tokenizer(vocab, max_length=config.max_text_len)
        return model.eval()


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in [0, 1] -> PIL RGB images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]
