"""Annotation readers for the formats users have, each returning a :class:`ReadResult`.

``jsonl``  one JSON object per line: ``image_path`` or ``image``, ``text`` or ``caption``, optional
           ``image_id`` (default: the image file name) and ``label``. A line may instead carry
           several captions of its image, ``"captions": [...]`` (or a list as ``caption``): one
           record each, skipped and counted as in ``r2d2.engine.data.captions.add_captions``
           (``non_string_text``, ``empty_text``, ``no_caption`` for an empty list).
``tsv``    ``<image_id>\\t<caption>`` per line; the image is ``image_root/<image_id>`` (``.jpg`` is
           appended when ``image_id`` has no extension).
``aic_icc`` AIC-ICC caption JSON (``r2d2.engine.data.captions.read_aic_icc``); the same as
           ``ccmb_aic_icc``.
``ccmb_*`` the CCMB / public-benchmark layouts, read by ``r2d2.engine.data.ccmb.read_ccmb``.

A line that cannot be parsed (invalid JSON, no TAB, or bytes that are not UTF-8), an empty caption
or an image file that does not exist is skipped and counted by reason (``malformed_line``,
``empty_text``, ``missing_image``); the other lines of the file are read as usual. Corrupt image bytes are
found when the image is decoded (``r2d2.engine.data.loader``). WebDataset shards are streamed, not
read up front: see ``r2d2.engine.data.loader.ShardStream``.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from r2d2.engine.data.records import ReadResult, Record


def _lines(path: str, reasons: Counter):
    """The file's lines as text. Each line is decoded on its own, so a line that is not valid
    UTF-8 is one ``malformed_line`` skip, like a line of broken JSON, instead of refusing the
    whole file; a BOM at the start is tolerated."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                reasons["malformed_line"] += 1


class _Acc:
    def __init__(self, check_images: bool) -> None:
        self.records: list[Record] = []
        self.reasons: Counter = Counter()
        self.check_images = check_images

    def add(self, image: str, text, image_id: str, label=None) -> None:
        if not isinstance(text, str) or not text.strip():
            self.reasons["empty_text"] += 1
        elif self.check_images and not os.path.isfile(image):
            self.reasons["missing_image"] += 1
        else:
            self.records.append(
                Record(image=image, text=text.strip(), image_id=str(image_id), label=label)
            )

    def result(self) -> ReadResult:
        return ReadResult(self.records, sum(self.reasons.values()), self.reasons)


def _root(path: str, image_root: str | None) -> str:
    return image_root if image_root is not None else os.path.dirname(os.path.abspath(path))


def read_jsonl(path: str, image_root: str | None = None, check_images: bool = True) -> ReadResult:
    root = _root(path, image_root)
    acc = _Acc(check_images)
    for line in _lines(path, acc.reasons):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            image = obj.get("image_path", obj.get("image"))
            text = obj.get("text", obj.get("caption", obj.get("captions")))
            if not isinstance(image, str) or not image:
                raise ValueError("no image_path/image")
            label = obj.get("label")
            label = None if label is None else int(label)
        except (ValueError, AttributeError, TypeError):
            acc.reasons["malformed_line"] += 1
            continue
        full = image if os.path.isabs(image) else os.path.join(root, image)
        image_id = obj.get("image_id", os.path.basename(image))
        if isinstance(text, list):  # the captions of one image: a record each
            from r2d2.engine.data.captions import add_captions

            add_captions(
                acc.records, acc.reasons, full, str(image_id), text, acc.check_images, label
            )
        else:
            acc.add(full, text, image_id, label)
    return acc.result()


def read_tsv(path: str, image_root: str | None = None, check_images: bool = True) -> ReadResult:
    root = _root(path, image_root)
    acc = _Acc(check_images)
    for line in _lines(path, acc.reasons):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        image_id, sep, text = line.partition("\t")
        if not sep or not image_id.strip():
            acc.reasons["malformed_line"] += 1
            continue
        name = image_id.strip()
        if not os.path.splitext(name)[1]:
            name += ".jpg"
        acc.add(os.path.join(root, name), text, image_id.strip())
    return acc.result()


def read_records(format: str, path: str, image_root: str | None = None) -> ReadResult:
    """Dispatch on ``data.format`` (``synthetic`` and ``webdataset`` are handled by the loader)."""
    if format == "jsonl":
        return read_jsonl(path, image_root)
    if format == "tsv":
        return read_tsv(path, image_root)
    if format == "aic_icc":
        format = "ccmb_aic_icc"
    if format.startswith("ccmb_"):
        from r2d2.engine.data import ccmb  # lazy: owned and evolved separately

        return ccmb.read_ccmb(format[len("ccmb_") :], path, image_root)
    raise ValueError(
        f"data.format={format!r} has no file reader; expected jsonl, tsv, aic_icc or ccmb_<name>"
    )
