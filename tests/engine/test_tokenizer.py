"""The WordPiece tokenizer: generated offline vocab, Chinese splitting, padding, vocab files."""

import pytest
import torch

from r2d2.engine.tokenizer import SPECIALS, build_tokenizer, default_vocab, default_vocab_size


def test_default_vocab_is_deterministic_with_specials_first():
    v = default_vocab()
    assert v == default_vocab() and len(v) == default_vocab_size() == len(set(v))
    assert v[:5] == list(SPECIALS)
    assert "中" in v and "##a" in v and "a" in v and chr(0x9FFF) in v


def test_chinese_split_per_character_and_ascii_pieces():
    tok = build_tokenizer(max_length=16)
    out = tok(["我爱北京", "Hi 猫"])
    ids, mask = out["input_ids"], out["attention_mask"]
    vocab = default_vocab()
    assert [vocab[i] for i in ids[0, :6]] == ["[CLS]", "我", "爱", "北", "京", "[SEP]"]
    # lower-cased, spelled with ## continuations, then the Chinese character on its own
    assert [vocab[i] for i in ids[1, :6]] == ["[CLS]", "h", "##i", "猫", "[SEP]", "[PAD]"]
    assert mask.tolist() == [[1] * 6, [1] * 5 + [0]]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(vocab)


def test_truncation_and_max_length_padding():
    tok = build_tokenizer(max_length=7, padding="max_length")
    out = tok(["一二三四五六七八九十", "一"])
    assert out["input_ids"].shape == (2, 7)
    assert out["input_ids"][0, -1].item() == tok.sep_id  # truncated but still closed by [SEP]
    assert out["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]


def test_vocab_file_and_unknown_chars(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join([*SPECIALS, "猫", "狗"]) + "\n", encoding="utf-8")
    tok = build_tokenizer(str(path), max_length=10)
    assert tok.vocab_size == 7
    ids = tok(["猫鱼狗"])["input_ids"][0].tolist()
    assert ids == [2, 5, 1, 6, 3]  # 鱼 is not in this vocab -> [UNK]
    # the wrapped tokenizers API passes through (used by the eval CLI)
    assert tok.encode_batch(["猫"])[0].ids == [2, 5, 3]
    tok.save_vocab(str(tmp_path / "v2.txt"))
    assert build_tokenizer(str(tmp_path / "v2.txt")).vocab == tok.vocab


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_path"):
        build_tokenizer(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="max_length"):
        build_tokenizer(max_length=1)
    with pytest.raises(ValueError, match="padding"):
        build_tokenizer(padding="left")
    with pytest.raises(TypeError, match="list of str"):
        build_tokenizer()("一句话")
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match="special tokens"):
        build_tokenizer(str(bad))


def test_empty_text_gives_cls_sep():
    out = build_tokenizer()([""])
    assert out["input_ids"].tolist() == [[2, 3]]
    assert out["attention_mask"].dtype == torch.long
