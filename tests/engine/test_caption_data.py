"""Caption data: the AIC-ICC reader, caption lists in JSONL manifests and WebDataset shards,
``data.format: aic_icc`` in the training loader and the eval config, and grouping the records of
a caption set into references (r2d2.engine.tasks.caption.references)."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from r2d2.engine.config import ConfigError, DataConfig, load_config
from r2d2.engine.data import ccmb
from r2d2.engine.data.captions import clean_caption, read_aic_icc
from r2d2.engine.data.loader import (
    Collate,
    PairDataset,
    Skipped,
    Tokenize,
    _decode_wds,
    build_train_data,
    check_data_source,
    read_eval,
)
from r2d2.engine.data.readers import read_jsonl, read_records
from r2d2.engine.data.records import DataError, MissingDataError, Record
from r2d2.engine.data.transforms import EvalTransform
from r2d2.engine.tasks.caption.references import group_references
from r2d2.engine.tokenizer import build_tokenizer

MAX_LEN = 16
TOK = Tokenize(build_tokenizer(None, MAX_LEN), MAX_LEN)
LONG = "一个穿着红色衣服的男人" * 60  # 660 characters, far over MAX_LEN tokens


def _png(path, rng):
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def aic(tmp_path):
    """An AIC-ICC annotation file over tiny images, with one of each kind of bad entry."""
    rng = np.random.default_rng(random.randrange(2**32))
    for name in ("a.png", "b.png", "c.png", "d.jpg"):
        _png(tmp_path / name, rng)
    (tmp_path / "corrupt.jpg").write_bytes(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    entries = [
        # 2 usable (cleaned), 2 empty_text, 1 non_string_text
        {
            "image_id": "a.png",
            "caption": ["一个男人\n在街上走路", "  男人 走 在 路上 \n", "", " \n", 5],
        },
        {"image_id": "b.png", "caption": ["两只狗在草地上奔跑", LONG], "url": "http://x/b.png"},
        {"image_id": "corrupt.jpg", "caption": ["坏图片的描述", "另一句描述"]},  # found at load
        {"image_id": "missing.jpg", "caption": ["不存在的图片", "第二句"]},  # 2 missing_image
        {"image_id": "c.png", "caption": []},  # no_caption
        {"image_id": "c.png"},  # no_caption
        {"caption": ["没有图片"]},  # malformed_line x4 from here
        "just a string",
        {"image_id": "c.png", "caption": {"0": "不是列表"}},
        {"image_id": 17, "caption": ["数字编号"]},
        {"image_id": "d", "caption": "单个字符串描述"},  # no extension: d.jpg; one string
    ]
    path = tmp_path / "caption_val_annotations.json"
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return tmp_path, str(path)


EXPECTED_REASONS = {
    "empty_text": 2,
    "non_string_text": 1,
    "missing_image": 2,
    "no_caption": 2,
    "malformed_line": 4,
}


def test_aic_icc_reader_records_and_skip_counts(aic):
    root, path = aic
    res = read_aic_icc(path)
    assert res.reasons == EXPECTED_REASONS
    assert res.skipped == sum(EXPECTED_REASONS.values()) == 11
    got = [(r.image_id, r.text) for r in res.records]
    assert got == [
        ("a", "一个男人在街上走路"),
        ("a", "男人走在路上"),
        ("b", "两只狗在草地上奔跑"),
        ("b", LONG),
        ("corrupt", "坏图片的描述"),
        ("corrupt", "另一句描述"),
        ("d", "单个字符串描述"),
    ]
    assert res.records[0].image == str(root / "a.png") and res.records[-1].image == str(
        root / "d.jpg"
    )
    assert all(r.label is None for r in res.records)
    # image_root: the images elsewhere (the release keeps them in their own folder)
    other = root / "images"
    other.mkdir()
    (root / "b.png").rename(other / "b.png")
    moved = read_aic_icc(path, image_root=str(other))
    assert [r.image_id for r in moved.records] == ["b", "b"]
    assert moved.reasons["missing_image"] == 2 + 2 + 2 + 1  # missing, a, corrupt, d
    # check_images=False: no file lookups, nothing counted as missing
    assert read_aic_icc(path, check_images=False).reasons["missing_image"] == 0


def test_clean_caption_rules():
    assert clean_caption(" 一个 男人\n在\u3000街上 走路\r\n") == "一个男人在街上走路"
    assert clean_caption("穿着T 恤的 NBA\n球员  and  a\tcat") == "穿着T 恤的 NBA 球员 and a cat"
    assert clean_caption(" \n\t ") == ""


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"image_id": "a.png", "caption": ["x"]}', "top level is a dict"),
        ('{"annotations": [{"image_id": 1, "caption": "x"}]}', "a COCO-style caption file"),
        ('[{"image_id": "a.png", "caption": ["x"]}', "not valid JSON"),
        (b'[{"image_id": "a.png", "caption": ["\xff\xfe"]}]', "not valid UTF-8"),
    ],
)
def test_aic_icc_broken_file_is_a_data_error_naming_it(tmp_path, content, match):
    path = tmp_path / "broken.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        read_aic_icc(str(path))
    assert str(path) in str(e.value)
    cfg = DataConfig(format="aic_icc", path=str(path), batch_size=2)
    with pytest.raises(DataError, match=r"data\.format=aic_icc: .*broken\.json"):
        build_train_data(cfg, TOK, 8, 2)


def test_aic_icc_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_aic_icc(str(tmp_path / "none.json"))
    with pytest.raises(MissingDataError, match="no such file"):
        check_data_source(DataConfig(format="aic_icc", path=str(tmp_path / "none.json")))


def test_aic_icc_format_names_in_configs_and_dispatch(aic):
    _, path = aic
    assert load_config(None, ["--data.format=aic_icc", f"--data.path={path}"]).data.format == (
        "aic_icc"
    )
    assert DataConfig(format="ccmb_aic_icc", path=path).format == "ccmb_aic_icc"
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        DataConfig(format="aic_icc")
    direct = read_aic_icc(path).records
    assert read_records("aic_icc", path).records == direct
    assert read_records("ccmb_aic_icc", path).records == direct
    assert ccmb.read_ccmb("aic_icc", path).records == direct
    # the eval side: a retrieval set and a caption set
    from r2d2.engine.tasks.config import TASK_FORMATS, EvalDataConfig

    assert EvalDataConfig(format="aic_icc", path=path).format == "aic_icc"
    assert "aic_icc" in TASK_FORMATS["retrieval"]
    assert set(ccmb.CAPTION_FORMATS) <= set(ccmb.RETRIEVAL_FORMATS)
    assert {"aic_icc", "coco_cn", "flickr30k_cn", "flickr30k_cna"} == set(ccmb.CAPTION_FORMATS)


def test_aic_icc_trains_with_corrupt_images_replaced_and_long_captions_truncated(aic):
    _, path = aic
    cfg = DataConfig(format="aic_icc", path=path, batch_size=7, augment=False)
    data = build_train_data(cfg, TOK, 8, 7)
    assert data.num_records == 7 and data.read_skipped == 11
    assert data.read_reasons == EXPECTED_REASONS
    batch = next(iter(data.loader))
    # one epoch = the 7 records; both corrupt ones fail at least once and are replaced
    assert batch["size"] == 7 and batch["images"].shape == (7, 3, 8, 8)
    assert set(batch["skip_reasons"]) == {"corrupt_image"} and batch["skipped"] >= 2
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (7, MAX_LEN)
    # the over-long caption is cut to MAX_LEN tokens, never an error
    ds = PairDataset(read_aic_icc(path).records, EvalTransform(8))
    long_item = ds[(0, 3)]
    assert long_item["text"] == LONG
    one = Collate(TOK)([long_item])
    assert one["input_ids"].shape == (1, MAX_LEN) and int(one["attention_mask"].sum()) == MAX_LEN


def test_aic_icc_as_the_held_out_set(aic):
    _, path = aic
    res = read_eval(DataConfig(format="aic_icc", path=path, eval_path=path))
    assert len(res.records) == 7 and res.reasons == EXPECTED_REASONS


# ------------------------------------------------------------------------------ manifests, shards
def test_jsonl_lines_with_caption_lists(tmp_path):
    rng = np.random.default_rng(random.randrange(2**32))
    _png(tmp_path / "a.png", rng)
    _png(tmp_path / "b.png", rng)
    lines = [
        {"image": "a.png", "captions": ["第一句", "", 3, "第二 句\n"], "image_id": "A"},
        {"image": "b.png", "captions": []},  # no_caption
        {"image": "missing.jpg", "caption": ["一", "二"]},  # 2 missing_image
        {"image_path": "b.png", "text": "一行一句"},  # the caption-per-line form still works
        {"image": "b.png", "caption": "也是一句"},
    ]
    ann = tmp_path / "m.jsonl"
    ann.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    res = read_jsonl(str(ann))
    assert [(r.image_id, r.text) for r in res.records] == [
        ("A", "第一句"),
        ("A", "第二句"),
        ("b.png", "一行一句"),
        ("b.png", "也是一句"),
    ]
    assert res.reasons == {
        "empty_text": 1,
        "non_string_text": 1,
        "no_caption": 1,
        "missing_image": 2,
    }
    images, refs = group_references(res.records)
    assert refs == {"A": ["第一句", "第二句"], "b.png": ["一行一句", "也是一句"]}
    assert images == {"A": str(tmp_path / "a.png"), "b.png": str(tmp_path / "b.png")}


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_webdataset_json_caption_lists(tmp_path):
    rng = np.random.default_rng(random.randrange(2**32))
    tf = EvalTransform(8)
    caps = ["一只猫", "一只小猫在睡觉", "猫\n在 睡"]
    sample = {"__key__": "k0", "jpg": _jpeg(rng), "json": json.dumps({"caption": caps}).encode()}
    seen = Counter(_decode_wds(sample, tf, seed=1, epoch=e)["text"] for e in range(40))
    assert set(seen) == {"一只猫", "一只小猫在睡觉", "猫在睡"}  # every caption, cleaned
    again = [_decode_wds(sample, tf, seed=1, epoch=e)["text"] for e in range(5)]
    assert again == [_decode_wds(sample, tf, seed=1, epoch=e)["text"] for e in range(5)]
    empty = dict(sample, json=json.dumps({"captions": []}).encode())
    assert isinstance(_decode_wds(empty, tf, 0), Skipped)
    assert _decode_wds(empty, tf, 0).reason == "no_caption"
    blank = dict(sample, json=json.dumps({"caption": ["", 3, " "]}).encode())
    assert _decode_wds(blank, tf, 0).reason == "empty_text"


# ------------------------------------------------------------------------------ references
def test_group_references_over_flickr_and_coco_cn(tmp_path):
    rng = np.random.default_rng(random.randrange(2**32))
    for name in ("1000", "2000", "COCO_val2014_000000000042"):
        _png(tmp_path / f"{name}.jpg", rng)
    flickr = tmp_path / "test.token"
    flickr.write_text(
        "1000.jpg#0\t一个 男人 在 走路\n1000.jpg#1\t男人走路\n2000.jpg#0\t两只狗\n3000.jpg#0\t缺图\n",
        encoding="utf-8",
    )
    res = ccmb.read_ccmb("flickr30k_cn", str(flickr))
    assert res.reasons == {"missing_image": 1}
    images, refs = group_references(res.records)
    assert list(refs) == ["1000", "2000"]
    assert refs["1000"] == ["一个 男人 在 走路", "男人走路"] and refs["2000"] == ["两只狗"]
    assert images["2000"] == str(tmp_path / "2000.jpg")

    ids = tmp_path / "coco-cn_test.txt"
    ids.write_text("COCO_val2014_000000000042\nCOCO_val2014_000000000043\n", encoding="utf-8")
    (tmp_path / "imageid.human-written-caption.txt").write_text(
        "COCO_val2014_000000000042#0\t一只猫\nCOCO_val2014_000000000042#1\t猫在睡觉\n",
        encoding="utf-8",
    )
    coco = ccmb.read_ccmb("coco_cn", str(ids))
    assert coco.reasons == {"no_caption": 1}
    _, refs = group_references(coco.records)
    assert refs == {"COCO_val2014_000000000042": ["一只猫", "猫在睡觉"]}


def test_group_references_refuses_one_id_for_two_files():
    records = [Record("x/a.jpg", "一", "a.jpg"), Record("y/a.jpg", "二", "a.jpg")]
    with pytest.raises(ValueError, match=r"'a\.jpg' names two images, x/a\.jpg and y/a\.jpg"):
        group_references(records)
    assert group_references([]) == ({}, {})
