"""``r2d2 eval retrieval|matching|zeroshot --config CFG --checkpoint DIR [--out DIR] [--a.b=v ...]``

Reads the evaluation split named by the config, loads the model from ``--checkpoint`` (a
``save_pretrained`` directory), evaluates, and writes into the run folder (``--out``, default the
config's ``out``):

    eval_<task>.json    the metrics, the resolved config, the reader's skip counts
    eval_<task>.md      a Markdown table of the metrics
    recall_at_k.png     retrieval only: recall@k curves, pre-rank vs pre-rank + rank

Under ``torchrun`` every rank loads and encodes its shard of the images and texts (the embeddings
are all-gathered) and scores the cross-encoder pairs of its own images; rank 0 writes the files.
Config schema: :class:`EvalConfig`; overrides ``--section.field=value``. ``--checkpoint`` takes
a ``save_pretrained`` folder or a training run folder (its ``model/``, as ``train.init_from``
does). Exit status, as for every ``r2d2`` command: 2 when the command cannot run as given,
before anything is loaded (a bad config: a data format the task cannot serve, an unknown
field (argparse's message); a checkpoint, annotation file, image pool or class-names file that
does not exist; an ``--out`` that cannot be written), 1 when the evaluation started and failed
(a matching run on a PRD2 model, a malformed annotation line, no usable record); each is the one
line ``r2d2 eval <task>: error: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from r2d2.dist import dist_info, is_dist
from r2d2.engine.cli import RunError, UsageError, check_out_dir, debug
from r2d2.engine.data.ccmb import (CLASSIFICATION_FORMATS, FORMATS, MATCHING_FORMATS, RETRIEVAL_FORMATS,
                                   read_ccmb, read_zeroshot)
from r2d2.engine.metrics import ranks_of_targets
from r2d2.engine.tasks.retrieval import RetrievalEvalConfig, RetrievalSet, evaluate_retrieval
from r2d2.engine.tasks.zeroshot import DEFAULT_TEMPLATES, check_templates

TASKS = ("retrieval", "matching", "zeroshot")
EVAL_FORMATS = FORMATS + ("synthetic",)
# Which data formats each task evaluates. icm / iqm are refused for retrieval: their label-0 pairs
# are deliberate mismatches, so treating every pair as ground truth would reward wrong matches.
TASK_FORMATS = {"retrieval": RETRIEVAL_FORMATS + ("synthetic",),
                "matching": MATCHING_FORMATS + ("synthetic",),
                "zeroshot": CLASSIFICATION_FORMATS}


class EvalError(ValueError, RunError):
    """A user-facing evaluation error found while evaluating (one line, exit status 1)."""


@dataclass
class EvalDataConfig:
    """Which split to evaluate and how to read it (see ``r2d2.engine.data.ccmb``)."""

    format: str = "icr"
    """one of r2d2.engine.data.ccmb.FORMATS, or synthetic (the embedded set's held-out split,
    no files: retrieval, and matching against mismatched captions)"""
    path: str = ""
    """annotation file (or class-folder root for zeroshot)"""
    image_root: str | None = None
    """image folder; default: the annotation file's folder"""
    captions: str | None = None
    """coco_cn: the captions file (default imageid.human-written-caption.txt beside path)"""
    gallery: str | None = None
    """muge: the split's image pool every query is ranked against, <split>_imgs.tsv (or a folder
    of the unpacked images); default <split>_imgs.tsv beside path"""
    classnames: str | None = None
    """zeroshot: class-names file, one per line"""
    limit: int | None = None
    """evaluate only the first N records (quick checks; MUGE: the first N query-item pairs
    against their own images plus the first N images of the pool)"""
    vocab: str | None = None
    """tokenizer vocab.txt; default: the checkpoint's, else the project's built-in vocabulary"""
    max_text_len: int | None = None
    """tokens per text; default: the model's max_text_len (what it was trained with)"""
    synthetic_size: int = 200
    """synthetic: held-out pairs (the pre-training run's data.synthetic_eval_size)"""
    seed: int = 0
    """synthetic: the data seed of the pre-training run"""
    check_images: bool = True
    """load every image once before evaluating (each rank its share, threaded): an image that is
    present but cannot be decoded is left out with its pairs (and from a MUGE pool) and counted
    as corrupt_image, instead of stopping the run at its first batch"""

    def __post_init__(self) -> None:
        if self.format not in EVAL_FORMATS:
            raise ValueError(f"data.format must be one of {EVAL_FORMATS}, got {self.format!r}")
        if self.synthetic_size < 2:
            raise ValueError(f"data.synthetic_size must be >= 2, got {self.synthetic_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {self.limit}")
        if self.max_text_len is not None and self.max_text_len < 2:
            raise ValueError(f"data.max_text_len must be >= 2, got {self.max_text_len}")


