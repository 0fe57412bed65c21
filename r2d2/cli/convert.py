"""``r2d2 convert``: turn an official R2D2 release checkpoint into a ``save_pretrained`` folder, or
re-save a training checkpoint of an earlier format as plain data.

    r2d2 convert official CKPT OUT [--preset large-released] [--vocab vocab.txt] [--strict]
    r2d2 convert checkpoint OLD NEW --trust-source

The fine-tuning presets (``configs/finetune_ccmb_*.yaml``) start from such a folder
(``train.init_from``). With ``--preset`` the preset is the target and every key must fit it.
Without it the model's shapes are read off the checkpoint (``hf_io.infer_official_config``) and
the attention head counts, which no shape tells, from the checkpoint's own config
(``hf_io.official_heads``); a checkpoint without one needs ``--preset`` (exit 2).
``--vocab`` attaches the release's ``vocab.txt`` (RoBERTa-wwm-ext, 21128 tokens), so the folder
tokenizes Chinese text exactly as the release does; without it the folder carries no tokenizer
and the engine's generated vocabulary would not match the release's embedding rows.

``convert checkpoint`` re-saves a training checkpoint that ``--resume`` / ``train.init_from``
refuse because loading it needs pickled code (one written before checkpoints became plain data
holds its numpy RNG state as a numpy object). It loads OLD with full unpickling, which runs any
code the file carries: ``--trust-source`` says you trust where the file came from, and nothing is
loaded without it. NEW is plain data and loads with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r2d2 convert", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    off = sub.add_parser(
        "official",
        help="an official R2D2 release checkpoint (.pth / .bin / "
        ".safetensors) -> a save_pretrained folder",
    )
    off.add_argument(
        "checkpoint",
        help="the release file (keys visual_encoder.*, text_encoder.*, "
        "text_joint_layer.*, img_joint_layer.*, ...)",
    )
    off.add_argument("out", help="folder to write (config.json, model.safetensors, vocab.txt)")
    off.add_argument(
        "--preset",
        default=None,
        help="target model preset (e.g. large-released, base); default: shapes from the "
        "weights, head counts from the checkpoint's config (required when it has none)",
    )
    off.add_argument("--vocab", default=None, help="the release's vocab.txt to attach")
    off.add_argument(
        "--strict", action="store_true", help="refuse keys that are missing or have no counterpart"
    )
    off.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    ck = sub.add_parser(
        "checkpoint",
        help="re-save a training checkpoint of an earlier format as plain "
        "data (needs --trust-source: loading OLD runs its code)",
    )
    ck.add_argument("old", help="the checkpoint file to re-save")
    ck.add_argument("new", help="the file to write (may be OLD itself with --force)")
    ck.add_argument(
        "--trust-source",
        action="store_true",
        help="load OLD with full unpickling, which runs any code it carries: only for files "
        "whose source you trust",
    )
    ck.add_argument("--force", action="store_true", help="overwrite an existing NEW")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.what == "checkpoint":
        return _resave(args)
    from r2d2.engine.hf_io import infer_official_config, official_heads, read_checkpoint_file
    from r2d2.engine.model import R2D2Model, model_preset
    from r2d2.engine.tokenizer import build_tokenizer

    if not os.path.exists(args.checkpoint):
        print(f"r2d2 convert: no such checkpoint {args.checkpoint!r}", file=sys.stderr)
        return 2  # usage: exit 2, like every r2d2 command (cli.py)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        print(
            f"r2d2 convert: {args.out!r} is not empty (pass --force to overwrite)", file=sys.stderr
        )
        return 2  # usage: exit 2, like every r2d2 command (cli.py)
    if args.vocab is not None and not os.path.isfile(args.vocab):
        print(f"r2d2 convert: no such vocab file {args.vocab!r}", file=sys.stderr)
        return 2  # usage: exit 2, like every r2d2 command (cli.py)
    try:
        sd, own = read_checkpoint_file(args.checkpoint)  # data only: weights_only / safetensors
        if args.preset:
            config = model_preset(args.preset)
        else:
            heads = official_heads(own)
            if heads is None:
                print(
                    f"r2d2 convert: {args.checkpoint} has no config saying its attention head counts, "
                    "which the weights' shapes cannot tell: pass --preset (large-released for the "
                    "official R2D2 ViT-L release)",
                    file=sys.stderr,
                )
                return 2
            config = infer_official_config(sd, heads)
            print(
                f"r2d2 convert: attention heads from the checkpoint's config: vision {heads[0]}, "
                f"text {heads[1]}"
            )
        model = R2D2Model.from_official(sd, config=config, strict=args.strict)
    except (ValueError, RuntimeError, KeyError) as e:
        print(f"r2d2 convert: {e}", file=sys.stderr)
        return 1
    if args.vocab is not None:
        tok = build_tokenizer(args.vocab, max_length=model.config.max_text_len)
        if tok.vocab_size != model.config.text.vocab_size:
            print(
                f"r2d2 convert: {args.vocab!r} has {tok.vocab_size} tokens but the checkpoint's "
                f"embedding has {model.config.text.vocab_size} rows",
                file=sys.stderr,
            )
            return 1
        model.tokenizer = tok
    model.save_pretrained(args.out)
    r = model.load_report
    print(
        f"r2d2 convert: wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters); missing {len(r.missing)}, unexpected {len(r.unexpected)}, "
        f"unused by design {len(r.unused)}"
    )
    for name, keys in (("missing (left at init)", r.missing), ("unexpected", r.unexpected)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
            print(f"  {name}: {shown}")
    return 0


def _resave(args) -> int:
    """``r2d2 convert checkpoint OLD NEW --trust-source``."""
    from r2d2.engine.checkpoint import CheckpointError, resave_trusted

    if not os.path.isfile(args.old):
        print(f"r2d2 convert: no such checkpoint file {args.old!r}", file=sys.stderr)
        return 2
    if not args.trust_source:
        print(
            f"r2d2 convert: re-saving {args.old} loads it with full unpickling, which runs any code "
            "the file carries; pass --trust-source if you trust where it came from",
            file=sys.stderr,
        )
        return 2
    same = os.path.exists(args.new) and os.path.samefile(args.old, args.new)
    if os.path.exists(args.new) and not args.force:
        print(
            f"r2d2 convert: {args.new!r} exists (pass --force to overwrite{' OLD in place' if same else ''})",
            file=sys.stderr,
        )
        return 2
    try:
        ck = resave_trusted(args.old, args.new)
    except (CheckpointError, TypeError, OSError) as e:
        print(
            f"r2d2 convert: {args.old}: {e}" if isinstance(e, TypeError) else f"r2d2 convert: {e}",
            file=sys.stderr,
        )
        return 1
    step = (ck.get("state") or {}).get("step")
    print(
        f"r2d2 convert: wrote {args.new} (plain data, loads with weights_only=True"
        + (f"; step {step})" if step is not None else ")")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
