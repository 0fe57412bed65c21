"""Readers for the CCMB downstream sets and the public Chinese benchmarks.

Every reader returns a :class:`ReadResult`: the usable records, how many samples were skipped and
why (``missing_image``, ``empty_text`` (blank or null), ``non_string_text`` (a number, list, ...),
``no_caption`` (COCO-CN), ``not_in_gallery`` / ``missing_gallery_image`` (MUGE), ``not_image``
(zero-shot folder)). A malformed line (invalid JSON, or bytes that are not UTF-8) is not a sample
but a broken file, so it raises ``ValueError("<file>:<line>: <what is wrong>")`` instead of being
skipped (the jsonl and tsv readers of ``r2d2.engine.data.readers`` skip and count such lines).

Layouts (the released ones; where a release is ambiguous the assumption is stated):

``icr`` / ``iqr``  CCMB retrieval, official names ``{long,short}_itr_<split>.json``: JSON lines
    ``{"image_path": ..., "text": ...}``. As in the official reader, the image is looked up under
    ``image_root`` by its base name (``image_root/<image_path>`` is tried first so a mirrored tree
    also works); ``image_id`` is the base name without extension.
``icm`` / ``iqm``  CCMB matching, ``{long,short}_itm_<split>.json``: the same plus ``"label"`` (0/1).
``flickr30k_cna`` / ``flickr30k_cn``  lines ``<image_id>#<n><TAB><caption>``; the image is
    ``<image_id>.jpg``. The key may carry extra ``#`` fields or a ``.jpg`` suffix
    (``1000092795.jpg#zhb#0``, the Flickr-CN style) and may be separated by a space instead of a TAB.
``coco_cn``  ``path`` is the split's id list (``coco-cn_test.txt``: one ``COCO_val2014_...`` id per
    line); the captions file (default ``imageid.human-written-caption.txt`` next to it, lines
    ``<image_id>#<n><TAB><caption>``) gives the Chinese sentences. Images are
    ``image_root/<id>.jpg`` or, in the COCO tree, ``image_root/<train2014|val2014>/<id>.jpg``.
``muge``  ``<split>_queries.jsonl`` lines ``{"query_id", "query_text", "item_ids": [...]}``; one
    record per (query, item) pair, image ``image_root/<item_id>.jpg``. The release ships images as
    base64 in ``<split>_imgs.tsv``; :func:`unpack_base64_tsv` writes them out as files once. The
    official protocol ranks every query against the split's whole image pool, so the result
    (:class:`MugeRead`) also carries ``gallery``: every image of ``gallery=`` (that TSV, or a
    folder of unpacked images; :func:`default_muge_gallery` finds the TSV beside the queries).
    Without ``gallery=`` there is no pool (training needs none, and scanning a multi-GB TSV for
    its ids is not free).
``aic_icc``  AI Challenger image Chinese captioning: a JSON list of ``{"image_id": "<hash>.jpg",
    "caption": [...]}``; one record per (image, caption), read by
    :func:`r2d2.engine.data.captions.read_aic_icc` (layout and skip rules there).
``zeroshot``  an ImageFolder tree ``root/<class>/*.jpg`` or a list file ``<path><TAB><label>`` with
    a class-names file (one name per line, label = 0-based line number, or the name itself).
    ``text`` holds the class name and ``label`` the class index.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from r2d2.engine.data.records import ReadResult, Record

RETRIEVAL_FORMATS = ("icr", "iqr", "flickr30k_cna", "flickr30k_cn", "coco_cn", "muge", "aic_icc")
"""image-text pairs: retrieval evaluation, retrieval fine-tuning"""
CAPTION_FORMATS = ("aic_icc", "coco_cn", "flickr30k_cn", "flickr30k_cna")
"""human-written captions, several per image: caption training and evaluation (the evaluation
groups their records by ``image_id``: ``r2d2.engine.tasks.caption.references``); all of them are
also retrieval formats"""
MATCHING_FORMATS = ("icm", "iqm")
"""labelled pairs (label 1 = match): matching evaluation and fine-tuning"""
CLASSIFICATION_FORMATS = ("zeroshot",)
"""images with a class label: zero-shot classification only"""
FORMATS = RETRIEVAL_FORMATS + MATCHING_FORMATS + CLASSIFICATION_FORMATS
"""every name :func:`read_ccmb` accepts (``data.format: ccmb_<name>`` in the training config)"""
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


class _Collector:
    """Accumulates records; skips (and counts) samples with no text or no image file."""

    def __init__(self, check_images: bool) -> None:
        self.records: list[Record] = []
        self.reasons: Counter = Counter()
        self.check_images = check_images

    def add(self, image: str | None, text, image_id: str, label: int | None = None) -> None:
        if text is not None and not isinstance(text, str):  # a number or list in the JSON: a bad
            self.reasons["non_string_text"] += 1  # sample, not an empty caption
            return
        if not text or not text.strip():
            self.reasons["empty_text"] += 1
            return
        if image is None or (self.check_images and not os.path.isfile(image)):
            self.reasons["missing_image"] += 1
            return
        self.records.append(Record(image=image, text=text.strip(), image_id=image_id, label=label))

    def result(self) -> ReadResult:
        return ReadResult(
            records=self.records, skipped=sum(self.reasons.values()), reasons=self.reasons
        )


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) for non-blank lines; a clear error if unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path, "rb") as f:  # decoded line by line: a bad byte is named by its line
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM from Windows editors
                raw = raw[3:]
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:  # malformed like broken JSON: the same error
                raise ValueError(
                    f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})"
                ) from None
            if line:
                yield n, line


def _json_line(path: str, n: int, line: str, required: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"{path}:{n}: missing field(s) {missing}; has {sorted(obj)}")
    return obj


def _root(path: str, image_root: str | None) -> str:
    return image_root if image_root is not None else os.path.dirname(os.path.abspath(path))


def _find_image(root: str, rel: str) -> str | None:
    """``root/rel`` if it exists, else ``root/basename(rel)`` (the official readers keep only the
    base name of ``image_path``), else None."""
    for cand in (os.path.join(root, rel), os.path.join(root, os.path.basename(rel))):
        if os.path.isfile(cand):
            return cand
    return None


def _parse_label(path: str, n: int, value) -> int:
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise ValueError(f"{path}:{n}: label must be 0 or 1, got {value!r}")


def read_jsonl_pairs(
    path: str, image_root: str | None = None, with_label: bool = False, check_images: bool = True
) -> ReadResult:
    """ICR/IQR (``with_label=False``) and ICM/IQM (``with_label=True``) JSON lines."""
    root = _root(path, image_root)
    out = _Collector(check_images)
    required = ("image_path", "text", "label") if with_label else ("image_path", "text")
    for n, line in _lines(path):
        obj = _json_line(path, n, line, required)
        rel = obj["image_path"]
        if not isinstance(rel, str) or not rel.strip():
            raise ValueError(f"{path}:{n}: image_path must be a non-empty string, got {rel!r}")
        label = _parse_label(path, n, obj["label"]) if with_label else None
        image = (
            _find_image(root, rel) if check_images else os.path.join(root, os.path.basename(rel))
        )
        out.add(image, obj["text"], Path(rel).stem, label)
    return out.result()


def _split_keyed_caption(path: str, n: int, line: str) -> tuple[str, str]:
    """``<image_id>#...<TAB|space><caption>`` -> (image_id, caption)."""
    if "\t" in line:
        key, _, caption = line.partition("\t")
    else:
        key, _, caption = line.partition(" ")
    key = key.strip()
    if "#" not in key:
        raise ValueError(f"{path}:{n}: expected '<image_id>#<n><TAB><caption>', got {line[:60]!r}")
    image_id = key.split("#", 1)[0]
    if not image_id:
        raise ValueError(f"{path}:{n}: empty image id in {key!r}")
    if image_id.lower().endswith(IMAGE_EXTS):
        image_id = os.path.splitext(image_id)[0]
    return image_id, caption.strip()


