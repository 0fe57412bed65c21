"""CCMB / public-benchmark readers on small files written by the test."""

import base64
import io
import json
import os

import pytest
from PIL import Image

from r2d2.engine.data.ccmb import read_ccmb, read_zeroshot, unpack_base64_tsv


def _jpg(path) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return buf.getvalue()


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_icr_reads_skips_and_counts(tmp_path):
    imgs = tmp_path / "images"
    _jpg(imgs / "a.jpg")
    _jpg(imgs / "b.jpg")
    ann = _write(
        tmp_path / "long_itr_val.json",
        [
            json.dumps({"image_path": "/remote/dir/a.jpg", "text": "一只猫"}, ensure_ascii=False),
            json.dumps({"image_path": "b.jpg", "text": " 一只狗 "}, ensure_ascii=False),
            "",  # blank lines are ignored, not errors
            json.dumps({"image_path": "gone.jpg", "text": "不存在"}, ensure_ascii=False),
            json.dumps({"image_path": "a.jpg", "text": "   "}, ensure_ascii=False),
        ],
    )
    res = read_ccmb("icr", ann, str(imgs))
    assert [(r.image_id, r.text, r.label) for r in res.records] == [
        ("a", "一只猫", None),
        ("b", "一只狗", None),
    ]
    assert res.records[0].image == str(imgs / "a.jpg")
    assert res.skipped == 2 and res.reasons == {"missing_image": 1, "empty_text": 1}


def test_icr_malformed_line_names_file_and_line(tmp_path):
    ann = _write(
        tmp_path / "x.json", [json.dumps({"image_path": "a.jpg", "text": "t"}), "{not json"]
    )
    with pytest.raises(ValueError, match=r"x\.json:2: not valid JSON"):
        read_ccmb("iqr", ann, str(tmp_path))
    ann = _write(tmp_path / "y.json", [json.dumps({"image": "a.jpg", "text": "t"})])
    with pytest.raises(ValueError, match=r"y\.json:1: missing field\(s\) \['image_path'\]"):
        read_ccmb("icr", ann, str(tmp_path))


def test_icm_labels(tmp_path):
    _jpg(tmp_path / "p.jpg")
    ann = _write(
        tmp_path / "long_itm_val.json",
        [
            json.dumps({"image_path": "p.jpg", "text": "红色", "label": 1}, ensure_ascii=False),
            json.dumps({"image_path": "p.jpg", "text": "蓝色", "label": "0"}, ensure_ascii=False),
        ],
    )
    res = read_ccmb("icm", ann)  # image_root defaults to the annotation's folder
    assert [r.label for r in res.records] == [1, 0]
    bad = _write(
        tmp_path / "bad.json", [json.dumps({"image_path": "p.jpg", "text": "x", "label": 2})]
    )
    with pytest.raises(ValueError, match=r"bad\.json:1: label must be 0 or 1"):
        read_ccmb("iqm", bad)
    nolabel = _write(tmp_path / "nl.json", [json.dumps({"image_path": "p.jpg", "text": "x"})])
    with pytest.raises(ValueError, match="label"):
        read_ccmb("icm", nolabel)


def test_flickr_tsv_variants(tmp_path):
    _jpg(tmp_path / "img" / "1000092795.jpg")
    _jpg(tmp_path / "img" / "10002456.jpg")
    ann = _write(
        tmp_path / "flickr30k_cna_test.txt",
        [
            "1000092795#0\t两个年轻人在院子里",
            "1000092795#1\t两个男人",
            "10002456.jpg#zhb#0 几个工人",  # Flickr-CN style key, space separated
            "99999#0\t没有图片",
            "10002456#1\t",  # empty caption
        ],
    )
    res = read_ccmb("flickr30k_cna", ann, str(tmp_path / "img"))
    assert [(r.image_id, r.text) for r in res.records] == [
        ("1000092795", "两个年轻人在院子里"),
        ("1000092795", "两个男人"),
        ("10002456", "几个工人"),
    ]
    assert res.reasons == {"missing_image": 1, "empty_text": 1}
    bad = _write(tmp_path / "bad.txt", ["1000092795#0\tok", "no-hash-key\tcaption"])
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected '<image_id>#<n>"):
        read_ccmb("flickr30k_cn", bad, str(tmp_path / "img"))


