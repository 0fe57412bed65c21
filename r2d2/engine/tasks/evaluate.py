"""The ``r2d2 eval`` runner: read the split an :class:`~r2d2.engine.tasks.config.EvalConfig`
names, load the model from a ``save_pretrained`` folder, evaluate, and write into ``cfg.out``:

    eval_<task>.json    the metrics, the resolved config, the reader's skip counts
    eval_<task>.md      a Markdown table of the metrics
    recall_at_k.png     retrieval only: recall@k curves, pre-rank vs pre-rank + rank

Under ``torchrun`` every rank loads and encodes its shard of the images and texts (the embeddings
are all-gathered) and scores the cross-encoder pairs of its own images; rank 0 writes the files.
Inputs the config names are checked before a model is loaded (:func:`check_inputs`, a
``UsageError``); what goes wrong while evaluating is an :class:`EvalError` (exit status 1).
Images that are present but do not decode are left out with their pairs and counted
(:func:`drop_undecodable`), here and in the trainer's end-of-run evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import SafetensorError

from r2d2.dist import dist_info
from r2d2.engine.data.ccmb import default_muge_gallery, read_ccmb, read_zeroshot
from r2d2.engine.data.loader import Tokenize
from r2d2.engine.data.records import ReadResult, Record
from r2d2.engine.data.synthetic import PREFIX, open_image, read_synthetic
from r2d2.engine.data.transforms import eval_transform
from r2d2.engine.errors import RunError, UsageError
from r2d2.engine.model import R2D2Model
from r2d2.engine.tasks.config import EvalConfig, EvalDataConfig
from r2d2.engine.tasks.matching import evaluate_matching
from r2d2.engine.tasks.report import markdown_table, plot_recall, recall_curve
from r2d2.engine.tasks.retrieval import RetrievalSet, evaluate_retrieval
from r2d2.engine.tasks.zeroshot import evaluate_zeroshot
from r2d2.engine.tokenizer import build_tokenizer


class EvalError(ValueError, RunError):
    """A user-facing evaluation error found while evaluating (one line, exit status 1)."""


def _device(spec: str) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_checkpoint(checkpoint: str) -> str:
    """The ``save_pretrained`` folder ``--checkpoint`` names: the folder itself, or for a
    training run folder (no ``config.json``, a ``model/`` that has one) its ``model/``, the folder
    ``train.init_from`` also takes from a run. A :class:`UsageError` when it names no folder."""
    if not os.path.isdir(checkpoint):
        raise UsageError(
            f"--checkpoint {checkpoint}: no such folder (expected a save_pretrained "
            "folder, e.g. <run>/model, or a run folder)"
        )
    inner = os.path.join(checkpoint, "model")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")) and os.path.isfile(
        os.path.join(inner, "config.json")
    ):
        return inner
    return checkpoint


def load_model(checkpoint: str, device: torch.device):
    if not os.path.isdir(checkpoint):
        raise UsageError(f"--checkpoint {checkpoint}: not a save_pretrained folder")
    try:  # safetensors: data only, never unpickled
        model = R2D2Model.from_pretrained(checkpoint)
    except SafetensorError as e:  # e.g. a pickle renamed model.safetensors
        raise EvalError(
            f"--checkpoint {checkpoint}: model.safetensors is not a safetensors file ({e})"
        ) from None
    return model.to(device).eval()


def check_inputs(cfg: EvalConfig) -> None:
    """The files and folders the config names must exist, checked before a model is loaded: a
    one-line :class:`UsageError` (exit status 2) naming the field."""
    d = cfg.data
    if d.format == "synthetic":
        return
    if not d.path:
        raise UsageError(f"data.path is required for data.format={d.format}")
    named = [
        ("data.path", d.path),
        ("data.image_root", d.image_root),
        ("data.vocab", d.vocab),
        ("data.classnames", d.classnames),
        ("data.gallery", d.gallery),
    ]
    if d.format == "coco_cn":
        named.append(("data.captions", d.captions))
    for name, path in named:
        if path and not os.path.exists(path):
            raise UsageError(f"{name}={path!r}: no such file or folder")
    if d.format == "muge" and not d.gallery and default_muge_gallery(d.path) is None:
        raise UsageError(
            f"MUGE ranks every query against the split's whole image pool: set "
            f"data.gallery to <split>_imgs.tsv (or the unpacked image folder); no "
            f"<split>_imgs.tsv beside {d.path}"
        )


def make_tokenize(model, cfg: EvalDataConfig, checkpoint: str):
    """``texts -> (input_ids, attention_mask)`` padded to ``data.max_text_len``: the checkpoint's
    vocabulary (loaded by from_pretrained) unless ``data.vocab`` names another, else the built-in
    one, exactly as the trainer tokenises."""
    max_len = cfg.max_text_len or getattr(getattr(model, "config", None), "max_text_len", 64)
    tok = getattr(model, "tokenizer", None)
    if cfg.vocab is not None or tok is None:
        tok = build_tokenizer(cfg.vocab, max_length=max_len)
    return Tokenize(tok, max_len)


def make_load_image(model):
    """``path -> [3, S, S]`` with the engine's eval transform at the model's resolution; synthetic
    keys render on a ``max(64, S)`` canvas, exactly as the trainer's end-of-run evaluation."""
    size = getattr(getattr(model, "config", None), "image_size", 224)
    tf = eval_transform(size)
    canvas = max(64, size)
    return lambda path: tf(open_image(path, canvas))