@dataclass
class MatchingEvalConfig:
    batch_size: int = 64
    """pairs per cross-encoder call"""
    threshold: float = 0.5
    """accuracy threshold on (p_ti + p_it) / 2"""


@dataclass
class ZeroShotEvalConfig:
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """Chinese prompt templates, each with one {} for the class name"""
    batch_size: int = 64
    """images per encoder call"""

    def __post_init__(self) -> None:
        check_templates(self.templates)


@dataclass
class EvalConfig:
    task: str = "retrieval"
    """retrieval | matching | zeroshot (the subcommand overrides it)"""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    matching: MatchingEvalConfig = field(default_factory=MatchingEvalConfig)
    zeroshot: ZeroShotEvalConfig = field(default_factory=ZeroShotEvalConfig)
    out: str = "runs/eval"
    """run folder for the JSON, Markdown and plot"""
    device: str = "auto"
    """auto (cuda if available, per local rank) | cpu | cuda | cuda:N"""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.data.format not in TASK_FORMATS[self.task]:
            hint = {"icm": " (a matching set: r2d2 eval matching; its retrieval twin is icr)",
                    "iqm": " (a matching set: r2d2 eval matching; its retrieval twin is iqr)",
                    "icr": " (no labels: matching needs icm)", "iqr": " (no labels: matching needs iqm)"}
            raise ValueError(f"data.format={self.data.format!r} cannot be evaluated by "
                             f"`r2d2 eval {self.task}`{hint.get(self.data.format, '')}; "
                             f"{self.task} reads {TASK_FORMATS[self.task]}")


