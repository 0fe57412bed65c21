"""``r2d2 eval``'s typed config: :class:`EvalConfig` and its sections.

Read with the run config's loader (:func:`r2d2.engine.config.load_tree`): a YAML file
(``configs/eval_*.yaml``, ``base:`` inheritance), then ``--section.field=value`` (or
``--section.field value``) overrides, values coerced to the field types and validated in each
dataclass's ``__post_init__`` with :mod:`r2d2.engine.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r2d2.engine.config import load_tree
from r2d2.engine.data.ccmb import (
    CAPTION_FORMATS,
    CLASSIFICATION_FORMATS,
    FORMATS,
    MATCHING_FORMATS,
    RETRIEVAL_FORMATS,
)
from r2d2.engine.tasks.caption.config import CaptionConfig
from r2d2.engine.tasks.retrieval import RetrievalEvalConfig
from r2d2.engine.tasks.t2i.config import T2IConfig
from r2d2.engine.tasks.zeroshot import DEFAULT_TEMPLATES, check_templates
from r2d2.engine.validate import ConfigError, build, choice, in_range, is_int, positive

TASKS = ("retrieval", "matching", "zeroshot", "caption", "t2i")
EVAL_FORMATS = FORMATS + ("synthetic",)
# Which data formats each task evaluates. icm / iqm are refused for retrieval: their label-0 pairs
# are deliberate mismatches, so treating every pair as ground truth would reward wrong matches.
TASK_FORMATS = {
    "retrieval": RETRIEVAL_FORMATS + ("synthetic",),
    "matching": MATCHING_FORMATS + ("synthetic",),
    "zeroshot": CLASSIFICATION_FORMATS,
    "t2i": RETRIEVAL_FORMATS + ("synthetic",),
    "caption": CAPTION_FORMATS + ("synthetic",),
}


@dataclass
class EvalDataConfig:
    """Which split to evaluate and how to read it (see ``r2d2.engine.data.ccmb``)."""

    format: str = "icr"
    """one of r2d2.engine.data.ccmb.FORMATS, or synthetic (the embedded set's held-out split,
    no files: retrieval, and matching against mismatched captions)"""
    path: str = ""
    """annotation file (or class-folder root for zeroshot)"""
    image_root: str | None = None
    """image folder; default: the annotation file's folder"""
    captions: str | None = None
    """coco_cn: the captions file (default imageid.human-written-caption.txt beside path)"""
    gallery: str | None = None
    """muge: the split's image pool every query is ranked against, <split>_imgs.tsv (or a folder
    of the unpacked images); default <split>_imgs.tsv beside path"""
    classnames: str | None = None
    """zeroshot: class-names file, one per line"""
    limit: int | None = None
    """evaluate only the first N records (quick checks; MUGE: the first N query-item pairs
    against their own images plus the first N images of the pool)"""
    vocab: str | None = None
    """tokenizer vocab.txt; default: the checkpoint's, else the project's built-in vocabulary"""
    max_text_len: int | None = None
    """tokens per text; default: the model's max_text_len (what it was trained with)"""
    synthetic_size: int = 200
    """synthetic: held-out pairs (the pre-training run's data.synthetic_eval_size)"""
    seed: int = 0
    """synthetic: the data seed of the pre-training run"""
    check_images: bool = True
    """load every image once before evaluating (each rank its share, threaded): an image that is
    present but cannot be decoded is left out with its pairs (and from a MUGE pool) and counted
    as corrupt_image, instead of stopping the run at its first batch"""

    def __post_init__(self) -> None:
        choice("data", "format", self.format, EVAL_FORMATS)
        if not is_int(self.synthetic_size) or self.synthetic_size < 2:
            raise ConfigError(f"data.synthetic_size={self.synthetic_size!r} must be an int >= 2")
        if self.limit is not None:
            positive("data", self, "limit", integer=True)
        if self.max_text_len is not None and (
            not is_int(self.max_text_len) or self.max_text_len < 2
        ):
            raise ConfigError(f"data.max_text_len={self.max_text_len!r} must be an int >= 2")


@dataclass
class MatchingEvalConfig:
    """Settings of the ITM matching evaluation (AUC, accuracy)."""

    batch_size: int = 64
    """pairs per cross-encoder call"""
    threshold: float = 0.5
    """accuracy threshold on (p_ti + p_it) / 2"""

    def __post_init__(self) -> None:
        positive("matching", self, "batch_size", integer=True)
        in_range("matching", self, "threshold")


@dataclass
class ZeroShotEvalConfig:
    """Settings of zero-shot classification."""

    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """Chinese prompt templates, each with one {} for the class name"""
    batch_size: int = 64
    """images per encoder call"""

    def __post_init__(self) -> None:
        positive("zeroshot", self, "batch_size", integer=True)
        check_templates(self.templates)


@dataclass
class EvalConfig:
    """What ``r2d2 eval <task>`` evaluates, on what, and where it writes."""

    task: str = "retrieval"
    """retrieval | matching | zeroshot (the subcommand overrides it)"""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """the split to evaluate"""
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    """two-stage retrieval settings"""
    matching: MatchingEvalConfig = field(default_factory=MatchingEvalConfig)
    """ITM matching settings"""
    zeroshot: ZeroShotEvalConfig = field(default_factory=ZeroShotEvalConfig)
    """zero-shot classification settings"""
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    """captioning: decoding, metric tokenisation, baselines (the training fields are unused)"""
    t2i: T2IConfig = field(default_factory=T2IConfig)
    """text-to-image: sampling (sampler, steps, guidance, seed) and scoring (eval_prompts,
    eval_candidates, evaluator, inception_weights); the generator's shape comes from the
    checkpoint, the training fields are unused"""
    out: str = "runs/eval"
    """run folder for the JSON, Markdown and plot"""
    device: str = "auto"
    """auto (cuda if available, per local rank) | cpu | cuda | cuda:N"""

    def __post_init__(self) -> None:
        choice("eval", "task", self.task, TASKS)
        if self.data.format not in TASK_FORMATS[self.task]:
            hint = {
                "icm": " (a matching set: r2d2 eval matching; its retrieval twin is icr)",
                "iqm": " (a matching set: r2d2 eval matching; its retrieval twin is iqr)",
                "icr": " (no labels: matching needs icm)",
                "iqr": " (no labels: matching needs iqm)",
            }
            raise ConfigError(
                f"data.format={self.data.format!r} cannot be evaluated by "
                f"`r2d2 eval {self.task}`{hint.get(self.data.format, '')}; "
                f"{self.task} reads {TASK_FORMATS[self.task]}"
            )


def load_eval_config(path: str | None, overrides: list[str], task: str) -> EvalConfig:
    """YAML file (optional) + ``--section.field=value`` overrides -> validated EvalConfig for
    ``task`` (the subcommand, which wins over a ``task:`` in the file)."""
    tree, _ = load_tree(path, overrides, EvalConfig)
    tree["task"] = task
    return build(EvalConfig, tree)