def synthetic_eval_set(task: str, size: int, seed: int):
    """The embedded set's held-out split as an evaluation set: the pairs themselves for
    retrieval; for matching, each pair (label 1) plus the image with the next caption that
    differs from its own (label 0)."""
    if task == "zeroshot":
        raise ValueError(
            "data.format=synthetic serves retrieval and matching; zeroshot needs an "
            "image folder or list file (data.path) and class names"
        )
    recs = read_synthetic(size, "eval", seed).records
    if task in ("retrieval", "caption", "t2i"):
        return ReadResult(records=recs)
    out = []
    for i, r in enumerate(recs):
        neg = next(
            (
                recs[(i + j) % len(recs)].text
                for j in range(1, len(recs))
                if recs[(i + j) % len(recs)].text != r.text
            ),
            None,
        )
        out.append(Record(r.image, r.text, r.image_id, 1))
        if neg is not None:
            out.append(Record(r.image, neg, r.image_id, 0))
    return ReadResult(records=out)


def _read(cfg: EvalConfig):
    """(ReadResult, classnames or None, gallery or None) of the configured split."""
    d = cfg.data
    if d.format == "synthetic":
        return synthetic_eval_set(cfg.task, d.synthetic_size, d.seed), None, None
    if cfg.task == "zeroshot":
        read, classnames = read_zeroshot(d.path, d.image_root, d.classnames)
        return read, classnames, None
    opts = {"captions": d.captions} if d.format == "coco_cn" and d.captions else {}
    if d.format == "muge":
        opts["gallery"] = d.gallery or default_muge_gallery(d.path)
    read = read_ccmb(d.format, d.path, d.image_root, **opts)
    gallery = None
    if d.format == "muge":
        gallery = read.gallery
        if gallery is None:
            raise EvalError(
                f"MUGE ranks every query against the split's whole image pool: set "
                f"data.gallery to <split>_imgs.tsv (or the unpacked image folder); no "
                f"<split>_imgs.tsv beside {d.path}"
            )
    return read, None, gallery


def undecodable_images(paths: list[str], load_image, threads: int = 8) -> set[str]:
    """The files among ``paths`` that ``load_image`` (the evaluation's own loader: a full decode
    and the eval transform) cannot load. Synthetic keys are rendered, never files. Under torchrun
    each rank loads a strided share and the findings are all-gathered."""

    def fails(path: str) -> bool:
        try:
            load_image(path)
            return False
        except (OSError, ValueError, SyntaxError):  # PIL: unidentified, truncated, bad data
            return True

    files = sorted({p for p in paths if not p.startswith(PREFIX)})
    rank, world = dist_info()
    mine = files[rank::world]
    with ThreadPoolExecutor(max(1, min(threads, len(mine)))) as pool:
        bad = [p for p, failed in zip(mine, pool.map(fails, mine)) if failed]
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, bad)
        bad = [p for part in parts for p in part]
    return set(bad)


def drop_undecodable(read, records: list, gallery, load_image):
    """``(read, records, gallery)`` without the images that do not decode: the records (pairs)
    and MUGE pool entries of such an image are left out, each counted in ``read`` as
    ``corrupt_image``."""
    bad = undecodable_images([r.image for r in records] + [p for p, _ in gallery or ()], load_image)
    if not bad:
        return read, records, gallery
    kept = [r for r in records if r.image not in bad]
    n = len(records) - len(kept)
    if gallery is not None:
        n += sum(p in bad for p, _ in gallery)
        gallery = [g for g in gallery if g[0] not in bad]
    reasons = read.reasons.copy()
    reasons["corrupt_image"] += n
    return dataclasses.replace(read, skipped=read.skipped + n, reasons=reasons), kept, gallery