def read_flickr_tsv(
    path: str, image_root: str | None = None, check_images: bool = True
) -> ReadResult:
    """Flickr30k-CNA / Flickr30k-CN caption lines; image ``<image_root>/<image_id>.jpg``."""
    root = _root(path, image_root)
    out = _Collector(check_images)
    for n, line in _lines(path):
        image_id, caption = _split_keyed_caption(path, n, line)
        out.add(os.path.join(root, f"{image_id}.jpg"), caption, image_id)
    return out.result()


def _coco_image(root: str, image_id: str) -> str | None:
    cands = [os.path.join(root, f"{image_id}.jpg")]
    parts = image_id.split("_")  # COCO_val2014_000000290951 -> val2014/
    if len(parts) >= 3:
        cands.append(os.path.join(root, parts[1], f"{image_id}.jpg"))
    return next((c for c in cands if os.path.isfile(c)), None)


def read_coco_cn(
    path: str, image_root: str | None = None, captions: str | None = None, check_images: bool = True
) -> ReadResult:
    """COCO-CN: split id list ``path`` + captions file (see the module docstring)."""
    root = _root(path, image_root)
    captions = captions or os.path.join(
        os.path.dirname(os.path.abspath(path)), "imageid.human-written-caption.txt"
    )
    ids: list[str] = []
    for n, line in _lines(path):
        if len(line.split()) != 1:
            raise ValueError(f"{path}:{n}: expected one image id per line, got {line[:60]!r}")
        ids.append(line)
    by_image: dict[str, list[str]] = {}
    for n, line in _lines(captions):
        image_id, caption = _split_keyed_caption(captions, n, line)
        by_image.setdefault(image_id, []).append(caption)
    out = _Collector(check_images)
    for image_id in ids:
        if image_id not in by_image:
            out.reasons["no_caption"] += 1
            continue
        image = (
            _coco_image(root, image_id) if check_images else os.path.join(root, f"{image_id}.jpg")
        )
        for caption in by_image[image_id]:
            out.add(image, caption, image_id)
    return out.result()


