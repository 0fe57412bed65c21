"""Caption evaluation: decode the held-out images, score them against their references, and
measure two baselines in the same run.

    model            the captioner's decoding (``caption.strategy`` etc.)
    most frequent    the most frequent training caption, for every image
    nearest image    the caption of the nearest training image by R2D2 image-image retrieval:
                     cosine of the captioner's image embeddings (its fine-tuned ViT + R2D2's
                     ``vision_proj``) over a pool of training images (``caption.baseline_pool``)

Scores: :func:`r2d2.engine.tasks.caption.metrics.score_captions` (pycocoevalcap BLEU-1..4,
ROUGE-L, CIDEr-D on jieba words or characters, ``caption.eval_tokenize``). CIDEr-D's idf comes
from the evaluated references, so the three rows are comparable only because they are scored on
the same split in the same call.

Under torchrun every rank decodes and embeds a strided share of the images; rank 0 writes
``caption_eval.json`` (scores, decoding settings, skip counts and a sample of captions) and
prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import torch

from r2d2.dist import dist_info
from r2d2.engine.tasks.caption.config import CaptionConfig
from r2d2.engine.tasks.caption.references import group_references

REPORT_NAME = "caption_eval.json"
ROWS = (
    ("model", "captioner"),
    ("most_frequent", "baseline: most frequent training caption"),
    ("nearest_image", "baseline: caption of the nearest training image"),
)


def _all_gather(obj):
    _, world = dist_info()
    if world == 1:
        return [obj]
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, obj)
    return parts


def _load_batch(paths, load_image) -> torch.Tensor:
    return torch.stack([load_image(p) for p in paths])


@torch.no_grad()
def decode_all(model, images: dict, load_image, opts: CaptionConfig) -> dict:
    """Caption of every image id (each rank a strided share, gathered)."""
    from r2d2.engine.tasks.caption.decoding import decode_captions

    rank, world = dist_info()
    ids = list(images)[rank::world]
    out = {}
    bs = opts.eval_batch_size
    for s in range(0, len(ids), bs):
        chunk = ids[s : s + bs]
        caps = decode_captions(model, _load_batch([images[i] for i in chunk], load_image), opts)
        out.update(zip(chunk, caps))
    merged: dict = {}
    for part in _all_gather(out):
        merged.update(part)
    return {i: merged[i] for i in images}


@torch.no_grad()
def embed_images(model, paths: list[str], load_image, batch_size: int) -> torch.Tensor:
    """``[N, E]`` image embeddings (CPU, fp32), each rank a share (``sharded_encode``)."""
    from r2d2.engine.tasks.rerank import sharded_encode

    if not paths:
        return torch.zeros(0, model.config.embed_dim)
    was = model.training
    model.eval()
    try:
        out = sharded_encode(
            lambda s, e: model.encode_image(_load_batch(paths[s:e], load_image).to(model.device)),
            len(paths),
            batch_size,
        )
    finally:
        model.train(was)
    return out.cpu()


def loadable(records, load_image, limit: int) -> tuple[list, Counter]:
    """The first ``limit`` records with distinct images that load, and what was skipped."""
    from r2d2.engine.tasks.evaluate import undecodable_images

    seen, pool = set(), []
    for r in records:
        if r.image not in seen:
            seen.add(r.image)
            pool.append(r)
        if len(pool) >= limit:
            break
    bad = undecodable_images([r.image for r in pool], load_image)
    skipped = Counter()
    if bad:
        skipped["corrupt_image"] = sum(r.image in bad for r in pool)
    return [r for r in pool if r.image not in bad], skipped


def baselines(model, images: dict, train_records, load_image, opts: CaptionConfig) -> dict:
    """The two baselines' captions by image id, and notes: ``{"most_frequent": {...},
    "nearest_image": {...}, "pool": n, "notes": [...]}``."""
    notes: list[str] = []
    counts = Counter(r.text for r in train_records)
    top, n_top = counts.most_common(1)[0]
    out: dict = {
        "most_frequent": {i: top for i in images},
        "most_frequent_caption": top,
        "most_frequent_count": n_top,
        "train_captions": len(train_records),
    }
    pool, skipped = loadable(train_records, load_image, opts.baseline_pool)
    if skipped:
        notes.append(f"nearest-image pool: skipped {dict(skipped)}")
    if not pool:
        notes.append("nearest-image baseline: no training image loads")
        return {**out, "notes": notes}
    ids = list(images)
    q = embed_images(model, [images[i] for i in ids], load_image, opts.eval_batch_size)
    g = embed_images(model, [r.image for r in pool], load_image, opts.eval_batch_size)
    nearest = (q @ g.t()).argmax(1).tolist()
    out["nearest_image"] = {i: pool[j].text for i, j in zip(ids, nearest)}
    out["pool"] = len(pool)
    return {**out, "notes": notes}


def evaluate_captions(
    model,
    records,
    load_image,
    opts: CaptionConfig,
    train_records=None,
    skipped: int = 0,
    skip_reasons: dict | None = None,
) -> dict:
    """The report: scores of the model (and of the baselines when ``train_records`` is given)
    on ``records`` (held-out image-caption pairs, several captions per image allowed)."""
    from r2d2.engine.tasks.caption.metrics import score_captions

    images, refs = group_references(records)
    hyps = {"model": decode_all(model, images, load_image, opts)}
    report: dict = {
        "evaluation": "image captioning",
        "n_images": len(images),
        "n_references": sum(len(v) for v in refs.values()),
        "decoding": {
            k: getattr(opts, k)
            for k in (
                "strategy",
                "beam_size",
                "length_penalty",
                "max_length",
                "min_length",
                "no_repeat_ngram",
                "top_p",
                "temperature",
                "seed",
            )
        },
        "prompt": getattr(getattr(model, "caption", None), "prompt", ""),
        "tokenize": opts.eval_tokenize,
        "skipped": skipped,
        "skip_reasons": dict(skip_reasons or {}),
        "notes": [],
    }
    if train_records and opts.baselines:
        b = baselines(model, images, train_records, load_image, opts)
        report["notes"] += b.pop("notes")
        for name, _ in ROWS[1:]:
            if name in b:
                hyps[name] = b.pop(name)
        report["baseline_info"] = b
    elif opts.baselines:
        report["notes"].append("no training captions known: baselines not measured")
    report["scores"] = {
        name: score_captions(refs, h, tokenize=opts.eval_tokenize) for name, h in hyps.items()
    }
    ids = list(images)[: opts.eval_samples]
    report["samples"] = [
        {
            "image": images[i],
            "references": refs[i],
            **{name: h[i] for name, h in hyps.items()},
        }
        for i in ids
    ]
    return report


def table(report: dict) -> str:
    """The scores as an aligned text table: one row per captioner / baseline."""
    scores = report["scores"]
    names = next(iter(scores.values())).keys()
    labels = {k: v for k, v in ROWS}
    w = max(len(labels.get(k, k)) for k in scores)
    head = " " * w + "".join(f"  {n:>7}" for n in names)
    lines = [head]
    for k, s in scores.items():
        lines.append(f"{labels.get(k, k):<{w}}" + "".join(f"  {s[n]:7.1f}" for n in names))
    return "\n".join(lines)


def write_report(report: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, REPORT_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    return path


def print_report(report: dict, where: str) -> None:
    d = report["decoding"]
    how = (
        f"beam {d['beam_size']}, length penalty {d['length_penalty']}"
        if d["strategy"] == "beam" and d["beam_size"] > 1
        else ("greedy" if d["strategy"] != "sample" else f"top-p {d['top_p']}, seed {d['seed']}")
    )
    print(
        f"captioning on {report['n_images']} held-out images of {where} ({how}; "
        f"{report['tokenize']} tokens; scores x100):"
    )
    if report["skipped"]:
        print(f"  skipped {report['skipped']}: {report['skip_reasons']}")
    for n in report["notes"]:
        print(f"  note: {n}")
    print(table(report), flush=True)


def train_records_of(data_cfg, size: int | None = None):
    """The training split's records (for the baselines), or None when they cannot be listed
    (a WebDataset stream: the baselines then need ``caption.baseline_path``)."""
    from r2d2.engine.data.readers import read_records
    from r2d2.engine.data.synthetic import read_synthetic

    if data_cfg.format == "synthetic":
        return read_synthetic(size or data_cfg.synthetic_size, "train", data_cfg.seed).records
    if data_cfg.format == "webdataset" or not data_cfg.path:
        return None
    return read_records(data_cfg.format, data_cfg.path, data_cfg.image_root).records


def options_dict(opts: CaptionConfig) -> dict:
    return dataclasses.asdict(opts)


def load_captioner(checkpoint: str, device: torch.device):
    """An R2D2Captioner from a ``save_pretrained`` folder (a captioner's, or an R2D2 model's:
    then a captioner started from it, not fine-tuned)."""
    from safetensors import SafetensorError

    from r2d2.engine.model.captioner import R2D2Captioner
    from r2d2.engine.tasks.evaluate import EvalError

    try:  # safetensors: data only, never unpickled
        model = R2D2Captioner.from_pretrained(checkpoint)
    except SafetensorError as e:
        raise EvalError(
            f"--checkpoint {checkpoint}: model.safetensors is not a safetensors file ({e})"
        ) from None
    except (KeyError, TypeError) as e:
        raise EvalError(f"--checkpoint {checkpoint}: not a captioner config ({e})") from None
    if model.tokenizer is None:
        from r2d2.engine.tokenizer import build_tokenizer

        model.tokenizer = build_tokenizer(max_length=model.config.max_text_len)
    return model.to(device).eval()


def run_eval(cfg, checkpoint: str) -> dict:
    """``r2d2 eval caption``: the split of ``cfg.data`` (an ``EvalConfig``), the captioner of
    ``checkpoint``, the baselines from the training captions (the synthetic training split, or
    ``caption.baseline_path`` read in ``data.format``); writes ``caption_eval.json`` to
    ``cfg.out``."""
    from r2d2.engine.data.readers import read_records
    from r2d2.engine.data.synthetic import read_synthetic
    from r2d2.engine.tasks import evaluate as base

    d, c = cfg.data, cfg.caption
    model = load_captioner(checkpoint, base._device(cfg.device))
    if d.vocab is not None:
        from r2d2.engine.tokenizer import build_tokenizer

        model.tokenizer = build_tokenizer(d.vocab, max_length=model.config.max_text_len)
    load_image = base.make_load_image(model)
    read, _, _ = base._read(cfg)
    records = read.records
    if d.limit:  # the first N images, every caption of each
        keep = list(dict.fromkeys(r.image_id for r in records))[: d.limit]
        keep = set(keep)
        records = [r for r in records if r.image_id in keep]
    if d.check_images:
        read, records, _ = base.drop_undecodable(read, records, None, load_image)
    if not records:
        raise base.EvalError(
            f"{d.path or 'the synthetic split'}: no usable caption (skipped {read.skipped}: "
            f"{dict(read.reasons)})"
        )
    train = None
    if c.baselines and d.format == "synthetic":
        # the training split of the tiny presets (data.synthetic_size 20000): the same most
        # frequent caption and nearest-image pool as their end-of-run evaluation
        train = read_synthetic(max(c.baseline_pool, 20000), "train", d.seed).records
    elif c.baselines and c.baseline_path:
        fmt = d.format if d.format in ("jsonl", "tsv") else f"ccmb_{d.format}"
        train = read_records(fmt, c.baseline_path, c.baseline_image_root or d.image_root).records
    report = evaluate_captions(
        model, records, load_image, c, train, read.skipped, dict(read.reasons)
    )
    report["checkpoint"] = checkpoint
    report["split"] = d.path or "the synthetic held-out split"
    report["data"] = dataclasses.asdict(d)
    if dist_info()[0] == 0:
        write_report(report, cfg.out)
    return report
