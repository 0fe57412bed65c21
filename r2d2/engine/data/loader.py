"""From records to batches: a map-style dataset, a resumable sharded batch sampler, the collate.

Order. The sample stream is the concatenation of per-epoch permutations of the records
(``torch.randperm`` seeded by ``(seed, epoch)``). Micro-batch ``m`` is stream positions
``[m * M, (m + 1) * M)`` with ``M`` = global batch / grad_accum, and rank ``r`` of ``W`` takes the
``r``-th contiguous ``M / W`` of it. So the *data position* of a run is one integer (micro-batches
consumed), a resumed run continues at exactly the same sample, and 1 process with batch ``B`` sees
the same samples per step as ``W`` processes with ``B / W`` each.

Augmentation. Sample ``i`` in epoch ``e`` is augmented with ``random.Random((seed, e, i))``: the
result does not depend on worker count, rank or resumption.

Bad samples. An image that is missing or cannot be decoded becomes a ``Skipped(reason)`` marker; the
collate drops it and reports ``skipped`` and ``skip_reasons`` with the batch (the trainer counts them
and stops when the skip rate passes ``data.max_skip_rate``).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from r2d2.engine.data.records import Record
from r2d2.engine.data.synthetic import open_image


@dataclass
class Skipped:
    reason: str


def id_hash(image_id: str) -> int:
    """Stable 63-bit integer for an image id string (the losses take ``image_ids`` as a long tensor)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


class PairDataset(torch.utils.data.Dataset):
    """``dataset[(epoch, index)]`` -> dict(image [3,H,W], text, image_id, label) or ``Skipped``."""

    def __init__(self, records: Sequence[Record], transform, seed: int = 0, canvas: int = 64) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.canvas = canvas  # render size of synthetic images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict | Skipped:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        r = self.records[index]
        try:
            img = open_image(r.image, self.canvas)
        except FileNotFoundError:
            return Skipped("missing_image")
        except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
            return Skipped("corrupt_image")
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        return {"image": self.transform(img, rng), "text": r.text, "image_id": r.image_id, "label": r.label}


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Infinite stream of this rank's micro-batches of ``(epoch, index)``, from ``start`` on."""

    def __init__(self, n: int, micro_global: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start: int = 0, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError("the data set has no usable samples (all skipped or empty file)")
        if micro_global % world:
            raise ValueError(f"micro-batch {micro_global} (data.batch_size / train.grad_accum) is "
                             f"not divisible by the world size {world}")
        self.n, self.micro_global, self.rank, self.world = n, micro_global, rank, world
        self.seed, self.start, self.shuffle = seed, start, shuffle
        self._perm_epoch, self._perm = -1, None

    def _index(self, pos: int) -> tuple[int, int]:
        epoch, i = divmod(pos, self.n)
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._perm_epoch = epoch
        return epoch, self._perm[i]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.micro_global // self.world
        m = self.start
        while True:
            base = m * self.micro_global + self.rank * local
            yield [self._index(p) for p in range(base, base + local)]
            m += 1

    def __len__(self) -> int:  # infinite; DataLoader only asks for it in len()
        raise TypeError("ResumableBatchSampler is infinite")


class Collate:
    """Stack images, tokenise texts in one batched call, drop and count ``Skipped`` markers."""

    def __init__(self, tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list) -> dict:
        reasons = Counter(x.reason for x in items if isinstance(x, Skipped))
        good = [x for x in items if not isinstance(x, Skipped)]
        batch = {"skipped": sum(reasons.values()), "skip_reasons": reasons, "size": len(good)}
        if not good:
            return batch
        ids, mask = self.tokenize([x["text"] for x in good])
        batch.update(
            images=torch.stack([x["image"] for x in good]),
            input_ids=ids, attention_mask=mask,
            image_ids=torch.tensor([id_hash(x["image_id"]) for x in good], dtype=torch.long),
            texts=[x["text"] for x in good],
        )
        if any(x["label"] is not None for x in good):
            batch["labels"] = torch.tensor([-100 if x["label"] is None else x["label"] for x in good])
        return batch


class Tokenize:
    """Picklable wrapper giving ``(input_ids, attention_mask)`` [N, max_len] long for a tokenizer
    that is either callable (``tok(texts) -> {"input_ids", "attention_mask"}``) or a HF
    ``tokenizers.Tokenizer`` (``encode_batch``)."""

    def __init__(self, tok, max_len: int) -> None:
        self.tok, self.max_len = tok, max_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not callable(self.tok):  # a bare tokenizers.Tokenizer
            rows = [e.ids for e in self.tok.encode_batch(list(texts))]
        else:
            out = self.tok(list(texts))
            ids, mask = torch.as_tensor(out["input_ids"]), torch.as_tensor(out["attention_mask"])
            rows = [i[m.bool()].tolist() for i, m in zip(ids, mask)]
        ids = torch.zeros(len(rows), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(rows), self.max_len, dtype=torch.long)
        for k, r in enumerate(rows):
            r = r[: self.max_len]
            ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[k, : len(r)] = 1
        return ids, mask


# ------------------------------------------------------------------------------ webdataset
def _decode_wds(sample: dict, transform, seed: int):
    """Raw tar members -> the dict PairDataset yields, or Skipped."""
    import io
    import json

    from PIL import Image

    key = sample.get("__key__", "")
    img_bytes = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
    text = None
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", "replace") if isinstance(sample["txt"], bytes) else sample["txt"]
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
            text = meta.get("text", meta.get("caption"))
        except (ValueError, AttributeError):
            return Skipped("malformed_line")
    if img_bytes is None:
        return Skipped("missing_image")
    if not isinstance(text, str) or not text.strip():
        return Skipped("empty_text")
    try:
        with Image.open(io.BytesIO(img_bytes)) as im:
            im.load()
            img = im.convert("RGB")
    except Exception:
        return Skipped("corrupt_image")
    rng = random.Random(f"{seed}:{key}")
    return {"image": transform(img, rng), "text": text.strip(), "image_id": key, "label": None}


def webdataset_stream(urls: str, transform, seed: int = 0, shuffle_buffer: int = 0):
    """Stream tar shards with the ``webdataset`` library: shards split by rank (torch.distributed)
    and by DataLoader worker, repeated forever; decoded to PairDataset items."""
    import functools

    import webdataset as wds

    ds = wds.WebDataset(urls, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                        shardshuffle=False, empty_check=False, repeat=True,
                        handler=wds.warn_and_continue)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, rng=random.Random(seed))
    return ds.map(functools.partial(_decode_wds, transform=transform, seed=seed))


