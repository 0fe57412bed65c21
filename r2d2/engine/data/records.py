"""The record types every reader returns.

A reader turns an annotation file (or shard list) into :class:`Record` rows and reports what it had
to skip. Skipping is never silent: ``ReadResult.reasons`` counts each skip by cause
(``missing_image``, ``empty_text``, ``corrupt_image``, ...) so the trainer can log it and stop when
the skip rate passes ``data.max_skip_rate``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from r2d2.engine.errors import RunError, UsageError

SKIP_REASONS = (
    "corrupt_image",
    "missing_image",
    "empty_text",
    "non_string_text",
    "malformed_line",
    "no_caption",
    "not_in_gallery",
    "missing_gallery_image",
    "not_image",
    "truncated_shard",
)
"""The skip reasons the readers and the loader report; the trainer sums them over ranks in this
order (anything else is summed as ``other``)."""

SHARD_EVENTS = ("truncated_shard",)
"""Reasons that count damaged *shards*, not samples: a tar shard that ends mid-file (truncated,
or damaged so that tar cannot read on) loses every sample after the damage, a number nobody
can know. They travel with the skip counts (the same per-rank sums) but are no part of
``skipped`` and ``max_skip_rate``; the log row reports them as ``truncated_shards``."""


class DataError(ValueError, RunError):
    """The training data cannot be read at all (a broken annotation file, no usable sample, a
    stream that holds nothing): unlike a bad sample, which is skipped and counted, this stops the
    run with one clear line (exit status 1)."""


class MissingDataError(DataError, UsageError):
    """A data file or shard the config names does not exist: found before the run starts, a
    usage error (exit status 2)."""


@dataclass
class Record:
    """One image-text sample."""

    image: str
    """Path of the image file (or, for stream formats and the synthetic set, a URL-less key)."""
    text: str
    """The caption / query, stripped; never empty in a returned record."""
    image_id: str
    """Identifier of the image; records sharing it are positives of each other in retrieval."""
    label: int | None = None
    """Matching label (0/1) or class index (zero-shot); None for plain image-text pairs."""


@dataclass
class ReadResult:
    """What a reader returns: the usable records and an account of the skipped ones."""

    records: list[Record]
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not isinstance(self.reasons, Counter):
            self.reasons = Counter(self.reasons)

    @property
    def total(self) -> int:
        """Samples seen: usable + skipped."""
        return len(self.records) + self.skipped

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.total if self.total else 0.0

    def merge(self, other: ReadResult) -> ReadResult:
        """The union of two reads (e.g. several annotation files of one set)."""
        return ReadResult(
            self.records + other.records, self.skipped + other.skipped, self.reasons + other.reasons
        )
