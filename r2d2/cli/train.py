"""``r2d2 pretrain`` and ``r2d2 finetune``: parse, build the Trainer, fit, export, evaluate.

    r2d2 pretrain --config configs/tiny.yaml --out runs/demo [--resume] [--section.field=value ...]
    torchrun --nproc_per_node=8 -m r2d2 pretrain --config configs/base.yaml --out runs/base

The run folder gets ``config.yaml`` (the resolved config), ``log.jsonl``, ``tb/``, ``loss.png``,
``checkpoints/`` and, at the end, ``model/`` (``save_pretrained``, what ``r2d2 eval`` loads) and
``eval.json`` (retrieval on the held-out split, headed "zero-shot retrieval" after pretrain and
"retrieval after <task> fine-tuning" after finetune, also printed as R@1/5/10: pre-rank,
and pre-rank + ITM re-rank of the top ``train.eval_rerank_k`` when the model has cross encoders).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from r2d2.engine.cli import UsageError, check_out_dir, guarded
from r2d2.engine.config import ConfigError, RunConfig, load_config, parse_overrides


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"r2d2 {cmd}",
        description=f"R2D2 {cmd}. Any config field can be overridden as --section.field=value "
                    "(sections: model, loss, data, optim, kernels, train, distributed, logging), "
                    "e.g. --train.max_steps=100 --train.log_every=5 --train.checkpoint_every=50.")
    p.add_argument("--config", help="YAML preset (configs/*.yaml); fields not given keep their defaults")
    p.add_argument("--out", required=True, help="run folder (created; holds logs, checkpoints, model)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the newest checkpoint in --out")
    return p


def parse(cmd: str, argv: list[str]) -> tuple[RunConfig, argparse.Namespace]:
    args, rest = _parser(cmd).parse_known_args(argv)
    cfg = load_config(args.config, rest)
    if cmd == "pretrain" and cfg.train.task != "pretrain":
        raise ConfigError(f"r2d2 pretrain runs train.task=pretrain, the config says {cfg.train.task!r} "
                          "(use r2d2 finetune)")
    if cmd == "finetune" and cfg.train.task == "pretrain":
        raise ConfigError("r2d2 finetune needs train.task=retrieval or matching, the config says 'pretrain'")
    args.init_from_given = "init_from" in (parse_overrides(rest).get("train") or {})
    return cfg, args


@guarded("r2d2 pretrain")
def pretrain(argv: list[str]) -> int:
    return _main("pretrain", argv)


@guarded("r2d2 finetune")
def finetune(argv: list[str]) -> int:
    return _main("finetune", argv)


def check_inputs(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Everything the command line and config name must exist, and ``--out`` must be writable,
    before a model is built: each a one-line :class:`UsageError` (exit status 2)."""
    from r2d2.engine.data.loader import check_data_source

    check_data_source(cfg.data, eval_too=cfg.train.eval_at_end)  # MissingDataError: a UsageError
    v = cfg.data.vocab
    if v is not None and not os.path.isfile(v):
        raise UsageError(f"data.vocab={v!r}: no such file (expected a BERT vocab.txt, one token per "
                         "line; null = the built-in vocabulary)")
    p = cfg.train.init_from
    if p and not os.path.exists(p):
        rel = "" if os.path.isabs(p) else f", relative to the current directory {os.getcwd()}"
        msg = (f"train.init_from={p!r}: no such file or directory{rel} (expected a save_pretrained "
               "folder such as <run>/model, a run folder or a checkpoint file)")
        if not args.init_from_given:  # the preset's own default is missing: say how to make it
            src = f"the preset {args.config}" if args.config else "the config"
            demo = os.path.normpath(p).replace(os.sep, "/").endswith("runs/demo/model")
            msg += (f"; {src} starts from it: " + ("run bash scripts/demo.sh first, or " if demo else "")
                    + "pass --train.init_from=<folder>")
        raise UsageError(msg)
    check_out_dir(args.out)


