"""From records to batches: a map-style dataset, a resumable sharded batch sampler, the collate, and
the WebDataset shard stream.

Order (files and the synthetic set). The sample stream is the concatenation of per-epoch
permutations of the records (``torch.randperm`` seeded by ``(seed, epoch)``). Micro-batch ``m`` is
stream positions ``[s + m * M, s + (m + 1) * M)`` with ``M`` = global batch / grad_accum and ``s``
the start position, and rank ``r`` of ``W`` takes the ``r``-th contiguous ``M / W`` of it. So the
*data position* of a run is one integer (stream positions consumed), a resumed run continues at
exactly the same sample, and 1 process with batch ``B`` sees the same samples per step as ``W``
processes with ``B / W`` each.

Augmentation. Sample ``i`` in epoch ``e`` is augmented with ``random.Random((seed, e, i))``: the
result does not depend on worker count, rank or resumption.

Bad samples. An image that is missing or cannot be decoded is *replaced*: stream position ``i``
then loads the record drawn by ``random.Random((seed, e, i, k))`` for try ``k = 1, 2, ...`` until
one decodes, and every failed try is reported (``skipped``, ``skip_reasons``) with the batch. So
every batch is full and of the same size on every rank (GCPR gathers equal shapes across ranks),
the result is still a pure function of ``(seed, e, i)`` (exact resume), and failed tries measure the
corrupt fraction (replacements are drawn uniformly, so a run of bad files is not over-counted the
way "take the next record" would). Only when ``REPLACE_TRIES`` draws in a row fail is the sample
dropped, and the batch is short (the trainer stops a multi-process run with a clear error then).

WebDataset. :class:`ShardStream` reads tar shards with the ``webdataset`` library, epoch after
epoch, shards split over (rank, DataLoader worker), an optional seeded shuffle buffer on the *raw*
samples, then decoding; each worker fills whole batches of good samples (bad ones skipped and
counted) and tags each batch with its position ``(role, epoch, raw samples read)``. A resumed
stream skips the consumed raw samples before decoding them.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from r2d2.engine.data.records import SHARD_EVENTS, DataError, MissingDataError, ReadResult, Record
from r2d2.engine.data.synthetic import open_image

REPLACE_TRIES = 16
"""Draws for a replacement before a bad sample is dropped (P = p^16 for a corrupt fraction p)."""


@dataclass
class Skipped:
    """A sample that could not be used; ``also`` lists the reasons of failed replacement draws."""

    reason: str
    also: tuple = ()

    @property
    def reasons(self) -> tuple:
        return (self.reason, *self.also)


def id_hash(image_id: str) -> int:
    """Stable 63-bit integer for an image id string (the losses take ``image_ids`` as a long tensor)."""
    return (
        int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "little")
        >> 1
    )


class PairDataset(torch.utils.data.Dataset):
    """``dataset[(epoch, index)]`` -> dict(image [3,H,W], text, image_id, label, skips): the sample,
    or its seeded replacement when it cannot be loaded (``skips`` = the reasons of the failed
    tries); ``Skipped`` only when ``REPLACE_TRIES`` replacements fail too."""

    def __init__(
        self, records: Sequence[Record], transform, seed: int = 0, canvas: int = 64
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.canvas = canvas  # render size of synthetic images

    def __len__(self) -> int:
        return len(self.records)

    def load(self, epoch: int, index: int, aug_key: str | None = None) -> dict | Skipped:
        """Record ``index`` decoded and augmented, or ``Skipped(reason)`` (no replacement)."""
        r = self.records[index]
        try:
            img = open_image(r.image, self.canvas)
        except FileNotFoundError:
            return Skipped("missing_image")
        except Exception:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, OSError...)
            return Skipped("corrupt_image")
        rng = random.Random(aug_key or f"{self.seed}:{epoch}:{index}")
        return {
            "image": self.transform(img, rng),
            "text": r.text,
            "image_id": r.image_id,
            "label": r.label,
        }

    def __getitem__(self, key) -> dict | Skipped:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.load(epoch, index)
        failed: list[str] = []
        k = 0
        while isinstance(item, Skipped):
            failed.append(item.reason)
            k += 1
            if k > REPLACE_TRIES:
                return Skipped(failed[0], tuple(failed[1:]))
            draw = random.Random(f"{self.seed}:{epoch}:{index}:swap{k}").randrange(
                len(self.records)
            )
            item = self.load(epoch, draw, aug_key=f"{self.seed}:{epoch}:{index}:swap{k}")
        item["skips"] = failed
        return item


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Infinite stream of this rank's micro-batches of ``(epoch, index)``, from stream position
    ``start`` (in samples, over all ranks) on."""

    def __init__(
        self,
        n: int,
        micro_global: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        if n <= 0:
            raise DataError("the data set has no usable samples (all skipped or empty file)")
        if micro_global % world:
            raise ValueError(
                f"micro-batch {micro_global} (data.batch_size / train.grad_accum) is "
                f"not divisible by the world size {world}"
            )
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
        base = self.start + self.rank * local
        while True:
            yield [self._index(p) for p in range(base, base + local)]
            base += self.micro_global

    def __len__(self) -> int:  # infinite; DataLoader only asks for it in len()
        raise TypeError("ResumableBatchSampler is infinite")


class Collate:
    """Stack images, tokenise texts in one batched call, count ``Skipped`` markers and the failed
    tries behind replaced samples. Accepts a list of items, or a stream batch
    ``{"items": [...], "pos": (role, epoch, raw)}`` whose position is passed on as ``stream_pos``."""

    def __init__(self, tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.tokenize = tokenize

    def __call__(self, items) -> dict:
        pos = None
        if isinstance(items, dict):
            items, pos = items["items"], items["pos"]
        reasons: Counter = Counter()
        good = []
        for x in items:
            if isinstance(x, Skipped):
                reasons.update(x.reasons)
            else:
                reasons.update(x.get("skips", ()))
                good.append(x)
        # skipped counts samples; damaged-shard events travel in skip_reasons only
        batch = {
            "skipped": sum(v for k, v in reasons.items() if k not in SHARD_EVENTS),
            "skip_reasons": reasons,
            "size": len(good),
        }
        if pos is not None:
            batch["stream_pos"] = tuple(pos)
        if not good:
            return batch
        texts = [x["text"] for x in good]
        encode = getattr(self.tokenize, "encode", None)  # tests may inject a plain callable
        ids, mask, cut = encode(texts) if encode else (*self.tokenize(texts), None)
        if cut is not None:
            batch["truncated"] = cut
        batch.update(
            images=torch.stack([x["image"] for x in good]),
            input_ids=ids,
            attention_mask=mask,
            image_ids=torch.tensor([id_hash(x["image_id"]) for x in good], dtype=torch.long),
            texts=texts,
        )
        if any(x["label"] is not None for x in good):
            batch["labels"] = torch.tensor(
                [-100 if x["label"] is None else x["label"] for x in good]
            )
        return batch


class Tokenize:
    """Picklable wrapper giving ``(input_ids, attention_mask)`` [N, max_len] long for a tokenizer
    that is either callable (``tok(texts) -> {"input_ids", "attention_mask"[, "truncated"]}``) or
    a HF ``tokenizers.Tokenizer`` (``encode_batch``); :meth:`encode` also says which texts were
    cut."""

    def __init__(self, tok, max_len: int) -> None:
        self.tok, self.max_len = tok, max_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(texts)[:2]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(input_ids, attention_mask, truncated)``: ``truncated`` [N] bool marks the texts
        whose tokens did not all fit (cut by the tokenizer or at ``max_len``); None when a
        callable tokenizer does not report its own cuts."""
        cut = None
        if not callable(self.tok):  # a bare tokenizers.Tokenizer
            enc = self.tok.encode_batch(list(texts))
            rows = [e.ids for e in enc]
            cut = [len(e.overflowing) > 0 for e in enc]
        else:
            out = self.tok(list(texts))
            ids, mask = torch.as_tensor(out["input_ids"]), torch.as_tensor(out["attention_mask"])
            rows = [i[m.bool()].tolist() for i, m in zip(ids, mask)]
            if "truncated" in out:
                cut = [bool(c) for c in out["truncated"]]
        ids = torch.zeros(len(rows), self.max_len, dtype=torch.long)
        mask = torch.zeros(len(rows), self.max_len, dtype=torch.long)
        for k, r in enumerate(rows):
            if cut is not None and len(r) > self.max_len:
                cut[k] = True
            r = r[: self.max_len]
            ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[k, : len(r)] = 1
        return ids, mask, None if cut is None else torch.tensor(cut, dtype=torch.bool)


# ------------------------------------------------------------------------------ webdataset
def _decode_wds(sample: dict, transform, seed: int, epoch: int = 0):
    """Raw tar members -> the dict PairDataset yields, or Skipped. The caption is ``txt``, or
    ``text`` / ``caption`` / ``captions`` of ``json``; a list there (the captions of the image)
    gives one of them, drawn by (seed, epoch, key), so each epoch may see another."""
    import io
    import json

    from PIL import Image

    key = sample.get("__key__", "")
    img_bytes = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
    text = None
    if "txt" in sample:
        text = (
            sample["txt"].decode("utf-8", "replace")
            if isinstance(sample["txt"], bytes)
            else sample["txt"]
        )
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
            text = meta.get("text", meta.get("caption", meta.get("captions")))
        except (ValueError, AttributeError):
            return Skipped("malformed_line")
    if img_bytes is None:
        return Skipped("missing_image")
    if isinstance(text, list):  # the captions of the image (AIC-ICC style): one per epoch, seeded
        if not text:
            return Skipped("no_caption")
        from r2d2.engine.data.captions import clean_caption

        usable = [clean_caption(t) for t in text if isinstance(t, str) and t.strip()]
        text = random.Random(f"{seed}:{epoch}:{key}:caption").choice(usable) if usable else None
    if not isinstance(text, str) or not text.strip():
        return Skipped("empty_text")
    try:
        with Image.open(io.BytesIO(img_bytes)) as im:
            im.load()
            img = im.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types, as in PairDataset.load
        return Skipped("corrupt_image")
    rng = random.Random(f"{seed}:{epoch}:{key}")
    return {
        "image": transform(img, rng),
        "text": text.strip(),
        "image_id": key,
        "label": None,
        "skips": [],
    }


def shard_list(urls: str) -> list[str]:
    """Brace-expanded shard list of ``data.path``; local files must exist (a typo would otherwise
    stream nothing, forever)."""
    from webdataset.shardlists import expand_urls

    shards = [u for part in str(urls).split("::") for u in expand_urls(part)]
    remote = ("pipe:", "http:", "https:", "gs:", "s3:", "ais:")
    missing = [s for s in shards if not s.startswith(remote) and not os.path.isfile(s)]
    if not shards or missing:
        raise MissingDataError(
            f"data.path={urls!r}: {len(missing)} of {len(shards)} shard files do not exist "
            f"(first: {missing[0] if missing else urls})"
        )
    return shards


def _shard_samples(url: str, damaged: list | None):
    """Raw samples of one tar shard. A shard that cannot be read to its end (truncated mid-file,
    garbage inside) gives the samples before the damage; the rest of it is lost. That is logged
    once per read with the shard's name and, when ``damaged`` is a list, recorded there as
    ``(url, error)`` after the shard's last good sample, so the stream can count it."""
    import logging

    import webdataset as wds

    errors: list = []

    def note(exn: Exception) -> bool:  # webdataset calls this for each read error, then goes on
        errors.append(exn)
        return True

    yield from wds.tarfile_to_samples(handler=note)(iter([{"url": url}]))
    if errors:
        first = " ".join(
            str(errors[0].args[0] if errors[0].args else errors[0]).split(" @ ")[0].split()
        )
        logging.getLogger("r2d2.data").warning(
            "webdataset: shard %s is damaged (%s: %s); the samples after the damage are lost "
            "(counted as truncated_shards in the log)",
            url,
            type(errors[0]).__name__,
            first,
        )
        if damaged is not None:
            damaged.append((url, errors[0]))


def _raw_epoch(
    shards: list[str],
    epoch: int,
    seed: int,
    slot: int,
    slots: int,
    shuffle_buffer: int,
    damaged: list | None = None,
):
    """Raw (undecoded) samples of this slot's shards in ``epoch``: shard order and the buffer
    shuffle are seeded by (seed, epoch, slot), so the sequence is reproducible for resuming.
    Shards that end in damage are appended to ``damaged`` (see :func:`_shard_samples`)."""
    import webdataset as wds

    order = list(shards)
    if shuffle_buffer:
        random.Random(f"{seed}:shards:{epoch}").shuffle(order)
    mine = order[slot::slots]
    src = (x for u in mine for x in _shard_samples(u, damaged))
    if shuffle_buffer:
        src = wds.shuffle(
            shuffle_buffer, shuffle_buffer, rng=random.Random(f"{seed}:buf:{epoch}:{slot}")
        )(src)
    return src


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches of ``local_batch`` good samples from the WebDataset shards of one rank.

    Worker ``w`` of ``K`` plays role ``(w + role_offset) % K`` and reads shards
    ``[rank * K + role :: world * K]`` of each epoch's shard order. ``start`` maps a role to
    ``(epoch, raw samples already consumed)``: those are skipped before decoding. Batches alternate
    over workers (the DataLoader's round robin), so a resume after ``b`` batches passes
    ``role_offset = b % K`` to keep the order."""

    def __init__(
        self,
        shards: list[str],
        transform,
        local_batch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 0,
        start: dict | None = None,
        role_offset: int = 0,
    ) -> None:
        self.shards, self.transform, self.local_batch = list(shards), transform, local_batch
        self.seed, self.rank, self.world, self.shuffle_buffer = seed, rank, world, shuffle_buffer
        self.start = {int(k): tuple(v) for k, v in (start or {}).items()}
        self.role_offset = role_offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (wid + self.role_offset) % workers
        slot, slots = self.rank * workers + role, self.world * workers
        if len(self.shards) < slots:
            raise DataError(
                f"webdataset: {len(self.shards)} shards for {self.world} ranks x {workers} "
                "workers; every (rank, worker) needs at least one shard"
            )
        epoch, skip = self.start.get(role, (0, 0))
        items: list = []
        good = 0

        def count_damaged(at: int) -> None:
            # a damaged shard found while fetching raw sample ``at`` goes into the batch
            # stream before that sample: one ``truncated_shard`` marker per damaged shard
            # read. Before the resume point it was counted in a consumed batch already.
            # Reads the current ``damaged``, ``skip``, ``items`` and ``reasons`` of the loop
            # below (late binding on purpose: ``items`` is rebound after every batch).
            if damaged and at >= skip:
                items.extend(Skipped("truncated_shard") for _ in damaged)
                reasons["truncated_shard"] += len(damaged)
            damaged.clear()

        while True:
            raw_seen = good_in_epoch = 0
            reasons: Counter = Counter()
            damaged: list = []
            for i, raw in enumerate(
                _raw_epoch(self.shards, epoch, self.seed, slot, slots, self.shuffle_buffer, damaged)
            ):
                raw_seen = i + 1
                count_damaged(i)
                if i < skip:  # consumed before the checkpoint: not decoded
                    continue
                item = _decode_wds(raw, self.transform, self.seed, epoch)
                items.append(item)
                if isinstance(item, Skipped):
                    reasons[item.reason] += 1
                    continue
                good += 1
                good_in_epoch += 1
                if good == self.local_batch:
                    yield {"items": items, "pos": (role, epoch, i + 1)}
                    items, good = [], 0
            count_damaged(raw_seen)  # a shard whose damage came after its last sample
            if raw_seen == 0:
                raise DataError(
                    f"webdataset: the shards of rank {self.rank} worker {role} hold no samples"
                )
            if skip == 0 and good_in_epoch == 0:
                raise DataError(
                    f"webdataset: no usable sample in a whole pass over the shards of rank "
                    f"{self.rank} worker {role} ({dict(reasons)})"
                )
            epoch, skip = epoch + 1, 0


def webdataset_stream(urls: str, transform, seed: int = 0, shuffle_buffer: int = 0) -> Iterator:
    """Decoded items (dicts or ``Skipped``) of all shards, epoch after epoch (one process)."""
    shards = shard_list(urls)
    epoch = 0
    while True:
        for raw in _raw_epoch(shards, epoch, seed, 0, 1, shuffle_buffer):
            yield _decode_wds(raw, transform, seed, epoch)
        epoch += 1


# ------------------------------------------------------------------------------ factory
@dataclass
class TrainData:
    """The training batch stream of this rank and what the reader already had to skip."""

    loader: torch.utils.data.DataLoader
    num_records: int | None
    """usable records (None for streamed shards)"""
    read_skipped: int
    read_reasons: Counter
    stream: bool = False
    """WebDataset: positions are per (rank, worker), carried by each batch's ``stream_pos``"""
    workers: int = 1
    info: dict = field(default_factory=dict)


def _worker_ignores_sigterm(_worker_id: int) -> None:
    """A SLURM time-limit or pre-emption signal reaches every process of the job step, loader
    workers included; a worker dying of it would end the run ("DataLoader worker exited
    unexpectedly") before the trainer writes its SIGTERM checkpoint. The trainer's process stops
    its workers itself, and a worker also exits when that process dies."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_data_source(cfg, eval_too: bool = False) -> None:
    """Fail fast, before a model is built, when ``data.path`` names nothing (one clear line);
    with ``eval_too``, when ``data.eval_path`` names no file either (found only after training
    otherwise)."""
    if cfg.format == "webdataset":
        shard_list(cfg.path)
    elif cfg.format != "synthetic" and not os.path.isfile(cfg.path):
        raise MissingDataError(f"data.path={cfg.path!r} (data.format={cfg.format}): no such file")
    if eval_too and cfg.eval_path and not os.path.isfile(cfg.eval_path):
        raise MissingDataError(
            f"data.eval_path={cfg.eval_path!r}: no such file (the held-out set of the "
            "end-of-run evaluation; or --train.eval_at_end=false)"
        )


def build_train_data(
    cfg,
    tokenize: Tokenize,
    image_size: int,
    micro_global: int,
    rank: int = 0,
    world: int = 1,
    start_sample: int = 0,
    stream_state: dict | None = None,
) -> TrainData:
    """``cfg`` is a ``DataConfig``. Files / synthetic: the stream starts at sample position
    ``start_sample``. WebDataset: ``stream_state`` is this rank's saved
    ``{"batches": consumed, "positions": {role: [epoch, raw]}}``. Unreadable data raises
    :class:`DataError` naming the file."""
    from r2d2.engine.data.readers import read_records
    from r2d2.engine.data.synthetic import read_synthetic
    from r2d2.engine.data.transforms import build_transform

    if micro_global % world:
        raise DataError(
            f"micro-batch {micro_global} (data.batch_size / train.grad_accum) is not "
            f"divisible by the world size {world}"
        )
    tf = build_transform(
        image_size,
        train=True,
        augment=cfg.augment,
        scale=cfg.crop_scale,
        hflip=cfg.hflip,
        randaugment=tuple(cfg.randaugment) if cfg.randaugment else None,
    )
    # Its own generator: iter(loader) must not draw from the global RNG, which a resumed run has
    # just restored from the checkpoint (dropout and the loss masks draw from it).
    common = dict(
        num_workers=cfg.num_workers,
        collate_fn=Collate(tokenize),
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=_worker_ignores_sigterm if cfg.num_workers > 0 else None,
    )
    if cfg.format == "webdataset":
        state = stream_state or {}
        workers = max(1, cfg.num_workers)
        shards = shard_list(cfg.path)
        if len(shards) < world * workers:
            raise DataError(
                f"data.path={cfg.path!r}: {len(shards)} shards for {world} ranks x {workers} "
                "workers (data.num_workers); every (rank, worker) reads whole shards, so "
                "there must be at least that many"
            )
        stream = ShardStream(
            shards,
            tf,
            micro_global // world,
            cfg.seed,
            rank,
            world,
            cfg.shuffle_buffer,
            start=state.get("positions"),
            role_offset=int(state.get("batches", 0)) % workers,
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=None, **common)
        return TrainData(
            loader, None, 0, Counter(), stream=True, workers=workers, info={"shards": len(shards)}
        )
    try:
        if cfg.format == "synthetic":
            res = read_synthetic(cfg.synthetic_size, "train", cfg.seed)
        else:
            res = read_records(cfg.format, cfg.path, cfg.image_root)
    except (OSError, ValueError) as e:  # no such file, a malformed annotation line (ccmb readers)
        raise DataError(f"data.format={cfg.format}: {e}") from None
    ds = PairDataset(res.records, tf, cfg.seed, canvas=max(64, image_size))
    sampler = ResumableBatchSampler(
        len(ds), micro_global, rank, world, cfg.seed, start=start_sample
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, **common)
    return TrainData(loader, len(ds), res.skipped, Counter(res.reasons))


def read_eval(cfg) -> ReadResult:
    """Held-out records for the end-of-run retrieval eval, with the reader's skip counts:
    ``data.eval_path`` (read in ``data.format``; for synthetic and webdataset a jsonl or tsv
    manifest by its extension, ``r2d2.engine.config.eval_manifest_format``), else the synthetic
    eval split (format synthetic), else nothing (no records)."""
    from r2d2.engine.config import ConfigError, eval_manifest_format
    from r2d2.engine.data.readers import read_records
    from r2d2.engine.data.synthetic import read_synthetic

    if cfg.eval_path:
        try:
            fmt = eval_manifest_format(cfg.eval_path, cfg.format)
        except ConfigError as e:  # RunConfig refuses this already; a DataConfig built by hand
            raise DataError(str(e)) from None
        try:
            return read_records(fmt, cfg.eval_path, cfg.image_root)
        except (OSError, ValueError) as e:  # no such file, a malformed annotation line (ccmb)
            raise DataError(f"data.eval_path ({fmt}): {e}") from None
    if cfg.format == "synthetic":
        return read_synthetic(cfg.synthetic_eval_size, "eval", cfg.seed)
    return ReadResult([])


def eval_records(cfg) -> list[Record]:
    """The records of :func:`read_eval` (empty when there is no held-out set)."""
    return read_eval(cfg).records


# ------------------------------------------------------------------------------ data position
class DataCursor:
    """Where this rank's training stream stands: saved with every checkpoint, read back on resume.

    Files / synthetic: ``samples`` = stream positions consumed (all ranks; a replaced bad sample
    still takes one position). WebDataset: per role ``[epoch, raw samples read]`` of the batches
    this rank consumed, and how many batches (for the worker round robin)."""

    def __init__(
        self,
        fmt: str,
        stream: bool,
        world: int,
        workers: int,
        start_sample: int = 0,
        stream_state: dict | None = None,
    ) -> None:
        self.fmt, self.stream, self.world, self.workers = fmt, stream, world, workers
        self.samples = start_sample
        st = stream_state or {}
        self.batches = int(st.get("batches", 0))
        self.positions = {int(k): list(v) for k, v in (st.get("positions") or {}).items()}

    def advance(self, micro: list[dict], micro_global: int) -> None:
        for b in micro:
            self.samples += micro_global
            if "stream_pos" in b:
                role, epoch, raw = b["stream_pos"]
                self.positions[int(role)] = [int(epoch), int(raw)]
                self.batches += 1

    def global_state(self) -> dict:
        return {
            "format": self.fmt,
            "kind": "stream" if self.stream else "samples",
            "samples": self.samples,
            "world": self.world,
            "workers": self.workers,
        }

    def rank_state(self) -> dict:
        return {"batches": self.batches, "positions": self.positions} if self.stream else {}


def resume_position(
    saved: dict | int | None,
    rank_data: list,
    cfg_data,
    step: int,
    saved_cfg: dict | None,
    rank: int,
    world: int,
) -> tuple[int, dict | None, str | None]:
    """The checkpoint's data position -> ``(start_sample, stream_state, note)`` for this rank,
    checked against the run: ``DataError`` if it cannot be the position of this data at ``step``;
    ``note`` says when the stream cannot continue exactly (another world size / worker count)."""
    saved_data = (saved_cfg or {}).get("data", {})
    same_batch = saved_data.get("batch_size", cfg_data.batch_size) == cfg_data.batch_size
    if saved is None or isinstance(saved, int):  # checkpoints before positions were dicts
        return step * cfg_data.batch_size, None, None
    if saved.get("format") != cfg_data.format:
        raise DataError(
            f"--resume: the checkpoint was written reading data.format={saved.get('format')!r}, "
            f"this run reads {cfg_data.format!r}; resume with the same data"
        )
    if saved.get("kind") == "samples":
        start = int(saved["samples"])
        if start < 0 or (same_batch and start != step * cfg_data.batch_size):
            raise DataError(
                f"--resume: the checkpoint's data position {start} does not match its step "
                f"{step} x data.batch_size {cfg_data.batch_size}: the checkpoint is inconsistent"
            )
        return start, None, None
    workers = max(1, cfg_data.num_workers)
    mine = rank_data[rank] if rank < len(rank_data) else {}
    if saved.get("world") == world and saved.get("workers") == workers and mine:
        return 0, mine, None
    epochs = [p[0] for r in rank_data for p in (r or {}).get("positions", {}).values()]
    epoch = min(epochs) if epochs else 0
    note = (
        f"the checkpoint's stream was read by {saved.get('world')} ranks x {saved.get('workers')} workers, "
        f"this run has {world} x {workers}: positions cannot be mapped, every worker restarts at "
        f"epoch {epoch} (samples of that epoch may be seen twice)"
    )
    return 0, {"batches": 0, "positions": {r: [epoch, 0] for r in range(workers)}}, note
