"""``r2d2 caption --checkpoint DIR IMAGE... [--beam N | --greedy | --top-p P --seed S] [--max-len N]``

Prints ``path<TAB>caption`` for every image, in the order given. ``--checkpoint`` is a captioner's
``save_pretrained`` folder (``<run>/model`` of a ``train.task=caption`` run) or such a run folder.
Decoding defaults to the settings saved with the model (``caption.*`` of its run); ``--beam N``
(beam search), ``--greedy`` and ``--top-p P`` (nucleus sampling, ``--seed`` for another draw,
``--temperature``) override them. An image that is missing or does not decode is one line on
stderr (``r2d2 caption: PATH: why``); the others are still captioned, and the exit status is 1
at the end. A checkpoint that does not exist or is no captioner: exit status 2 before any image.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from r2d2.cli import guarded
from r2d2.engine.errors import UsageError


def _parse(argv):
    p = argparse.ArgumentParser(prog="r2d2 caption", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="captioner save_pretrained folder or run")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--beam", type=int, metavar="N", help="beam search with N beams")
    how.add_argument("--greedy", action="store_true", help="greedy decoding")
    how.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling with top_p P")
    p.add_argument("--seed", type=int, help="sampling seed (with --top-p)")
    p.add_argument("--temperature", type=float, help="sampling temperature (with --top-p)")
    p.add_argument("--max-len", type=int, metavar="N", help="most generated tokens")
    p.add_argument("--min-len", type=int, metavar="N", help="fewest caption tokens")
    p.add_argument("--length-penalty", type=float, help="beam search length penalty")
    p.add_argument("--no-repeat-ngram", type=int, metavar="N", help="ban repeated n-grams")
    p.add_argument("--batch-size", type=int, default=16, help="images per decoding batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p, p.parse_args(argv)


def _options(model, args):
    changes: dict = {}
    if args.beam is not None:
        changes.update(strategy="beam", beam_size=args.beam)
    elif args.greedy:
        changes.update(strategy="greedy")
    elif args.top_p is not None:
        changes.update(strategy="sample", top_p=args.top_p)
    for flag, field in (
        ("seed", "seed"),
        ("temperature", "temperature"),
        ("max_len", "max_length"),
        ("min_len", "min_length"),
        ("length_penalty", "length_penalty"),
        ("no_repeat_ngram", "no_repeat_ngram"),
    ):
        v = getattr(args, flag)
        if v is not None:
            changes[field] = v
    if "max_length" in changes and "min_length" not in changes:
        changes["min_length"] = min(model.caption.min_length, changes["max_length"] - 1)
    try:
        return dataclasses.replace(model.caption, **changes)
    except ValueError as e:  # a ConfigError naming the caption.* field
        raise UsageError(str(e)) from None


@guarded("r2d2 caption")
def main(argv: list[str] | None = None) -> int:
    from r2d2.engine.tasks.caption.decoding import decode_captions
    from r2d2.engine.tasks.caption.evaluate import load_captioner
    from r2d2.engine.tasks.evaluate import _device, make_load_image, resolve_checkpoint

    p, args = _parse(sys.argv[1:] if argv is None else argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    checkpoint = resolve_checkpoint(args.checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise UsageError(f"--checkpoint {args.checkpoint}: no config.json (not a model folder)")
    model = load_captioner(checkpoint, _device(args.device))
    opts = _options(model, args)
    load = make_load_image(model)
    failed = 0
    ready: list[tuple[str, torch.Tensor]] = []

    def flush():
        if ready:
            caps = decode_captions(model, torch.stack([x for _, x in ready]), opts)
            for (path, _), c in zip(ready, caps):
                print(f"{path}\t{c}", flush=True)
            ready.clear()

    for path in args.images:
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError("no such file")
            ready.append((path, load(path)))
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated, bad data
            failed += 1
            why = getattr(e, "strerror", None) or str(e).splitlines()[0] or type(e).__name__
            print(f"r2d2 caption: {path}: {why}", file=sys.stderr, flush=True)
            continue
        if len(ready) >= args.batch_size:
            flush()
    flush()
    if failed:
        print(f"r2d2 caption: {failed} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0
