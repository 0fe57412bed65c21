"""``r2d2 convert``: turn an official R2D2 release checkpoint into a ``save_pretrained`` folder.

    r2d2 convert official CKPT OUT [--preset large-released] [--vocab vocab.txt] [--strict]

The fine-tuning presets (``configs/finetune_ccmb_*.yaml``) start from such a folder
(``train.init_from``). Without ``--preset`` the model's shapes are read off the checkpoint
(``hf_io.infer_official_config``); with it, the preset is the target and every key must fit it.
``--vocab`` attaches the release's ``vocab.txt`` (RoBERTa-wwm-ext, 21128 tokens), so the folder
tokenizes Chinese text exactly as the release does; without it the folder carries no tokenizer
and the engine's generated vocabulary would not match the release's embedding rows.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r2d2 convert", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    off = sub.add_parser("official", help="an official R2D2 release checkpoint (.pth / .bin / "
                                          ".safetensors) -> a save_pretrained folder")
    off.add_argument("checkpoint", help="the release file (keys visual_encoder.*, text_encoder.*, "
                                        "text_joint_layer.*, img_joint_layer.*, ...)")
    off.add_argument("out", help="folder to write (config.json, model.safetensors, vocab.txt)")
    off.add_argument("--preset", default=None,
                     help="target model preset (e.g. large-released, base); default: from shapes")
    off.add_argument("--vocab", default=None, help="the release's vocab.txt to attach")
    off.add_argument("--strict", action="store_true",
                     help="refuse keys that are missing or have no counterpart")
    off.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from r2d2.engine.model import R2D2Model, model_preset
    from r2d2.engine.tokenizer import build_tokenizer

    if not os.path.exists(args.checkpoint):
        print(f"r2d2 convert: no such checkpoint {args.checkpoint!r}", file=sys.stderr)
        return 2  # usage: exit 2, like every r2d2 command (cli.py)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        print(f"r2d2 convert: {args.out!r} is not empty (pass --force to overwrite)",
              file=sys.stderr)
        return 2  # usage: exit 2, like every r2d2 command (cli.py)
    if args.vocab is not None and not os.path.isfile(args.vocab):
        print(f"r2d2 convert: no such vocab file {args.vocab!r}", file=sys.stderr)
        return 2  # usage: exit 2, like every r2d2 command (cli.py)
    try:
        config = model_preset(args.preset) if args.preset else None
        model = R2D2Model.from_official(args.checkpoint, config=config, strict=args.strict)
    except (ValueError, RuntimeError, KeyError) as e:
        print(f"r2d2 convert: {e}", file=sys.stderr)
        return 1
    if args.vocab is not None:
        tok = build_tokenizer(args.vocab, max_length=model.config.max_text_len)
        if tok.vocab_size != model.config.text.vocab_size:
            print(f"r2d2 convert: {args.vocab!r} has {tok.vocab_size} tokens but the checkpoint's "
                  f"embedding has {model.config.text.vocab_size} rows", file=sys.stderr)
            return 1
        model.tokenizer = tok
    model.save_pretrained(args.out)
    r = model.load_report
    print(f"r2d2 convert: wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters); missing {len(r.missing)}, unexpected {len(r.unexpected)}, "
          f"unused by design {len(r.unused)}")
    for name, keys in (("missing (left at init)", r.missing), ("unexpected", r.unexpected)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
            print(f"  {name}: {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