# ------------------------------------------------------------------------------ factory
@dataclass
class TrainData:
    """The training batch stream of this rank and what the reader already had to skip."""

    loader: torch.utils.data.DataLoader
    num_records: int | None
    """usable records (None for streamed shards)"""
    read_skipped: int
    read_reasons: Counter


def build_train_data(cfg, tokenize: Tokenize, image_size: int, micro_global: int, rank: int = 0,
                     world: int = 1, start_micro: int = 0) -> TrainData:
    """``cfg`` is a ``DataConfig``; the stream starts at micro-batch ``start_micro`` (resume)."""
    from r2d2.engine.data.readers import read_records
    from r2d2.engine.data.synthetic import read_synthetic
    from r2d2.engine.data.transforms import build_transform

    tf = build_transform(image_size, train=True, augment=cfg.augment, scale=cfg.crop_scale, hflip=cfg.hflip,
                         randaugment=tuple(cfg.randaugment) if cfg.randaugment else None)
    collate = Collate(tokenize)
    common = dict(num_workers=cfg.num_workers, collate_fn=collate, persistent_workers=cfg.num_workers > 0,
                  pin_memory=torch.cuda.is_available())
    if cfg.format == "webdataset":
        if micro_global % world:
            raise ValueError(f"micro-batch {micro_global} is not divisible by the world size {world}")
        stream = webdataset_stream(cfg.path, tf, cfg.seed)
        loader = torch.utils.data.DataLoader(stream, batch_size=micro_global // world, **common)
        # Streams have no random access: a resumed run re-reads and drops the consumed batches.
        it = iter(loader)
        for _ in range(start_micro):
            next(it)
        return TrainData(_Iterated(loader, it), None, 0, Counter())
    if cfg.format == "synthetic":
        res = read_synthetic(cfg.synthetic_size, "train", cfg.seed)
    else:
        res = read_records(cfg.format, cfg.path, cfg.image_root)
    ds = PairDataset(res.records, tf, cfg.seed, canvas=max(64, image_size))
    sampler = ResumableBatchSampler(len(ds), micro_global, rank, world, cfg.seed, start=start_micro)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, **common)
    return TrainData(loader, len(ds), res.skipped, Counter(res.reasons))


class _Iterated:
    """A loader whose iterator was already advanced (so ``iter()`` continues it)."""

    def __init__(self, loader, it) -> None:
        self.loader, self.it = loader, it

    def __iter__(self):
        return self.it


def eval_records(cfg) -> list[Record]:
    """Held-out records for the end-of-run retrieval eval: the synthetic eval split, or
    ``data.eval_path`` read in ``data.format``; empty when there is none."""
    from r2d2.engine.data.readers import read_records
    from r2d2.engine.data.synthetic import read_synthetic

    if cfg.format == "synthetic":
        return read_synthetic(cfg.synthetic_eval_size, "eval", cfg.seed).records
    if cfg.eval_path and cfg.format != "webdataset":
        return read_records(cfg.format, cfg.eval_path, cfg.image_root).records
    return []
