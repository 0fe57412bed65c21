"""The R2D2 model: CLIP ViT + BERT dual encoders, two cross encoders, ITM heads, MLM head."""

from r2d2.engine.model.bert import CrossEncoder, MLMHead, TextEncoder  # noqa: F401
from r2d2.engine.model.config import PRESETS, ModelConfig, TextConfig, VisionConfig, model_preset  # noqa: F401
from r2d2.engine.model.r2d2 import R2D2Model  # noqa: F401
from r2d2.engine.model.vit import VisionTransformer  # noqa: F401
