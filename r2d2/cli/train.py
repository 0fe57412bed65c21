"""``r2d2 pretrain`` and ``r2d2 finetune``: parse, check the inputs, build the Trainer, fit,
export (:func:`r2d2.engine.objective.export_pretrained`), evaluate
(:func:`r2d2.engine.tasks.heldout.evaluate_heldout`).

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
import gc
import os
import sys

import torch.distributed as dist

from r2d2.cli import UsageError, check_out_dir, guarded
from r2d2.dist import dist_info, is_dist
from r2d2.engine.config import ConfigError, RunConfig, load_config, parse_overrides
from r2d2.engine.data.loader import check_data_source
from r2d2.engine.objective import export_pretrained, missing_input_file
from r2d2.engine.parallel import plain_model
from r2d2.engine.tasks.heldout import evaluate_heldout
from r2d2.engine.trainer import Trainer, TrainingError


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"r2d2 {cmd}",
        description=f"R2D2 {cmd}. Any config field can be overridden as --section.field=value "
        "(sections: model, loss, data, optim, kernels, train, distributed, logging, caption, t2i), "
        "e.g. --train.max_steps=100 --train.log_every=5 --train.checkpoint_every=50.",
    )
    p.add_argument(
        "--config", help="YAML preset (configs/*.yaml); fields not given keep their defaults"
    )
    p.add_argument(
        "--out", required=True, help="run folder (created; holds logs, checkpoints, model)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue exactly from the newest checkpoint in --out"
    )
    return p


def parse(cmd: str, argv: list[str]) -> tuple[RunConfig, argparse.Namespace]:
    args, rest = _parser(cmd).parse_known_args(argv)
    cfg = load_config(args.config, rest)
    if cmd == "pretrain" and cfg.train.task != "pretrain":
        raise ConfigError(
            f"r2d2 pretrain runs train.task=pretrain, the config says {cfg.train.task!r} "
            "(use r2d2 finetune)"
        )
    if cmd == "finetune" and cfg.train.task == "pretrain":
        raise ConfigError(
            "r2d2 finetune needs train.task=retrieval, matching, caption or t2i, the config says "
            "'pretrain'"
        )
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
    check_data_source(cfg.data, eval_too=cfg.train.eval_at_end)  # MissingDataError: a UsageError
    msg = missing_input_file(cfg)
    if msg is not None:
        p = cfg.train.init_from
        if msg.startswith("train.init_from=") and not args.init_from_given:
            # the preset's own default is missing: say how to make it
            src = f"the preset {args.config}" if args.config else "the config"
            demo = os.path.normpath(p).replace(os.sep, "/").endswith("runs/demo/model")
            msg += (
                f"; {src} starts from it: "
                + ("run bash scripts/demo.sh first, or " if demo else "")
                + "pass --train.init_from=<folder>"
            )
        raise UsageError(msg)
    check_out_dir(args.out)


def _main(cmd: str, argv: list[str]) -> int:
    cfg, args = parse(cmd, argv)
    rank, _ = dist_info()
    if rank == 0:
        for note in getattr(cfg, "notes", []):
            print(note, flush=True)
    out = args.out
    latest = os.path.join(out, "checkpoints", "latest")
    if not args.resume and os.path.exists(latest):
        raise UsageError(
            f"{out} already holds a run (checkpoints/latest); pass --resume to continue "
            "it or choose another --out"
        )
    if args.resume and not os.path.exists(latest):
        raise UsageError(f"--resume but {latest} does not exist")
    check_inputs(cfg, args)
    trainer = model = None
    try:
        trainer = Trainer(cfg, out, resume=args.resume)
        if trainer.rank == 0:  # the group is joined now: before, every process said rank 0
            if cfg.train.init_from:
                print(f"initialised from train.init_from={cfg.train.init_from}", flush=True)
            os.makedirs(out, exist_ok=True)
            cfg.save(os.path.join(out, "config.yaml"))
        result = trainer.fit()
        if not result.stopped_by_signal:
            model = plain_model(trainer)
            export_pretrained(model, trainer.tokenizer, os.path.join(out, "model"))
            if cfg.train.eval_at_end:
                evaluate_heldout(trainer, out, model)
    except TrainingError as e:  # a run that cannot go on: one line, exit 1 (DataError: guarded)
        print(f"r2d2 {cmd}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        # DDP's reducer holds the gloo group: freed after destroy_process_group (when this frame
        # unwinds), its destructor joins a gloo thread that waits on the peer that already left.
        trainer = model = None
        gc.collect()
        if is_dist():
            dist.destroy_process_group()
    return 0