def _build(cls, values: dict, where: str):
    """Dataclass ``cls`` from a dict, recursing into dataclass fields; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, f"{where}.{name}".strip("."))
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a wrong type reaching a comparison in __post_init__
        raise ValueError(f"{where or 'config'}: {e}") from None


def _set_override(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--{dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)  # YAML typing: 64 -> int, null -> None, [a, b] -> list


def load_eval_config(path: str | None, overrides: list[str], task: str) -> EvalConfig:
    tree: dict = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config: no such file {path}")
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r} must look like --section.field=value")
        key, _, raw = item[2:].partition("=")
        _set_override(tree, key, raw)
    tree["task"] = task
    return _build(EvalConfig, tree, "")


# --------------------------------------------------------------------------- model-side adapters
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
        raise UsageError(f"--checkpoint {checkpoint}: no such folder (expected a save_pretrained "
                         "folder, e.g. <run>/model, or a run folder)")
    inner = os.path.join(checkpoint, "model")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")) and \
            os.path.isfile(os.path.join(inner, "config.json")):
        return inner
    return checkpoint


def load_model(checkpoint: str, device: torch.device):
    from r2d2.engine.model import R2D2Model

    if not os.path.isdir(checkpoint):
        raise UsageError(f"--checkpoint {checkpoint}: not a save_pretrained folder")
    from safetensors import SafetensorError

    try:  # safetensors: data only, never unpickled
        model = R2D2Model.from_pretrained(checkpoint)
    except SafetensorError as e:  # e.g. a pickle renamed model.safetensors
        raise EvalError(f"--checkpoint {checkpoint}: model.safetensors is not a safetensors file ({e})") from None
    return model.to(device).eval()


def check_inputs(cfg: EvalConfig) -> None:
    """The files and folders the config names must exist, checked before a model is loaded: a
    one-line :class:`UsageError` (exit status 2) naming the field."""
    d = cfg.data
    if d.format == "synthetic":
        return
    if not d.path:
        raise UsageError(f"data.path is required for data.format={d.format}")
    named = [("data.path", d.path), ("data.image_root", d.image_root), ("data.vocab", d.vocab),
             ("data.classnames", d.classnames), ("data.gallery", d.gallery)]
    if d.format == "coco_cn":
        named.append(("data.captions", d.captions))
    for name, path in named:
        if path and not os.path.exists(path):
            raise UsageError(f"{name}={path!r}: no such file or folder")
    if d.format == "muge" and not d.gallery:
        from r2d2.engine.data.ccmb import default_muge_gallery

        if default_muge_gallery(d.path) is None:
            raise UsageError(f"MUGE ranks every query against the split's whole image pool: set "
                             f"data.gallery to <split>_imgs.tsv (or the unpacked image folder); no "
                             f"<split>_imgs.tsv beside {d.path}")


def make_tokenize(model, cfg: EvalDataConfig, checkpoint: str):
    """``texts -> (input_ids, attention_mask)`` padded to ``data.max_text_len``: the checkpoint's
    vocabulary (loaded by from_pretrained) unless ``data.vocab`` names another, else the built-in
    one, exactly as the trainer tokenises."""
    from r2d2.engine.data.loader import Tokenize
    from r2d2.engine.tokenizer import build_tokenizer

    max_len = cfg.max_text_len or getattr(getattr(model, "config", None), "max_text_len", 64)
    tok = getattr(model, "tokenizer", None)
    if cfg.vocab is not None or tok is None:
        tok = build_tokenizer(cfg.vocab, max_length=max_len)
    return Tokenize(tok, max_len)


def make_load_image(model):
    """``path -> [3, S, S]`` with the engine's eval transform at the model's resolution; synthetic
    keys render on a ``max(64, S)`` canvas, exactly as the trainer's end-of-run evaluation."""
    from r2d2.engine.data.synthetic import open_image
    from r2d2.engine.data.transforms import eval_transform

    size = getattr(getattr(model, "config", None), "image_size", 224)
    tf = eval_transform(size)
    canvas = max(64, size)
    return lambda path: tf(open_image(path, canvas))


def synthetic_eval_set(task: str, size: int, seed: int):
    """The embedded set's held-out split as an evaluation set: the pairs themselves for
    retrieval; for matching, each pair (label 1) plus the image with the next caption that
    differs from its own (label 0)."""
    from r2d2.engine.data.records import ReadResult, Record
    from r2d2.engine.data.synthetic import read_synthetic

    if task == "zeroshot":
        raise ValueError("data.format=synthetic serves retrieval and matching; zeroshot needs an "
                         "image folder or list file (data.path) and class names")
    recs = read_synthetic(size, "eval", seed).records
    if task == "retrieval":
        return ReadResult(records=recs)
    out = []
    for i, r in enumerate(recs):
        neg = next((recs[(i + j) % len(recs)].text for j in range(1, len(recs))
                    if recs[(i + j) % len(recs)].text != r.text), None)
        out.append(Record(r.image, r.text, r.image_id, 1))
        if neg is not None:
            out.append(Record(r.image, neg, r.image_id, 0))
    return ReadResult(records=out)


# --------------------------------------------------------------------------------- reporting
def recall_curve(scores: torch.Tensor, targets, max_k: int) -> np.ndarray:
    ranks = ranks_of_targets(scores.numpy(), targets)
    return np.array([100.0 * np.mean(ranks < k) for k in range(1, max_k + 1)])


