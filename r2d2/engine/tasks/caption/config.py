"""The run config's ``caption`` section (read only when ``train.task=caption``)."""

from __future__ import annotations

from dataclasses import dataclass

from r2d2.engine.validate import in_range


@dataclass
class CaptionConfig:
    """Captioning fine-tune and decoding settings."""

    label_smoothing: float = 0.1
    """token cross-entropy label smoothing"""

    def __post_init__(self) -> None:
        in_range("caption", self, "label_smoothing", hi_open=True)
