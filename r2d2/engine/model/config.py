"""Typed model configs (dict/YAML round-trippable) and the named presets.

cfg = model_preset("tiny"); ModelConfig.from_dict(cfg.to_dict()) == cfg
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from r2d2.engine.validate import ConfigError, in_range, positive


def _from_dict(cls, d: dict, owner: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{owner}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ConfigError(f"{owner}: unknown field {bad[0]!r}; fields: {sorted(known)}")
    return cls(**d)


@dataclass
class VisionConfig:
    """CLIP-style ViT: patch conv, class token, learned positions, ln_pre, pre-LN blocks."""

    image_size: int = 224
    """input resolution (square), pixels"""
    patch_size: int = 16
    """patch side, pixels; image_size must be a multiple"""
    width: int = 768
    """token width"""
    layers: int = 12
    """number of transformer blocks"""
    heads: int = 12
    """attention heads; width must be a multiple"""
    mlp_ratio: float = 4.0
    """MLP hidden width / width"""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (CLIP uses 1e-5)"""
    dropout: float = 0.0
    """attention-probability dropout (CLIP: 0)"""

    def __post_init__(self) -> None:
        positive(
            "vision", self, "image_size", "patch_size", "width", "layers", "heads", integer=True
        )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} must be a multiple of "
                f"vision.patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ConfigError(
                f"vision.width={self.width} must be a multiple of vision.heads={self.heads}"
            )
        positive("vision", self, "mlp_ratio", "layer_norm_eps")
        in_range("vision", self, "dropout", hi_open=True)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """BERT / RoBERTa-wwm text encoder (post-LN, GELU); also sets the cross encoders' width."""

    vocab_size: int = 21128
    """token vocabulary (RoBERTa-wwm-ext Chinese: 21128)"""
    width: int = 768
    """hidden size"""
    layers: int = 12
    """number of BERT layers"""
    heads: int = 12
    """attention heads; width must be a multiple"""
    intermediate: int = 3072
    """feed-forward hidden size"""
    max_positions: int = 512
    """position-embedding table size (BERT: 512); texts are at most this long"""
    type_vocab_size: int = 2
    """token-type (segment) embeddings"""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT uses 1e-12)"""
    dropout: float = 0.1
    """hidden and attention-probability dropout (BERT: 0.1)"""
    pad_id: int = 0
    """padding token id ([PAD])"""

    def __post_init__(self) -> None:
        positive(
            "text",
            self,
            "vocab_size",
            "width",
            "layers",
            "heads",
            "intermediate",
            "max_positions",
            "type_vocab_size",
            integer=True,
        )
        if self.width % self.heads:
            raise ConfigError(
                f"text.width={self.width} must be a multiple of text.heads={self.heads}"
            )
        positive("text", self, "layer_norm_eps")
        in_range("text", self, "dropout", hi_open=True)
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(
                f"text.pad_id={self.pad_id}: expected an id in [0, {self.vocab_size})"
            )


@dataclass
class ModelConfig:
    """The whole R2D2 model: dual encoders, two cross encoders, projections, temperature."""

    preset: str | None = field(default=None, compare=False)
    """the named preset (:func:`model_preset`) the other fields started from; in a run config's
    ``model:`` section the fields given there change that preset (:meth:`tree_base`). None for a
    config given field by field. Not compared: two configs with the same fields are equal"""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """image encoder"""
    text: TextConfig = field(default_factory=TextConfig)
    """text encoder (the cross encoders use its width, heads, intermediate, eps, dropout)"""
    cross_layers: int = 6
    """layers of each cross encoder; 0 = dual encoders only (PRD2: no FGR/MLM/ITM)"""
    embed_dim: int = 768
    """shared embedding size of the projections"""
    temperature_init: float = 0.07
    """initial contrastive temperature (logit scale = 1 / temperature)"""
    temperature_min: float = 0.001
    """lower clamp of the learned temperature"""
    temperature_max: float = 0.5
    """upper clamp of the learned temperature"""
    max_text_len: int = 64
    """default tokenizer max length for texts given as strings"""
    mlm_head: bool = True
    """build the MLM head on the text-image cross encoder (needs cross_layers > 0)"""
    tie_mlm_embeddings: bool = True
    """MLM decoder weight shares the text word embeddings (BERT)"""
    activation_checkpointing: bool = False
    """recompute each transformer block in backward (torch.utils.checkpoint, non-reentrant)"""
    initializer_range: float = 0.02
    """std of the normal init of every linear and embedding weight (HF BERT's name). BERT's 0.02
    suits width 768: a residual branch's two projections scale its input by about
    (std * sqrt(width))^2, ~0.3 at width 768 but ~0.03 at width 64, where the cross encoders then
    start blind to the other modality and ITM sits at ln 2 for hundreds of steps. The tiny preset
    therefore uses 0.02 * sqrt(768 / 64), the same relative scale as BERT-base."""

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _from_dict(TextConfig, self.text, "text")
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.text, TextConfig):
            raise TypeError("ModelConfig: vision/text must be VisionConfig/TextConfig or dicts")
        positive("model", self, "cross_layers", allow_zero=True, integer=True)
        positive("model", self, "embed_dim", "max_text_len", integer=True)
        positive(
            "model",
            self,
            "initializer_range",
            "temperature_min",
            "temperature_init",
            "temperature_max",
        )
        if not 0 < self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ConfigError(
                "model: expected 0 < temperature_min <= temperature_init <= temperature_max; "
                f"got {self.temperature_min}, {self.temperature_init}, {self.temperature_max}"
            )
        if self.max_text_len > self.text.max_positions:
            raise ConfigError(
                f"model.max_text_len={self.max_text_len} exceeds text.max_positions="
                f"{self.text.max_positions}"
            )
        if self.mlm_head and self.cross_layers == 0:
            # PRD2-style configs simply have no MLM head.
            self.mlm_head = False

    @classmethod
    def tree_base(cls, values: dict) -> dict:
        """The fields a run config's ``model:`` section is merged over: those of the preset it
        names (``preset``, default :data:`DEFAULT_PRESET`), as a dict."""
        name = values.get("preset") or DEFAULT_PRESET
        try:
            return model_preset(name).to_dict()
        except ValueError as e:
            raise ConfigError(f"preset={name!r}: {e}") from None

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def has_cross(self) -> bool:
        return self.cross_layers > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        for k, sub in (("vision", VisionConfig), ("text", TextConfig)):
            if isinstance(d.get(k), dict):
                d[k] = _from_dict(sub, d[k], k)
        return _from_dict(cls, d, "model")


_VIT_B16 = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12)
_VIT_L14 = dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16)
_ROBERTA_BASE = dict(vocab_size=21128, width=768, layers=12, heads=12, intermediate=3072)
_ROBERTA_LARGE = dict(vocab_size=21128, width=1024, layers=24, heads=16, intermediate=4096)
# The tiny text vocab is the project's generated offline vocab (r2d2.engine.tokenizer).
_TINY_VISION = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4)


# BERT's init std scaled to width 64 (see ModelConfig.initializer_range).
_TINY_INIT = 0.02 * (768 / 64) ** 0.5


def _tiny_text() -> dict:
    from r2d2.engine.tokenizer import default_vocab_size

    return dict(
        vocab_size=default_vocab_size(),
        width=64,
        layers=2,
        heads=4,
        intermediate=256,
        max_positions=64,
        dropout=0.0,
    )


def model_preset(name: str) -> ModelConfig:
    """A named model:

    ``tiny``            trains on a CPU in minutes (the project's offline vocab, width 64)
    ``prd2-tiny``       ``tiny`` without cross encoders
    ``base``            ViT-B/16 + RoBERTa-wwm-ext base, cross encoders 6 x 768 (the paper's base)
    ``large``           ViT-L/14 + RoBERTa-wwm-ext large (1024 x 24), cross encoders 6 x 1024: a
                        pre-training configuration of our own; the authors released no such model
    ``large-released``  the released ViT-L/14 model: ViT-L/14 + the *base* RoBERTa-wwm-ext text
                        encoder, cross encoders 6 x 768, embeddings 768, and no MLM head (the
                        release has none), so ``R2D2Model.from_official(path, config=...)`` maps
                        every key and a converted release loads into it strictly (fine-tuning)
    ``prd2``            ``base`` dual encoders only (the released PRD2 variant: GCPR + TgD)
    """
    config = _preset(name)
    config.preset = name
    return config


def _preset(name: str) -> ModelConfig:
    if name == "tiny":
        return ModelConfig(
            vision=VisionConfig(**_TINY_VISION),
            text=TextConfig(**_tiny_text()),
            cross_layers=1,
            embed_dim=64,
            max_text_len=32,
            initializer_range=_TINY_INIT,
        )
    if name == "prd2-tiny":
        return ModelConfig(
            vision=VisionConfig(**_TINY_VISION),
            text=TextConfig(**_tiny_text()),
            cross_layers=0,
            embed_dim=64,
            max_text_len=32,
            initializer_range=_TINY_INIT,
        )
    if name == "base":
        return ModelConfig(vision=VisionConfig(**_VIT_B16), text=TextConfig(**_ROBERTA_BASE))
    if name == "large":
        return ModelConfig(vision=VisionConfig(**_VIT_L14), text=TextConfig(**_ROBERTA_LARGE))
    if name == "large-released":
        return ModelConfig(
            vision=VisionConfig(**_VIT_L14), text=TextConfig(**_ROBERTA_BASE), mlm_head=False
        )
    if name == "prd2":
        return ModelConfig(
            vision=VisionConfig(**_VIT_B16), text=TextConfig(**_ROBERTA_BASE), cross_layers=0
        )
    raise ValueError(f"model preset {name!r}: expected one of {PRESETS}")


PRESETS = ("tiny", "base", "large", "large-released", "prd2", "prd2-tiny")
DEFAULT_PRESET = "tiny"
"""the preset a run config's ``model:`` section starts from when it names none"""
