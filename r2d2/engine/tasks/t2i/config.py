"""The run config's ``t2i`` section (read only when ``train.task=t2i``)."""

from __future__ import annotations

from dataclasses import dataclass

from r2d2.engine.validate import in_range


@dataclass
class T2IConfig:
    """Text-to-image generator, training and sampling settings."""

    cond_dropout: float = 0.1
    """probability of training a sample with the empty prompt (classifier-free guidance)"""

    def __post_init__(self) -> None:
        in_range("t2i", self, "cond_dropout")