def plot_recall(curves: dict[str, np.ndarray], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, y in curves.items():
        ax.plot(np.arange(1, len(y) + 1), y, label=label, linestyle="--" if "pre-rank only" in label else "-")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(task: str, metrics: dict, notes: list[str] | None = None) -> str:
    notes = list(notes or [])
    if task == "retrieval":
        keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"]
        head = "| stage | " + " | ".join(keys) + " |"
        rows = [head, "|" + "---|" * (len(keys) + 1)]
        for stage in ("pre_rank", "pre_rank+rank"):
            if metrics.get(stage):
                rows.append(f"| {stage} | " + " | ".join(f"{metrics[stage][k]:.2f}" for k in keys) + " |")
        text = "\n".join(rows) + (f"\n\n{metrics['n_images']} images, {metrics['n_texts']} texts, "
                                  f"re-rank k = {metrics['k']}; mean_recall = mean of "
                                  f"{metrics.get('mean_recall_of', 'the six recalls')}\n")
        notes = list(metrics.get("notes") or []) + notes
    else:
        keys = ["auc", "accuracy"] if task == "matching" else ["top1", "top5"]
        fmt = {"auc": "{:.4f}"}
        rows = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                "| " + " | ".join(fmt.get(k, "{:.2f}").format(metrics[k]) for k in keys) + " |"]
        text = "\n".join(rows) + "\n"
    return text + "".join(f"\nNote: {n}\n" for n in notes)


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
        from r2d2.engine.data.ccmb import default_muge_gallery

        opts["gallery"] = d.gallery or default_muge_gallery(d.path)
    read = read_ccmb(d.format, d.path, d.image_root, **opts)
    gallery = None
    if d.format == "muge":
        gallery = read.gallery
        if gallery is None:
            raise EvalError(f"MUGE ranks every query against the split's whole image pool: set "
                            f"data.gallery to <split>_imgs.tsv (or the unpacked image folder); no "
                            f"<split>_imgs.tsv beside {d.path}")
    return read, None, gallery


def undecodable_images(paths: list[str], load_image, threads: int = 8) -> set[str]:
    """The files among ``paths`` that ``load_image`` (the evaluation's own loader: a full decode
    and the eval transform) cannot load. Synthetic keys are rendered, never files. Under torchrun
    each rank loads a strided share and the findings are all-gathered."""
    from concurrent.futures import ThreadPoolExecutor

    from r2d2.engine.data.synthetic import PREFIX

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


