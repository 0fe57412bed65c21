"""A text-to-image generator small enough for unit tests: the tiny R2D2 (random init, the
built-in vocabulary) and a two-level UNet at 16x16 pixels."""

import torch

from r2d2.engine.model import R2D2Model
from r2d2.engine.model.config import model_preset
from r2d2.engine.tasks.t2i.config import T2IConfig
from r2d2.engine.tasks.t2i.model import T2IModel, T2IModelConfig
from r2d2.engine.tokenizer import build_tokenizer

SMALL_UNET = dict(
    block_out_channels=[8, 16],
    attention_levels=[False, True],
    norm_groups=4,
    attention_head_dim=4,
    cross_dim=16,
    steps=4,
)
"""``T2IConfig`` fields of a UNet of about 30k parameters."""

PROMPTS = [
    "蓝色背景上有两个红色的圆形",
    "白色背景上有一个黑色的三角形",
    "绿色背景上有三个黄色的正方形",
]


def small_generator(seed: int = 0, size: int = 16, **t2i) -> T2IModel:
    """A random-init generator (its R2D2 too), in eval mode, with a tokenizer."""
    torch.manual_seed(seed)
    r2d2 = R2D2Model(model_preset("tiny"))
    r2d2.tokenizer = build_tokenizer(None, max_length=16)
    cfg = T2IConfig(**{**SMALL_UNET, **t2i})
    m = T2IModel(r2d2, T2IModelConfig(cfg, image_size=size, max_text_len=16))
    return m.eval()


def batch(m: T2IModel, prompts: list[str], size: int = 16) -> dict:
    ids, mask = m.tokenize(prompts)
    return {
        "images": torch.randn(len(prompts), 3, size, size),
        "input_ids": ids,
        "attention_mask": mask,
    }
