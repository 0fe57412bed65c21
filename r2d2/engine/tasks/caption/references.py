"""Reference captions of an evaluation split, grouped by image.

Every caption reader (``aic_icc``, ``coco_cn``, ``flickr30k_cn(a)``, a JSONL or TSV manifest)
returns one :class:`~r2d2.engine.data.records.Record` per (image, caption); the caption metrics
(:mod:`.metrics`) want, per image, one hypothesis and the list of its references. The image's
``image_id`` is the key of both.
"""

from __future__ import annotations

from collections.abc import Iterable

from r2d2.engine.data.records import Record


def group_references(
    records: Iterable[Record],
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``(images, refs)``: ``images[image_id]`` = the image's file, ``refs[image_id]`` = its
    captions in file order (duplicates kept: a caption written twice counts twice, as in the
    COCO evaluation). Both dicts list the images in the order of their first record.

    Records of one ``image_id`` must name the same file: two different files under one id (a
    JSONL manifest whose default id, the file's base name, repeats across folders) would merge
    two images' references, so that is a ``ValueError`` naming the id and both files. Labels are
    not looked at: pass caption sets, not matching sets with deliberate mismatches."""
    images: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    for r in records:
        seen = images.setdefault(r.image_id, r.image)
        if seen != r.image:
            raise ValueError(
                f"image_id {r.image_id!r} names two images, {seen} and {r.image}: give each "
                "image its own image_id"
            )
        refs.setdefault(r.image_id, []).append(r.text)
    return images, refs
