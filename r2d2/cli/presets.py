"""``r2d2 presets``: the YAML presets that ship with the package, by name, with the first line of
each file's header comment; ``--config NAME`` takes any of them (r2d2/engine/config.py's
resolution rule), ``r2d2 presets --path NAME`` prints where one lives, to copy and edit."""

from __future__ import annotations

import argparse

from r2d2.cli import UsageError, guarded


def _summary(path: str) -> str:
    """The first comment line of a preset (its description), or its ``base:``."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if s.startswith("#") and s.strip("# "):
                return s.lstrip("# ").strip()
            if s and not s.startswith("#"):
                break
    return ""


@guarded("r2d2 presets")
def main(argv: list[str] | None = None) -> int:
    from r2d2.engine.config import PRESETS_DIR, preset_names, preset_path

    ap = argparse.ArgumentParser(prog="r2d2 presets", description=__doc__.splitlines()[0])
    ap.add_argument("--path", metavar="NAME", help="print the file of preset NAME and exit")
    args = ap.parse_args(argv)
    if args.path:
        path = preset_path(args.path)
        if path is None:
            raise UsageError(f"--path {args.path}: no such preset ({', '.join(preset_names())})")
        print(path)
        return 0
    names = preset_names()
    width = max((len(n) for n in names), default=0)
    print(f"presets in {PRESETS_DIR} (--config NAME):")
    for name in names:
        print(f"  {name:<{width}}  {_summary(preset_path(name))}")
    return 0
