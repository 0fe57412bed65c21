"""``r2d2 eval retrieval|matching|zeroshot|caption|t2i --config CFG --checkpoint DIR [--out DIR] [--a.b=v ...]``

Reads the evaluation split named by the config, loads the model from ``--checkpoint`` (a
``save_pretrained`` directory, or a training run folder: its ``model/``, as ``train.init_from``
does), evaluates (:mod:`r2d2.engine.tasks.evaluate`) and writes into the run folder (``--out``,
default the config's ``out``). Config schema: :class:`r2d2.engine.tasks.config.EvalConfig`,
read like the training config: a YAML file with ``base:``, then ``--section.field=value``
overrides. Exit status, as for every ``r2d2`` command: 2 when the command cannot run as given,
before anything is loaded (a bad config: a data format the task cannot serve, an unknown
field; a checkpoint, annotation file, image pool or class-names file that does not exist; an
``--out`` that cannot be written), 1 when the evaluation started and failed (a matching run on
a PRD2 model, a malformed annotation line, no usable record); each is the one line
``r2d2 eval <task>: error: ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

from r2d2.cli import check_out_dir, debug
from r2d2.dist import dist_info, is_dist
from r2d2.engine.errors import UsageError
from r2d2.engine.tasks import evaluate
from r2d2.engine.tasks.config import TASKS, load_eval_config
from r2d2.engine.tasks.report import markdown_table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="r2d2 eval", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--config", help="YAML eval config (configs/eval_*.yaml)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model folder written by save_pretrained, or a training run folder (its model/)",
    )
    p.add_argument("--out", help="run folder (overrides the config's out)")
    p.add_argument(
        "--r2d2",
        help="t2i: the R2D2 folder that scores the images (default: the generator's own)",
    )
    args, rest = p.parse_known_args(argv)
    try:
        cfg = load_eval_config(args.config, rest, args.task)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    if args.out:
        cfg.out = args.out
    if args.r2d2:
        if cfg.task != "t2i":
            p.error("--r2d2 names the evaluator of r2d2 eval t2i only")
        cfg.t2i.evaluator = args.r2d2
    if os.environ.get("WORLD_SIZE", "1") != "1" and not is_dist():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        checkpoint = evaluate.resolve_checkpoint(args.checkpoint)
        evaluate.check_inputs(cfg)
        check_out_dir(cfg.out)
        if checkpoint != args.checkpoint and dist_info()[0] == 0:
            print(
                f"--checkpoint {args.checkpoint} is a run folder: evaluating its model/ ({checkpoint})",
                flush=True,
            )
        report = evaluate.run(cfg, checkpoint)
    except (UsageError, ValueError, OSError) as e:
        # UsageError (and a FileNotFoundError: an input that is not there): 2; bad input found
        # while evaluating (EvalError, a reader's file:line error, an unreadable file): 1
        if debug():
            traceback.print_exception(e, file=sys.stderr)
        msg = " ".join(str(e).split())
        print(f"r2d2 eval {args.task}: error: {msg}", file=sys.stderr)
        if is_dist():
            torch.distributed.destroy_process_group()
        return 2 if isinstance(e, (UsageError, FileNotFoundError)) else 1
    if dist_info()[0] == 0 and cfg.task == "t2i":
        print(f"wrote {cfg.out}/t2i_eval.json, grid.png and samples/")
    elif dist_info()[0] == 0 and cfg.task == "caption":
        from r2d2.engine.tasks.caption.evaluate import REPORT_NAME, print_report

        print_report(report, report["split"])
        print(f"wrote {cfg.out}/{REPORT_NAME}")
    elif dist_info()[0] == 0:
        print(
            markdown_table(
                cfg.task, report["metrics"], None if cfg.task == "retrieval" else report["notes"]
            ),
            end="",
        )
        print(
            f"wrote {cfg.out}/eval_{cfg.task}.json"
            + (
                f" (skipped {report['skipped']}: {report['skip_reasons']})"
                if report["skipped"]
                else ""
            )
        )
    if is_dist():
        torch.distributed.destroy_process_group()
    return 0
