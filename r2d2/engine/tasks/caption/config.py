"""The run config's ``caption`` section (read only when ``train.task=caption``) and the decoding
settings of ``r2d2 eval caption`` and ``r2d2 caption``.

A leaf module (it imports only :mod:`r2d2.engine.validate`): :mod:`r2d2.engine.config` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from r2d2.engine.validate import ConfigError, boolean, choice, in_range, is_int, positive

STRATEGIES = ("beam", "greedy", "sample")
EVAL_TOKENIZE = ("jieba", "char", "none")


@dataclass
class CaptionConfig:
    """Captioning fine-tune, decoding and evaluation settings.

    The decoder is always a *copy* of the pre-trained text-image cross encoder (see
    :mod:`r2d2.engine.model.captioner`), so there is no share/copy switch here."""

    # ---------------------------------------------------------------- training
    label_smoothing: float = 0.1
    """token cross-entropy label smoothing"""
    prompt: str = ""
    """text fed after [CLS] before every caption (e.g. 一张图片：); its tokens are context, never
    scored, and stripped from decoded captions. Saved with the model: decoding feeds the same"""
    # ---------------------------------------------------------------- decoding
    strategy: str = "beam"
    """beam | greedy | sample (nucleus sampling with top_p and temperature)"""
    beam_size: int = 3
    """beams per image (strategy=beam; 1 = greedy)"""
    length_penalty: float = 1.0
    """beam search ranks finished captions by sum log p / length ** length_penalty (0 = raw sum,
    which favours short captions; > 0 favours longer ones)"""
    max_length: int = 30
    """most generated tokens per caption, the closing [SEP] included"""
    min_length: int = 1
    """fewest caption tokens before [SEP] may be generated"""
    no_repeat_ngram: int = 0
    """never generate an n-gram of this size twice in one caption (0 = off)"""
    top_p: float = 0.9
    """nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p"""
    temperature: float = 1.0
    """sampling temperature (logits / temperature)"""
    seed: int = 0
    """sampling seed: the same seed gives the same captions"""
    # ---------------------------------------------------------------- evaluation
    eval_tokenize: str = "jieba"
    """how metrics split Chinese captions into words: jieba (AIC-ICC scoring) | char | none"""
    eval_batch_size: int = 32
    """images per decoding batch in the evaluation"""
    baseline_pool: int = 2000
    """training images the nearest-image baseline searches (the first N that decode)"""
    eval_samples: int = 20
    """captions written into caption_eval.json as a sample"""
    baseline_path: str | None = None
    """r2d2 eval caption: the training annotation file (data.format) whose captions the
    baselines use; the synthetic format uses its training split; unset = no baselines"""
    baseline_image_root: str | None = None
    """r2d2 eval caption: the image folder of caption.baseline_path (default data.image_root)"""
    baselines: bool = True
    """measure the most-frequent-caption and nearest-image baselines in the same evaluation"""

    def __post_init__(self) -> None:
        in_range("caption", self, "label_smoothing", hi_open=True)
        if not isinstance(self.prompt, str):
            raise ConfigError(f"caption.prompt={self.prompt!r} must be a string")
        choice("caption", "strategy", self.strategy, STRATEGIES)
        choice("caption", "eval_tokenize", self.eval_tokenize, EVAL_TOKENIZE)
        positive(
            "caption",
            self,
            "beam_size",
            "max_length",
            "eval_batch_size",
            "baseline_pool",
            integer=True,
        )
        positive(
            "caption",
            self,
            "min_length",
            "no_repeat_ngram",
            "eval_samples",
            allow_zero=True,
            integer=True,
        )
        if self.min_length >= self.max_length:
            raise ConfigError(
                f"caption.min_length={self.min_length} must be below caption.max_length="
                f"{self.max_length} (the closing [SEP] counts towards max_length)"
            )
        if not is_int(self.seed):
            raise ConfigError(f"caption.seed={self.seed!r} must be an int")
        in_range("caption", self, "top_p")
        if self.top_p == 0:
            raise ConfigError("caption.top_p=0 keeps no token; expected a value in (0, 1]")
        positive("caption", self, "length_penalty", allow_zero=True)
        positive("caption", self, "temperature")
        boolean("caption", self, "baselines")