def _main(cmd: str, argv: list[str]) -> int:
    cfg, args = parse(cmd, argv)
    from r2d2.dist import dist_info, is_dist
    from r2d2.engine.trainer import Trainer, TrainingError

    rank, _ = dist_info()
    if rank == 0:
        for note in getattr(cfg, "notes", []):
            print(note, flush=True)
    out = args.out
    latest = os.path.join(out, "checkpoints", "latest")
    if not args.resume and os.path.exists(latest):
        raise UsageError(f"{out} already holds a run (checkpoints/latest); pass --resume to continue "
                         "it or choose another --out")
    if args.resume and not os.path.exists(latest):
        raise UsageError(f"--resume but {latest} does not exist")
    check_inputs(cfg, args)
    try:
        trainer = Trainer(cfg, out, resume=args.resume)
        if rank == 0:
            if cfg.train.init_from:
                print(f"initialised from train.init_from={cfg.train.init_from}", flush=True)
            os.makedirs(out, exist_ok=True)
            cfg.save(os.path.join(out, "config.yaml"))
        result = trainer.fit()
        if not result.stopped_by_signal:
            model = plain_model(trainer)
            export(model, trainer, os.path.join(out, "model"))
            if cfg.train.eval_at_end:
                evaluate_heldout(trainer, out, model)
    except TrainingError as e:  # a run that cannot go on: one line, exit 1 (DataError: guarded)
        print(f"r2d2 {cmd}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        if is_dist():
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def plain_model(trainer):
    """The student model with ordinary (unsharded) parameters on every rank: FSDP2's sharded
    parameters are gathered into a fresh copy; otherwise the trained model itself."""
    if trainer.strategy != "fsdp":
        return trainer.model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from r2d2.engine.model import R2D2Model

    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    plain = R2D2Model(trainer.model.config, kernels=trainer.cfg.kernels)
    plain.load_state_dict({k: v.detach().cpu() for k, v in sd.items()})
    return plain.to(trainer.device)


def export(model, trainer, path: str) -> None:
    """``save_pretrained`` of the student model (rank 0), with the tokenizer vocabulary."""
    from r2d2.dist import dist_info

    rank, _ = dist_info()
    if rank != 0 or not hasattr(model, "save_pretrained"):
        return
    if getattr(model, "tokenizer", None) is None and trainer.tokenizer is not None:
        model.tokenizer = trainer.tokenizer  # so save_pretrained writes vocab.txt next to the weights
    model.save_pretrained(path)


def no_eval_reason(cfg, model) -> str | None:
    """Why ``train.eval_at_end`` cannot evaluate this run (one line), or None when it can."""
    d = cfg.data
    if not hasattr(model, "encode_image"):
        return f"the model ({type(model).__name__}) has no encode_image"
    if d.format != "synthetic" and not d.eval_path:
        return (f"data.eval_path is not set (data.format={d.format} has no built-in held-out split); "
                "set it to a held-out annotation file, or --train.eval_at_end=false")
    return None


def evaluate_heldout(trainer, out: str, model=None) -> dict | None:
    """Dual-encoder retrieval on the held-out split (zero-shot after pretrain); prints R@1/5/10
    under a heading that says which, writes eval.json.

    Like ``r2d2 eval``, every held-out image is loaded once up front (each rank a share); one that
    is present but does not decode is left out with its pairs and counted (``corrupt_image``),
    beside what the reader skipped (missing images, empty captions), in eval.json's ``skipped`` /
    ``skip_reasons`` and the printed summary. Matching sets' mismatched pairs (label 0) are no
    retrieval ground truth and are left out too. Returns None (after one printed line saying why)
    when there is nothing to evaluate."""
    import torch

    from r2d2.dist import dist_info
    from r2d2.engine.data.loader import read_eval
    from r2d2.engine.data.records import DataError
    from r2d2.engine.data.synthetic import open_image
    from r2d2.engine.data.transforms import eval_transform
    from r2d2.engine.tasks.cli import drop_undecodable
    from r2d2.engine.tasks.retrieval import RetrievalEvalConfig, RetrievalSet, evaluate_retrieval

    model = trainer.model if model is None else model
    rank, _ = dist_info()
    why = no_eval_reason(trainer.cfg, model)
    if why is not None:
        if rank == 0:
            print(f"no end-of-run evaluation: {why}", flush=True)
        return None
    read = read_eval(trainer.cfg.data)
    records = [r for r in read.records if r.label != 0]
    mismatched = len(read.records) - len(records)
    tf = eval_transform(trainer.image_size)
    canvas = max(64, trainer.image_size)

    def load(key: str) -> torch.Tensor:
        return tf(open_image(key, canvas))

    read, records, _ = drop_undecodable(read, records, None, load)
    reasons = read.reasons
    skipped = sum(reasons.values())
    where = trainer.cfg.data.eval_path or "the synthetic held-out split"
    if not records:
        raise DataError(f"end-of-run evaluation: no usable pair in {where} (skipped {skipped}: "
                        f"{dict(reasons)}); the trained model is in {os.path.join(out, 'model')}")
    rset = RetrievalSet.from_records(records)
    k = trainer.cfg.train.eval_rerank_k
    rerank = k > 0 and getattr(getattr(model, "config", None), "has_cross", False)
    res = evaluate_retrieval(model, rset, trainer.tokenize, load,
                             RetrievalEvalConfig(k=max(k, 1), rerank=rerank, image_cache_dtype="float32"))
    m = res.pre_rank
    task = trainer.cfg.train.task
    # by what it is: a pre-trained model meets the held-out set zero-shot; a fine-tuned one was
    # trained for it (retrieval) or next to it (matching: the ITM heads, evaluated here as
    # dual-encoder retrieval)
    title = "zero-shot retrieval" if task == "pretrain" else f"retrieval after {task} fine-tuning"
    report = {"evaluation": title, "split": "held-out", "n_images": res.n_images, "n_texts": res.n_texts,
              "chance_r1_i2t": 100.0 * sum(len(t) for t in rset.img2txt) / len(rset.img2txt) / res.n_texts,
              "chance_r1_t2i": 100.0 * sum(len(i) for i in rset.txt2img) / len(rset.txt2img) / res.n_images,
              **m, "skipped": skipped, "skip_reasons": dict(reasons)}
    if mismatched:
        report["mismatched_pairs_left_out"] = mismatched
    if res.two_stage is not None:
        report["rerank_k"] = k
        report["pre_rank+rank"] = res.two_stage
    if rank == 0:
        with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"{report['evaluation']} on {res.n_images} held-out images / {res.n_texts} texts "
              f"(chance R@1 ~ {report['chance_r1_i2t']:.1f}% i2t, {report['chance_r1_t2i']:.1f}% t2i):")
        if skipped:
            print(f"  skipped {skipped} held-out pairs of {where}: {dict(reasons)}")
        rows = [("pre-rank", m)]
        if res.two_stage is not None:
            rows.append((f"pre-rank + ITM re-rank of the top {k}", res.two_stage))
        for title, r in rows:
            if len(rows) > 1:
                print(f"  {title}:")
            print(f"  image->text  R@1 {r['i2t_r1']:.1f}  R@5 {r['i2t_r5']:.1f}  R@10 {r['i2t_r10']:.1f}")
            print(f"  text->image  R@1 {r['t2i_r1']:.1f}  R@5 {r['t2i_r5']:.1f}  R@10 {r['t2i_r10']:.1f}")
            print(f"  mean recall {r['mean_recall']:.1f}", flush=True)
    return report
