"""The ``r2d2`` command: a thin router; each subcommand lives in its own module.

    r2d2 doctor                          what this machine can run
    r2d2 pretrain  --config ... [--section.field=value ...]
    r2d2 finetune  --config ... [...]
    r2d2 eval retrieval|matching|zeroshot --config ... --checkpoint ...
    r2d2 bench [kernels|step|all] [--quick]
    r2d2 convert official CKPT OUT [--preset large-released] [--vocab vocab.txt]

Global options (before the command): ``-q``/``--quiet`` shows only warnings, ``-v``/``--verbose``
adds debug messages; ``R2D2_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) sets the level when neither
is given. The default, INFO, shows which backend each kernel op's ``auto`` picked, once per
(op, device type), on stderr.

Works as ``python -m r2d2 ...`` too, which is what ``torchrun -m r2d2`` calls.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# subcommand -> (module, function, one-line help); modules are imported only when used, so
# `r2d2 doctor` works even where the heavier pieces cannot import.
COMMANDS = {
    "doctor": ("r2d2.engine.doctor", "main", "print torch/CUDA/triton/extension state and backend picks"),
    "pretrain": ("r2d2.engine.train_cli", "pretrain", "R2D2 pre-training (GCPR + FGR + MLM + TgD + FgD)"),
    "finetune": ("r2d2.engine.train_cli", "finetune", "fine-tuning on a downstream set"),
    "eval": ("r2d2.engine.tasks.cli", "main", "retrieval / matching / zero-shot evaluation"),
    "bench": ("r2d2.engine.bench_cli", "main", "kernel and training-step benchmarks"),
    "convert": ("r2d2.engine.convert_cli", "main", "official R2D2 checkpoint -> save_pretrained folder"),
}


LOG_FORMAT = "%(levelname).1s %(name)s: %(message)s"  # e.g. "I r2d2.kernels: distill_kl on ..."


def _usage() -> str:
    lines = ["usage: r2d2 [-q | -v] <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "options:", "  -q, --quiet    warnings and errors only",
              "  -v, --verbose  debug messages too",
              "  (or R2D2_LOG_LEVEL=DEBUG|INFO|WARNING|ERROR; default INFO, to stderr)"]
    return "\n".join(lines)


def configure_logging(level: int | str | None = None) -> logging.Logger:
    """Send the ``r2d2`` logger's records at ``level`` (default: ``R2D2_LOG_LEVEL``, else INFO) to
    stderr, one concise line each. Only the ``r2d2`` logger is touched, never the root logger, and
    it stops propagating so that a root handler set up elsewhere does not print each line twice.
    Calling it again only changes the level."""
    if level is None:
        level = os.environ.get("R2D2_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        name = level.strip().upper()
        value = logging.getLevelName(name)
        if not isinstance(value, int):
            raise ValueError(f"R2D2_LOG_LEVEL={level!r} is not a level; expected DEBUG, INFO, "
                             "WARNING or ERROR")
        level = value
    logger = logging.getLogger("r2d2")
    logger.setLevel(level)
    if not any(getattr(h, "_r2d2_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._r2d2_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    level: int | None = None
    while argv and argv[0] in ("-q", "--quiet", "-v", "--verbose"):
        level = logging.WARNING if argv.pop(0) in ("-q", "--quiet") else logging.DEBUG
    try:
        configure_logging(level)
    except ValueError as e:
        print(f"r2d2: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from r2d2 import __version__

        print(__version__)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"r2d2: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    rc = getattr(importlib.import_module(module), func)(argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
