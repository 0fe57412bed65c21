"""Caption sets: the AIC-ICC reader and the rules shared by every reader of caption lists.

``aic_icc``  AI Challenger image Chinese captioning (AIC-ICC): one JSON file whose top level is a
    list of ``{"image_id": "<hash>.jpg", "caption": ["...", ...], "url": ...}`` (five captions
    per image in the release; the captions carry stray spaces and newlines). One
    :class:`Record` per (image, caption); the image is ``image_root/<image_id>`` (default root:
    the annotation file's folder; the release keeps the images in
    ``caption_<split>_images_<date>/`` beside it, so set ``image_root`` to that folder) and the
    record's ``image_id`` is the file name without its image extension (``<hash>``, the id the
    AIC-ICC evaluation uses), so the captions of one image share it.

A list of captions (AIC-ICC, and a JSONL manifest line with ``"captions": [...]``) is read by
:func:`add_captions`: each caption is cleaned (:func:`clean_caption`) and skipped and counted when
it is not a string (``non_string_text``) or blank (``empty_text``); an empty list is one
``no_caption`` skip (an image, not a sample); a caption whose image file is missing is a
``missing_image`` skip (one per caption, so ``ReadResult.total`` counts samples). Corrupt image
bytes are found when the image is decoded (:mod:`r2d2.engine.data.loader`), as for every reader.

An AIC-ICC entry that is not an object with a non-empty string ``image_id`` and a ``caption`` that
is a list (or a single string) is one ``malformed_line`` skip; a file that is not JSON, not UTF-8
or whose top level is not a list raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

from r2d2.engine.data.ccmb import IMAGE_EXTS
from r2d2.engine.data.records import DataError, ReadResult, Record

# Whitespace between two characters of scripts written without spaces (CJK ideographs, kana,
# Hangul, full-width forms: U+2E80 on) is noise from the annotation tool, and would split a word
# for jieba: it is removed; any other run of whitespace (newlines included) becomes one space.
_WIDE = "\u2e80-\U0010ffff"
_WIDE_GAP = re.compile(rf"(?<=[{_WIDE}])\s+(?=[{_WIDE}])")
_SPACES = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """``text`` stripped, whitespace between CJK characters removed, other runs of whitespace
    (newlines, tabs, ideographic spaces) collapsed to one space."""
    return _SPACES.sub(" ", _WIDE_GAP.sub("", text)).strip()


def add_captions(
    records: list[Record],
    reasons: Counter,
    image: str,
    image_id: str,
    captions,
    check_images: bool = True,
    label: int | None = None,
) -> None:
    """Append one record per usable caption of ``captions`` (a list, or one string) of ``image``
    to ``records``; count the skipped ones in ``reasons`` (rules in the module docstring)."""
    if isinstance(captions, str):
        captions = [captions]
    if not captions:
        reasons["no_caption"] += 1
        return
    exists = None  # the image is looked up once, and only if some caption is usable
    for caption in captions:
        if not isinstance(caption, str):
            reasons["non_string_text"] += 1
            continue
        text = clean_caption(caption)
        if not text:
            reasons["empty_text"] += 1
            continue
        if exists is None:
            exists = not check_images or os.path.isfile(image)
        if not exists:
            reasons["missing_image"] += 1
            continue
        records.append(Record(image=image, text=text, image_id=image_id, label=label))


def _load_json(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM from Windows editors
            return json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None


def read_aic_icc(path: str, image_root: str | None = None, check_images: bool = True) -> ReadResult:
    """AIC-ICC caption annotations -> one record per (image, caption); see the module docstring.

    ``check_images`` False skips the per-image file check (missing files then fail at load time
    instead of being counted here)."""
    data = _load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        raise DataError(
            f"{path}: a COCO-style caption file (a dict with 'annotations'), such as the AIC-ICC "
            "evaluation kit's reference file; data.format aic_icc reads the release's "
            "caption_<split>_annotations_<date>.json, a JSON list of "
            '{"image_id": ..., "caption": [...]} objects'
        )
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected the AIC-ICC layout, a JSON list of "
            f'{{"image_id": ..., "caption": [...]}} objects; the top level is a '
            f"{type(data).__name__}"
        )
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    records: list[Record] = []
    reasons: Counter = Counter()
    for entry in data:
        name = entry.get("image_id") if isinstance(entry, dict) else None
        captions = entry.get("caption", []) if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip() or not isinstance(captions, (list, str)):
            reasons["malformed_line"] += 1
            continue
        name = name.strip()
        stem, ext = os.path.splitext(os.path.basename(name))
        image_id = stem if ext.lower() in IMAGE_EXTS else os.path.basename(name)
        image = os.path.join(root, name if ext else f"{name}.jpg")
        add_captions(records, reasons, image, image_id, captions, check_images)
    return ReadResult(records, sum(reasons.values()), reasons)
