"""Chinese BERT WordPiece tokenizer (``tokenizers``), from a vocab.txt or a generated offline vocab.

The generated vocabulary is deterministic so that everything runs without downloads:

    [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, printable ASCII, "##" + printable ASCII,
    the CJK Unified Ideographs block U+4E00..U+9FFF

Chinese characters are split one per token (BERT's ``handle_chinese_chars``), so the CJK block
covers Chinese text; ASCII words are spelled out with the "##" continuation pieces.
"""

from __future__ import annotations

import os

import torch

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ASCII = [chr(c) for c in range(0x21, 0x7F)]
_CJK = range(0x4E00, 0xA000)


def default_vocab() -> list[str]:
    """The project's offline vocabulary (see the module docstring)."""
    return [*SPECIALS, *_ASCII, *("##" + c for c in _ASCII), *(chr(c) for c in _CJK)]


def default_vocab_size() -> int:
    return len(SPECIALS) + 2 * len(_ASCII) + len(_CJK)


class R2D2Tokenizer:
    """``tok(list[str]) -> {"input_ids": Long [N, L], "attention_mask": Long [N, L]}`` with
    ``[CLS] ... [SEP]`` and right padding; other ``tokenizers.Tokenizer`` methods pass through
    (``tok.encode_batch``, ``tok.decode``...)."""

    def __init__(
        self,
        vocab: list[str],
        max_length: int = 64,
        lowercase: bool = True,
        padding: str = "longest",
    ):
        from tokenizers import BertWordPieceTokenizer

        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r}: expected an int >= 2 ([CLS] and [SEP])")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding={padding!r}: expected 'longest' or 'max_length'")
        missing = [s for s in SPECIALS if s not in vocab]
        if missing:
            raise ValueError(f"vocab lacks the special tokens {missing}")
        self.vocab = list(vocab)
        self.max_length, self.padding = max_length, padding
        self._tok = BertWordPieceTokenizer(
            {t: i for i, t in enumerate(self.vocab)},
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=None,
            lowercase=lowercase,
        )
        self._tok.enable_truncation(max_length)
        ids = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.cls_id = ids["[PAD]"], ids["[UNK]"], ids["[CLS]"]
        self.sep_id, self.mask_id = ids["[SEP]"], ids["[MASK]"]
        self.special_ids = tuple(ids[s] for s in SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer input must be a list of str")
        enc = self._tok.encode_batch(list(texts))
        L = (
            self.max_length
            if self.padding == "max_length"
            else max([len(e.ids) for e in enc] + [2])
        )
        ids = torch.full((len(enc), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, : len(e.ids)] = 1
        # cut at max_length: what was cut off is in the encoding's overflow
        truncated = torch.tensor([len(e.overflowing) > 0 for e in enc], dtype=torch.bool)
        return {"input_ids": ids, "attention_mask": mask, "truncated": truncated}

    def save_vocab(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.vocab) + "\n")

    def __getattr__(self, name):
        # Only reached for names not defined here: the wrapped tokenizers.Tokenizer's API.
        if name == "_tok":
            raise AttributeError(name)
        return getattr(self._tok, name)


def build_tokenizer(
    vocab_path: str | None = None,
    max_length: int = 64,
    lowercase: bool = True,
    padding: str = "longest",
) -> R2D2Tokenizer:
    """WordPiece tokenizer from ``vocab_path`` (one token per line, BERT vocab.txt), or the
    generated offline vocabulary when None."""
    if vocab_path is None:
        return R2D2Tokenizer(default_vocab(), max_length, lowercase, padding)
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(
            f"vocab_path={vocab_path!r} is not a file (expected a BERT vocab.txt)"
        )
    with open(vocab_path, encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    while vocab and vocab[-1] == "":
        vocab.pop()
    return R2D2Tokenizer(vocab, max_length, lowercase, padding)