def run(cfg: EvalConfig, checkpoint: str) -> dict:
    if cfg.task == "t2i":  # a generator, scored by an R2D2 evaluator (t2i_eval.json)
        from r2d2.engine.tasks.t2i.evaluate import run_eval as run_t2i

        return run_t2i(cfg, checkpoint, _device(cfg.device))
    if cfg.task == "caption":  # its own model class, runner and report (caption_eval.json)
        from r2d2.engine.tasks.caption.evaluate import run_eval

        return run_eval(cfg, checkpoint)
    d = cfg.data
    device = _device(cfg.device)
    model = load_model(checkpoint, device)
    if cfg.task == "matching" and not getattr(getattr(model, "config", None), "has_cross", True):
        raise EvalError(
            f"matching scores pairs with the ITM heads of the cross encoders; {checkpoint} "
            "is a dual-encoder model (PRD2, cross_layers=0). Evaluate it with "
            "`r2d2 eval retrieval` (pre-rank) or `r2d2 eval zeroshot`"
        )
    tokenize = make_tokenize(model, d, checkpoint)
    load_image = make_load_image(model)
    read, classnames, gallery = _read(cfg)
    records = read.records[: d.limit] if d.limit else read.records
    if not records:
        raise EvalError(
            f"{d.path}: no usable records (skipped {read.skipped}: {dict(read.reasons)})"
        )
    notes: list[str] = []
    if gallery is not None and d.limit:
        named = {r.image_id for r in records}
        gallery = [g for g in gallery if g[1] in named] + [
            g for g in gallery[: d.limit] if g[1] not in named
        ]
        notes.append(
            f"data.limit={d.limit}: the gallery is cut to {len(gallery)} images, a quick "
            "check, not the MUGE protocol (the whole pool)"
        )
    if d.check_images:
        read, records, gallery = drop_undecodable(read, records, gallery, load_image)
        if not records:
            raise EvalError(
                f"{d.path}: no record has an image that decodes (skipped "
                f"{read.skipped}: {dict(read.reasons)})"
            )
    report: dict = {
        "task": cfg.task,
        "checkpoint": checkpoint,
        "data": dataclasses.asdict(d),
        "skipped": read.skipped,
        "skip_reasons": dict(read.reasons),
    }
    curves = None
    if cfg.task == "retrieval":
        rset = RetrievalSet.from_records(
            records, gallery, protocol="t2i" if d.format == "muge" else "both"
        )
        res = evaluate_retrieval(model, rset, tokenize, load_image, cfg.retrieval)
        metrics = res.to_dict()
        metrics["notes"] = res.notes + notes
        notes = []
        report["config"] = dataclasses.asdict(cfg.retrieval)
        max_k = min(50, len(rset.texts), len(rset.images))
        rows = rset.queried_images
        i2t_t = [rset.img2txt[i] for i in rows]
        curves = {
            "i2t pre-rank only": recall_curve(res.sim_i2t[rows], i2t_t, max_k),
            "t2i pre-rank only": recall_curve(res.sim_i2t.t(), rset.txt2img, max_k),
        }
        if res.scores_i2t is not None:
            curves["i2t pre-rank + rank"] = recall_curve(res.scores_i2t[rows], i2t_t, max_k)
            curves["t2i pre-rank + rank"] = recall_curve(res.scores_t2i, rset.txt2img, max_k)
    elif cfg.task == "matching":
        metrics = evaluate_matching(
            model, records, tokenize, load_image, cfg.matching.batch_size, cfg.matching.threshold
        ).to_dict()
        report["config"] = dataclasses.asdict(cfg.matching)
    else:
        metrics = evaluate_zeroshot(
            model,
            records,
            classnames,
            tokenize,
            load_image,
            cfg.zeroshot.templates,
            cfg.zeroshot.batch_size,
        ).to_dict()
        report["config"] = dataclasses.asdict(cfg.zeroshot)
    report["metrics"] = metrics
    report["notes"] = list(metrics.get("notes", [])) + notes
    if dist_info()[0] == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, f"eval_{cfg.task}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=2)
        with open(os.path.join(cfg.out, f"eval_{cfg.task}.md"), "w", encoding="utf-8") as f:
            title = (
                os.path.basename(d.path) if d.path else f"held-out split ({d.synthetic_size} pairs)"
            )
            f.write(
                f"# {cfg.task}: {d.format} {title}\n\n" + markdown_table(cfg.task, metrics, notes)
            )
        if curves:
            plot_recall(curves, os.path.join(cfg.out, "recall_at_k.png"), f"{d.format}: recall@k")
    return report