def test_coco_cn(tmp_path):
    _jpg(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000001.jpg")
    _jpg(tmp_path / "coco" / "COCO_train2014_000000000002.jpg")
    split = _write(
        tmp_path / "coco-cn_test.txt",
        ["COCO_val2014_000000000001", "COCO_train2014_000000000002", "COCO_val2014_000000000003"],
    )
    _write(
        tmp_path / "imageid.human-written-caption.txt",
        [
            "COCO_val2014_000000000001#0\t一辆公交车",
            "COCO_val2014_000000000001#1\t街上的车",
            "COCO_train2014_000000000002#0\t一个男人",
            "COCO_val2014_000000000099#0\t不在本划分",
        ],
    )
    res = read_ccmb("coco_cn", split, str(tmp_path / "coco"))
    assert [r.image_id for r in res.records] == ["COCO_val2014_000000000001"] * 2 + [
        "COCO_train2014_000000000002"
    ]
    assert res.reasons == {"no_caption": 1} and res.skipped == 1
    bad = _write(tmp_path / "bad_split.txt", ["COCO_val2014_000000000001 extra"])
    with pytest.raises(ValueError, match=r"bad_split\.txt:1"):
        read_ccmb("coco_cn", bad, str(tmp_path / "coco"))


def test_muge_and_base64_unpack(tmp_path):
    payload = base64.b64encode(_jpg(tmp_path / "src.jpg")).decode()
    tsv = _write(
        tmp_path / "valid_imgs.tsv", [f"101\t{payload}", f"102\t{payload}", "103\t!!notbase64!!"]
    )
    written, reasons = unpack_base64_tsv(tsv, str(tmp_path / "imgs"))
    assert written == 2 and reasons == {"bad_base64": 1}
    with Image.open(tmp_path / "imgs" / "101.jpg") as im:
        assert im.size == (4, 4)
    q = _write(
        tmp_path / "valid_queries.jsonl",
        [
            json.dumps(
                {"query_id": 1, "query_text": "红色连衣裙", "item_ids": [101, 102]},
                ensure_ascii=False,
            ),
            json.dumps(
                {"query_id": 2, "query_text": "运动鞋", "item_ids": [103]}, ensure_ascii=False
            ),
        ],
    )
    res = read_ccmb("muge", q, str(tmp_path / "imgs"))
    assert [(r.image_id, r.text) for r in res.records] == [
        ("101", "红色连衣裙"),
        ("102", "红色连衣裙"),
    ]
    assert res.reasons == {"missing_image": 1}
    bad = _write(
        tmp_path / "bad.jsonl", [json.dumps({"query_id": 1, "query_text": "x", "item_ids": []})]
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: item_ids must be a non-empty list"):
        read_ccmb("muge", bad, str(tmp_path))


def test_zeroshot_folder_and_list(tmp_path):
    root = tmp_path / "cls"
    _jpg(root / "cat" / "1.jpg")
    _jpg(root / "cat" / "2.jpg")
    _jpg(root / "dog" / "1.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")
    names = _write(tmp_path / "names.txt", ["猫", "狗"])
    res, classes = read_zeroshot(str(root), classnames=names)
    assert classes == ["猫", "狗"]
    assert [(r.label, r.text) for r in res.records] == [(0, "猫"), (0, "猫"), (1, "狗")]
    res, classes = read_zeroshot(str(root))
    assert classes == ["cat", "dog"] and len(res.records) == 3

    lst = _write(
        tmp_path / "list.txt", ["cls/cat/1.jpg\t1", "cls/dog/1.jpg\t猫", "cls/dog/9.jpg\t0"]
    )
    res = read_ccmb("zeroshot", lst, str(tmp_path), classnames=names)
    assert [(r.label, r.text) for r in res.records] == [(1, "狗"), (0, "猫")]
    assert res.reasons == {"missing_image": 1}
    bad = _write(tmp_path / "bad.txt", ["cls/cat/1.jpg\t5"])
    with pytest.raises(ValueError, match=r"bad\.txt:1: label 5 out of range"):
        read_zeroshot(bad, str(tmp_path), classnames=names)
    with pytest.raises(ValueError, match="class-names file"):
        read_zeroshot(lst, str(tmp_path))
    with pytest.raises(ValueError, match="1 class names for 2 class folders"):
        read_zeroshot(str(root), classnames=_write(tmp_path / "one.txt", ["猫"]))


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown CCMB format 'voc'"):
        read_ccmb("voc", str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_ccmb("icr", str(tmp_path / "absent.json"))
    with pytest.raises(TypeError, match="unexpected option"):
        read_ccmb("icr", str(tmp_path / "x"), classnames="n.txt")


def test_text_that_is_null_or_not_a_string_is_counted_by_its_own_reason(tmp_path):
    _jpg(tmp_path / "a.jpg")
    ann = _write(
        tmp_path / "long_itr_val.json",
        [
            json.dumps({"image_path": "a.jpg", "text": "猫"}, ensure_ascii=False),
            json.dumps({"image_path": "a.jpg", "text": None}),  # null: an empty caption
            json.dumps({"image_path": "a.jpg", "text": 42}),  # a number: a broken sample
            json.dumps({"image_path": "a.jpg", "text": ["猫"]}, ensure_ascii=False),
        ],
    )
    res = read_ccmb("icr", ann)
    assert [r.text for r in res.records] == ["猫"]
    assert res.reasons == {"empty_text": 1, "non_string_text": 2} and res.skipped == 3
    bad = _write(
        tmp_path / "bad.json", [json.dumps({"image_path": None, "text": "猫"}, ensure_ascii=False)]
    )
    with pytest.raises(ValueError, match=r"bad\.json:1: image_path must be a non-empty string"):
        read_ccmb("icr", bad)


def _muge_split(tmp_path, pool_ids, files):
    payload = base64.b64encode(_jpg(tmp_path / "src.jpg")).decode()
    tsv = _write(tmp_path / "valid_imgs.tsv", [f"{i}\t{payload}" for i in pool_ids])
    for i in files:
        _jpg(tmp_path / "imgs" / f"{i}.jpg")
    q = _write(
        tmp_path / "valid_queries.jsonl",
        [
            json.dumps(
                {"query_id": 1, "query_text": "红色连衣裙", "item_ids": [101, 102]},
                ensure_ascii=False,
            ),
            json.dumps(
                {"query_id": 2, "query_text": "运动鞋", "item_ids": [103, 555]}, ensure_ascii=False
            ),
            json.dumps({"query_id": 3, "query_text": None, "item_ids": [101]}),
            json.dumps({"query_id": 4, "query_text": 3.5, "item_ids": [101]}),
        ],
    )
    return q, tsv


def test_muge_gallery_is_the_whole_image_pool(tmp_path):
    from r2d2.engine.data.ccmb import default_muge_gallery

    # pool 101..106; 104's file is missing; query 2 names 555, which is not in the pool
    q, tsv = _muge_split(tmp_path, [101, 102, 103, 104, 105, 106], [101, 102, 103, 105, 106])
    assert (
        default_muge_gallery(q) == tsv and default_muge_gallery(str(tmp_path / "x.jsonl")) is None
    )
    res = read_ccmb("muge", q, str(tmp_path / "imgs"), gallery=tsv)
    assert [g[1] for g in res.gallery] == [
        "101",
        "102",
        "103",
        "105",
        "106",
    ]  # file order, 104 left out
    assert res.gallery[0][0] == str(tmp_path / "imgs" / "101.jpg")
    assert [(r.image_id, r.text) for r in res.records] == [
        ("101", "红色连衣裙"),
        ("102", "红色连衣裙"),
        ("103", "运动鞋"),
    ]
    # null query_text is an empty text (never the string "None"); a number has its own reason
    assert res.reasons == {
        "missing_gallery_image": 1,
        "not_in_gallery": 1,
        "empty_text": 1,
        "non_string_text": 1,
    }
    assert all(r.text != "None" for r in res.records)
    # a folder as the pool: its image files are the gallery
    res = read_ccmb("muge", q, str(tmp_path / "imgs"), gallery=str(tmp_path / "imgs"))
    assert [g[1] for g in res.gallery] == ["101", "102", "103", "105", "106"]
    assert res.reasons["not_in_gallery"] == 1
    # no pool asked for (training): no gallery, and nothing scanned
    assert read_ccmb("muge", q, str(tmp_path / "imgs")).gallery is None
    with pytest.raises(FileNotFoundError, match="image pool"):
        read_ccmb("muge", q, str(tmp_path / "imgs"), gallery=str(tmp_path / "absent.tsv"))
    dup = _write(tmp_path / "dup.tsv", ["101\tAAAA", "101\tAAAA"])
    with pytest.raises(ValueError, match="duplicate image ids"):
        read_ccmb("muge", q, str(tmp_path / "imgs"), gallery=dup)
    broken = _write(tmp_path / "broken.tsv", ["101 no tab here"])
    with pytest.raises(ValueError, match=r"broken\.tsv:1: expected '<image_id><TAB><base64>'"):
        read_ccmb("muge", q, str(tmp_path / "imgs"), gallery=broken)


def test_zeroshot_counts_non_images_and_rejects_blank_class_lines(tmp_path):
    root = tmp_path / "cls"
    _jpg(root / "a" / "1.jpg")
    _jpg(root / "b" / "1.png")
    (root / "a" / "Thumbs.db").write_bytes(b"x")
    res, _names = read_zeroshot(str(root))
    assert len(res.records) == 2 and res.reasons == {"not_image": 1}
    blank = _write(tmp_path / "names.txt", ["猫", "", "狗"])  # would shift 狗 to label 2
    with pytest.raises(ValueError, match=r"names\.txt:2: blank class name"):
        read_zeroshot(str(root), classnames=blank)
    trailing = tmp_path / "t.txt"
    trailing.write_text("猫\n狗\n\n\n", encoding="utf-8")
    assert read_zeroshot(str(root), classnames=str(trailing))[1] == ["猫", "狗"]
    with pytest.raises(FileNotFoundError, match="class-names file not found"):
        read_zeroshot(str(root), classnames=str(tmp_path / "none.txt"))


def test_format_registry():
    from r2d2.engine.data import ccmb

    assert (
        ccmb.FORMATS == ccmb.RETRIEVAL_FORMATS + ccmb.MATCHING_FORMATS + ccmb.CLASSIFICATION_FORMATS
    )
    assert len(set(ccmb.FORMATS)) == len(ccmb.FORMATS)
    assert set(ccmb.MATCHING_FORMATS) == {"icm", "iqm"} and "muge" in ccmb.RETRIEVAL_FORMATS