@dataclass
class MugeRead(ReadResult):
    """:func:`read_muge`'s result: the (query, item) records plus the split's image pool."""

    gallery: list[tuple[str, str]] | None = None
    """``(image path, image_id)`` of every image of the split's pool, in file order; None when no
    pool was given or found (training needs none; the retrieval evaluation does)."""
    gallery_source: str | None = None


def _tsv_ids(tsv: str) -> list[str]:
    """Image ids of a ``<image_id><TAB><base64>`` file (the payloads are not decoded)."""
    ids = []
    for n, line in _lines(tsv):
        image_id, sep, _ = line.partition("\t")
        if not sep or not image_id.strip():
            raise ValueError(f"{tsv}:{n}: expected '<image_id><TAB><base64>'")
        ids.append(image_id.strip())
    return ids


def default_muge_gallery(path: str) -> str | None:
    """``<split>_imgs.tsv`` beside ``<split>_queries.jsonl`` if it exists."""
    name = os.path.basename(path)
    if "_queries" not in name:
        return None
    cand = os.path.join(
        os.path.dirname(os.path.abspath(path)), name.split("_queries")[0] + "_imgs.tsv"
    )
    return cand if os.path.isfile(cand) else None


def read_muge(
    path: str, image_root: str | None = None, check_images: bool = True, gallery: str | None = None
) -> MugeRead:
    """MUGE queries: one record per (query, correct item); all records of a query share its text.

    ``gallery``: the split's image pool, ``<split>_imgs.tsv`` (ids read, payloads ignored) or a
    folder of images (``<id>.<ext>``); None: no pool. With a pool, an item outside it is skipped
    as ``not_in_gallery``, and a pool image without its file under ``image_root`` is left out of
    the pool and counted as ``missing_gallery_image``."""
    root = _root(path, image_root)
    out = _Collector(check_images)
    pool: dict[str, str] | None = None
    in_pool: set[str] = set()
    if gallery is not None:
        if os.path.isdir(gallery):  # the unpacked pool itself: its files are the images
            files = sorted(f for f in os.listdir(gallery) if f.lower().endswith(IMAGE_EXTS))
            if not files:
                raise ValueError(f"MUGE gallery folder {gallery} holds no images")
            ids = [os.path.splitext(f)[0] for f in files]
            paths = [os.path.join(gallery, f) for f in files]
        else:
            if not os.path.isfile(gallery):
                raise FileNotFoundError(
                    f"MUGE gallery (the split's image pool) not found: {gallery}"
                )
            ids = _tsv_ids(gallery)
            paths = [os.path.join(root, f"{i}.jpg") for i in ids]
        if len(set(ids)) != len(ids):
            dup = sorted(k for k, v in Counter(ids).items() if v > 1)
            raise ValueError(f"{gallery}: duplicate image ids {dup[:5]}")
        in_pool, pool = set(ids), {}
        for image_id, image in zip(ids, paths):
            if check_images and not os.path.isfile(image):
                out.reasons["missing_gallery_image"] += 1
                continue
            pool[image_id] = image
    for n, line in _lines(path):
        obj = _json_line(path, n, line, ("query_id", "query_text", "item_ids"))
        items = obj["item_ids"]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}:{n}: item_ids must be a non-empty list, got {items!r}")
        for item in items:
            if isinstance(item, (dict, list, bool)) or item is None:
                raise ValueError(f"{path}:{n}: item ids must be numbers or strings, got {item!r}")
            item = str(item)
            if pool is not None and item not in pool:
                # outside the split's pool, or in it but without its image file
                out.reasons["not_in_gallery" if item not in in_pool else "missing_image"] += 1
                continue
            image = pool[item] if pool is not None else os.path.join(root, f"{item}.jpg")
            out.add(image, obj["query_text"], item)
    res = out.result()
    return MugeRead(
        res.records,
        res.skipped,
        res.reasons,
        gallery=None if pool is None else [(p, i) for i, p in pool.items()],
        gallery_source=gallery,
    )