# ------------------------------------------------------------------------------------- main
def run(cfg: EvalConfig, checkpoint: str) -> dict:
    d = cfg.data
    device = _device(cfg.device)
    model = load_model(checkpoint, device)
    if cfg.task == "matching" and not getattr(getattr(model, "config", None), "has_cross", True):
        raise EvalError(f"matching scores pairs with the ITM heads of the cross encoders; {checkpoint} "
                        "is a dual-encoder model (PRD2, cross_layers=0). Evaluate it with "
                        "`r2d2 eval retrieval` (pre-rank) or `r2d2 eval zeroshot`")
    tokenize = make_tokenize(model, d, checkpoint)
    load_image = make_load_image(model)
    read, classnames, gallery = _read(cfg)
    records = read.records[: d.limit] if d.limit else read.records
    if not records:
        raise EvalError(f"{d.path}: no usable records (skipped {read.skipped}: {dict(read.reasons)})")
    notes: list[str] = []
    if gallery is not None and d.limit:
        named = {r.image_id for r in records}
        gallery = [g for g in gallery if g[1] in named] + [g for g in gallery[: d.limit] if g[1] not in named]
        notes.append(f"data.limit={d.limit}: the gallery is cut to {len(gallery)} images, a quick "
                     "check, not the MUGE protocol (the whole pool)")
    if d.check_images:
        read, records, gallery = drop_undecodable(read, records, gallery, load_image)
        if not records:
            raise EvalError(f"{d.path}: no record has an image that decodes (skipped "
                            f"{read.skipped}: {dict(read.reasons)})")
    report: dict = {"task": cfg.task, "checkpoint": checkpoint, "data": dataclasses.asdict(d),
                    "skipped": read.skipped, "skip_reasons": dict(read.reasons)}
    curves = None
    if cfg.task == "retrieval":
        rset = RetrievalSet.from_records(records, gallery, protocol="t2i" if d.format == "muge" else "both")
        res = evaluate_retrieval(model, rset, tokenize, load_image, cfg.retrieval)
        metrics = res.to_dict()
        metrics["notes"] = res.notes + notes
        notes = []
        report["config"] = dataclasses.asdict(cfg.retrieval)
        max_k = min(50, len(rset.texts), len(rset.images))
        rows = rset.queried_images
        i2t_t = [rset.img2txt[i] for i in rows]
        curves = {"i2t pre-rank only": recall_curve(res.sim_i2t[rows], i2t_t, max_k),
                  "t2i pre-rank only": recall_curve(res.sim_i2t.t(), rset.txt2img, max_k)}
        if res.scores_i2t is not None:
            curves["i2t pre-rank + rank"] = recall_curve(res.scores_i2t[rows], i2t_t, max_k)
            curves["t2i pre-rank + rank"] = recall_curve(res.scores_t2i, rset.txt2img, max_k)
    elif cfg.task == "matching":
        from r2d2.engine.tasks.matching import evaluate_matching

        metrics = evaluate_matching(model, records, tokenize, load_image, cfg.matching.batch_size,
                                    cfg.matching.threshold).to_dict()
        report["config"] = dataclasses.asdict(cfg.matching)
    else:
        from r2d2.engine.tasks.zeroshot import evaluate_zeroshot

        metrics = evaluate_zeroshot(model, records, classnames, tokenize, load_image,
                                    cfg.zeroshot.templates, cfg.zeroshot.batch_size).to_dict()
        report["config"] = dataclasses.asdict(cfg.zeroshot)
    report["metrics"] = metrics
    report["notes"] = list(metrics.get("notes", [])) + notes
    if dist_info()[0] == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, f"eval_{cfg.task}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=2)
        with open(os.path.join(cfg.out, f"eval_{cfg.task}.md"), "w", encoding="utf-8") as f:
            title = os.path.basename(d.path) if d.path else f"held-out split ({d.synthetic_size} pairs)"
            f.write(f"# {cfg.task}: {d.format} {title}\n\n" + markdown_table(cfg.task, metrics, notes))
        if curves:
            plot_recall(curves, os.path.join(cfg.out, "recall_at_k.png"), f"{d.format}: recall@k")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="r2d2 eval", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--config", help="YAML eval config (configs/eval_*.yaml)")
    p.add_argument("--checkpoint", required=True,
                   help="model folder written by save_pretrained, or a training run folder (its model/)")
    p.add_argument("--out", help="run folder (overrides the config's out)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = load_eval_config(args.config, rest, args.task)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    if args.out:
        cfg.out = args.out
    if os.environ.get("WORLD_SIZE", "1") != "1" and not is_dist():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        check_inputs(cfg)
        check_out_dir(cfg.out)
        if checkpoint != args.checkpoint and dist_info()[0] == 0:
            print(f"--checkpoint {args.checkpoint} is a run folder: evaluating its model/ ({checkpoint})",
                  flush=True)
        report = run(cfg, checkpoint)
    except (UsageError, ValueError, OSError) as e:
        # UsageError (and a FileNotFoundError: an input that is not there): 2; bad input found
        # while evaluating (EvalError, a reader's file:line error, an unreadable file): 1
        if debug():
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        msg = " ".join(str(e).split())
        print(f"r2d2 eval {args.task}: error: {msg}", file=sys.stderr)
        if is_dist():
            torch.distributed.destroy_process_group()
        return 2 if isinstance(e, (UsageError, FileNotFoundError)) else 1
    if dist_info()[0] == 0:
        print(markdown_table(cfg.task, report["metrics"],
                             None if cfg.task == "retrieval" else report["notes"]), end="")
        print(f"wrote {cfg.out}/eval_{cfg.task}.json" + (f" (skipped {report['skipped']}: "
              f"{report['skip_reasons']})" if report["skipped"] else ""))
    if is_dist():
        torch.distributed.destroy_process_group()
    return 0
