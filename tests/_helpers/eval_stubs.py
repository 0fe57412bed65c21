"""Shared stand-ins for the downstream-task tests: a stub R2D2 model on lookup tables, a stub
pair scorer, records, a tokenizer and an image loader that need no files or weights."""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def grid_sim(n_img, n_txt, seed):
    # multiples of 1/64 in [-1, 1]: many ties, and `sim - 2` is exact in float32
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, (n_img, n_txt), generator=g).float() / 64


class TableScorer:
    """A stub cross encoder: a fixed random probability per (image, text) pair."""

    def __init__(self, n_img, n_txt, seed):
        g = torch.Generator().manual_seed(seed + 1)
        self.table = torch.rand(n_img, n_txt, generator=g)
        self.calls = 0

    def __call__(self, img_idx, txt_idx):
        self.calls += 1
        return self.table[img_idx, txt_idx]


@dataclass
class Rec:  # duck-types r2d2.engine.data.records.Record
    image: str
    text: str
    image_id: str
    label: int | None = None


class StubModel(torch.nn.Module):
    """The token-level API of R2D2Model on lookup tables: an image is a tensor whose first pixel
    holds its number, a text a row of token ids whose first id is its number; "token states"
    carry those numbers, embeddings and ITM logits are looked up."""

    def __init__(self, img_emb, txt_emb, itm_logit, has_cross=True):
        super().__init__()
        self.img_emb = torch.nn.Parameter(img_emb)
        self.txt_emb = torch.nn.Parameter(txt_emb)
        self.itm = torch.nn.Parameter(itm_logit)  # [n_img, n_txt] logit of "match"
        self.visual = torch.nn.Identity()
        self.config = type("Cfg", (), {"has_cross": has_cross, "image_size": 2})()

    @property
    def device(self):
        return self.itm.device

    def _text_inputs(self, ids, mask):
        return ids, mask

    def image_tokens(self, images):
        return images[:, 0, 0, :1, None]  # [B, 1, 1]

    def text_tokens(self, ids, mask=None):
        return ids[:, :1, None].float()  # [B, 1, 1]

    def image_embed(self, tokens):
        return F.normalize(self.img_emb[tokens[:, 0, 0].long()], dim=-1)

    def text_embed(self, tokens):
        return F.normalize(self.txt_emb[tokens[:, 0, 0].long()], dim=-1)

    def encode_image(self, images):
        return self.image_embed(self.image_tokens(images))

    def encode_text(self, ids, mask):
        return self.text_embed(self.text_tokens(ids, mask))

    def itm_logits(self, image_tokens, text_tokens, text_mask):
        z = self.itm[image_tokens[:, 0, 0].long(), text_tokens[:, 0, 0].long()]
        logits = torch.stack([-z / 2, z / 2], -1)
        return logits, logits * 0.5


def load_stub_image(path):  # "img/<n>.jpg" -> a 3x2x2 tensor holding n
    return torch.full((3, 2, 2), float(int(os.path.basename(path).split(".")[0])))


def stub_tokenizer(texts_in_order):
    index = {t: i for i, t in enumerate(texts_in_order)}

    def tokenize(texts):
        ids = torch.tensor([[index[t], 0, 0] for t in texts])
        return ids, torch.ones_like(ids)

    return tokenize