def unpack_base64_tsv(tsv: str, out_dir: str) -> tuple[int, Counter]:
    """Write MUGE's ``<image_id><TAB><base64>`` lines as ``out_dir/<image_id>.jpg``.

    Returns (files written, Counter of skip reasons); existing files are kept (re-runs are cheap)."""
    os.makedirs(out_dir, exist_ok=True)
    written, reasons = 0, Counter()
    for n, line in _lines(tsv):
        image_id, sep, payload = line.partition("\t")
        if not sep or not image_id:
            raise ValueError(f"{tsv}:{n}: expected '<image_id><TAB><base64>'")
        dst = os.path.join(out_dir, f"{image_id}.jpg")
        if os.path.exists(dst):
            continue
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            reasons["bad_base64"] += 1
            continue
        with open(dst, "wb") as f:
            f.write(data)
        written += 1
    return written, reasons


def read_classnames(path: str) -> list[str]:
    """One class name per line; line ``n`` (0-based) is class ``n``, so a blank line inside the
    file (which would shift every later label) is an error; trailing blank lines are ignored."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-names file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        raw = [line.strip() for line in f]
    while raw and not raw[-1]:
        raw.pop()
    if not raw:
        raise ValueError(f"{path}: no class names")
    blank = [n for n, name in enumerate(raw, 1) if not name]
    if blank:
        raise ValueError(f"{path}:{blank[0]}: blank class name (line n is class n - 1; remove it)")
    if len(set(raw)) != len(raw):
        dup = sorted(k for k, v in Counter(raw).items() if v > 1)
        raise ValueError(f"{path}: duplicate class names {dup[:5]}")
    return raw


def read_zeroshot(
    path: str,
    image_root: str | None = None,
    classnames: str | None = None,
    check_images: bool = True,
) -> tuple[ReadResult, list[str]]:
    """Zero-shot classification set -> (records with ``label`` = class index, class names).

    ``path`` a directory: ImageFolder layout, classes are the sorted sub-directory names unless
    ``classnames`` gives the (Chinese) display names, one per sub-directory in sorted order.
    ``path`` a file: ``<image path><TAB><label>`` lines, ``classnames`` required."""
    out = _Collector(check_images)
    if os.path.isdir(path):
        dirs = sorted(d.name for d in os.scandir(path) if d.is_dir())
        if not dirs:
            raise ValueError(f"{path}: no class sub-directories")
        names = read_classnames(classnames) if classnames else dirs
        if len(names) != len(dirs):
            raise ValueError(
                f"{classnames}: {len(names)} class names for {len(dirs)} class folders"
            )
        for label, d in enumerate(dirs):
            for f in sorted(os.listdir(os.path.join(path, d))):
                full = os.path.join(path, d, f)
                if f.lower().endswith(IMAGE_EXTS):
                    out.add(full, names[label], f"{d}/{f}", label)
                elif os.path.isfile(full):  # notes, thumbnails DBs, ...: counted, not read
                    out.reasons["not_image"] += 1
        return out.result(), names
    if classnames is None:
        raise ValueError("zeroshot list file needs a class-names file (classnames=...)")
    names = read_classnames(classnames)
    index = {name: i for i, name in enumerate(names)}
    root = _root(path, image_root)
    for n, line in _lines(path):
        rel, sep, lab = line.rpartition("\t")
        if not sep or not rel:
            raise ValueError(f"{path}:{n}: expected '<image path><TAB><label>', got {line[:60]!r}")
        lab = lab.strip()
        if lab.lstrip("-").isdigit():
            label = int(lab)
            if not 0 <= label < len(names):
                raise ValueError(f"{path}:{n}: label {label} out of range [0, {len(names)})")
        elif lab in index:
            label = index[lab]
        else:
            raise ValueError(f"{path}:{n}: unknown class {lab!r} (not in {classnames})")
        out.add(os.path.join(root, rel), names[label], rel, label)
    return out.result(), names


def read_ccmb(
    format: str, path: str, image_root: str | None = None, *, check_images: bool = True, **options
) -> ReadResult:
    """Read one downstream annotation file (see the module docstring for each ``format``).

    ``options``: ``captions=`` for ``coco_cn``, ``gallery=`` for ``muge``, ``classnames=`` for
    ``zeroshot``. ``check_images``
    False skips the per-sample file check (for huge sets on slow storage; missing files then fail
    at load time instead of being counted here)."""
    fmt = format.lower()
    allowed = {"coco_cn": {"captions"}, "muge": {"gallery"}, "zeroshot": {"classnames"}}.get(
        fmt, set()
    )
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"read_ccmb({fmt!r}): unexpected option(s) {sorted(unknown)}")
    if fmt in ("icr", "iqr"):
        return read_jsonl_pairs(path, image_root, with_label=False, check_images=check_images)
    if fmt in ("icm", "iqm"):
        return read_jsonl_pairs(path, image_root, with_label=True, check_images=check_images)
    if fmt in ("flickr30k_cna", "flickr30k_cn"):
        return read_flickr_tsv(path, image_root, check_images=check_images)
    if fmt == "coco_cn":
        return read_coco_cn(path, image_root, check_images=check_images, **options)
    if fmt == "muge":
        return read_muge(path, image_root, check_images=check_images, **options)
    if fmt == "zeroshot":
        return read_zeroshot(path, image_root, check_images=check_images, **options)[0]
    if fmt == "aic_icc":
        from r2d2.engine.data.captions import read_aic_icc  # it imports this module

        return read_aic_icc(path, image_root, check_images=check_images)
    raise ValueError(f"unknown CCMB format {format!r}; expected one of {FORMATS}")
