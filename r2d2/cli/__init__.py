"""The ``r2d2`` command: the subcommand table and the exit-status rule; each subcommand is a
module of this package (``train``, ``eval``, ``caption``, ``generate``, ``bench``, ``convert``,
``doctor``, ``presets``), thin over the engine code it drives.

    r2d2 doctor [--build]                what this machine can run (--build: compile r2d2._C now)
    r2d2 presets                         the packaged presets (--config NAME or a path)
    r2d2 pretrain  --config ... [--section.field=value ...]
    r2d2 finetune  --config ... [...]
    r2d2 eval retrieval|matching|zeroshot|caption|t2i --config ... --checkpoint ...
    r2d2 caption --checkpoint DIR IMAGE... [--beam N | --greedy | --top-p P --seed S]
    r2d2 generate --checkpoint DIR "提示" [...] -o out.png [--seed --steps --guidance]
    r2d2 bench [kernels|step|all] [--quick]
    r2d2 convert official CKPT OUT [--preset large-released] [--vocab vocab.txt]

Global options (before the command): ``-q``/``--quiet`` shows only warnings, ``-v``/``--verbose``
adds debug messages; ``R2D2_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) sets the level when neither
is given. The default, INFO, shows which backend each kernel op's ``auto`` picked, once per
(op, device type), on stderr.

Works as ``python -m r2d2 ...`` too, which is what ``torchrun -m r2d2`` calls.

Exit status, the same for every command: 0 success; 2 the command cannot run as given (usage,
an invalid config value, a file or folder the command line or config names that does not exist,
an ``--out`` that cannot be written), found before any work starts; 1 the run started and
failed (unreadable or corrupt data, too many bad samples or non-finite steps, a checkpoint that
does not fit, a full disk). Each is one line on stderr, ``r2d2 <command>: <what is wrong>``;
``R2D2_DEBUG=1`` adds the traceback. An unexpected exception (a bug) prints its traceback and
exits 1. Commands raise :class:`UsageError` or :class:`RunError` (defined in
:mod:`r2d2.engine.errors`, or a subclass: ``ConfigError``, ``DataError``, ...) and
:func:`guarded` maps them, so calling a command's function directly gives the same status as
the ``r2d2`` command.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable

from r2d2 import __version__
from r2d2.engine.errors import RUN_EXIT, USAGE_EXIT, RunError, UsageError, exit_code

__all__ = [
    "COMMANDS",
    "RUN_EXIT",
    "USAGE_EXIT",
    "RunError",
    "UsageError",
    "check_out_dir",
    "configure_logging",
    "debug",
    "exit_code",
    "guarded",
    "main",
    "report_error",
]

# subcommand -> (module, function, one-line help); modules are imported only when used, so
# `r2d2 doctor` works even where the heavier pieces cannot import.
COMMANDS = {
    "doctor": (
        "r2d2.cli.doctor",
        "main",
        "print torch/CUDA/triton/extension state and backend picks",
    ),
    "pretrain": ("r2d2.cli.train", "pretrain", "R2D2 pre-training (GCPR + FGR + MLM + TgD + FgD)"),
    "finetune": ("r2d2.cli.train", "finetune", "fine-tuning on a downstream set"),
    "eval": (
        "r2d2.cli.eval",
        "main",
        "retrieval / matching / zero-shot / caption / t2i evaluation",
    ),
    "caption": ("r2d2.cli.caption", "main", "caption images with a fine-tuned captioner"),
    "generate": ("r2d2.cli.generate", "main", "images from Chinese prompts (text-to-image)"),
    "bench": ("r2d2.cli.bench", "main", "kernel and training-step benchmarks"),
    "convert": ("r2d2.cli.convert", "main", "official R2D2 checkpoint -> save_pretrained folder"),
    "presets": ("r2d2.cli.presets", "main", "list the packaged YAML presets (--config NAME)"),
}


def debug() -> bool:
    """``R2D2_DEBUG=1``: errors keep their traceback (for bug reports)."""
    return os.environ.get("R2D2_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def report_error(prog: str, e: BaseException) -> int | None:
    """Print ``prog: message`` (one line) for a clean error and return its status; None if ``e``
    is not one (the caller re-raises)."""
    code = exit_code(e)
    if code is None:
        return None
    if debug():
        traceback.print_exception(e, file=sys.stderr)
    if isinstance(e, (UsageError, RunError)):  # our own messages: one line, whatever they held
        msg = " ".join(str(e).split())
    else:  # a library's: its first line (R2D2_DEBUG=1 shows the rest)
        msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        if isinstance(e, OSError) and e.strerror:
            msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    print(f"{prog}: {msg}", file=sys.stderr, flush=True)
    return code


def guarded(prog: str) -> Callable:
    """Decorator of a command's ``main(argv) -> int``: clean errors become one line and their
    exit status (see the module docstring); ``argparse``'s own exit (2) passes through."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(argv: list[str] | None = None) -> int:
            try:
                return int(fn(argv) or 0)
            except Exception as e:
                code = report_error(prog, e)
                if code is None:
                    raise
                return code

        return run

    return wrap


def check_out_dir(path: str, flag: str = "--out") -> str:
    """Create the output folder ``path`` if needed and make sure a file can be written in it,
    before any work: a :class:`UsageError` (one line) for an existing file, a path under a file,
    a read-only file system or a folder without write permission. Returns ``path``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        why = e.strerror or type(e).__name__
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            why = "a part of the path is a file, not a folder"
        raise UsageError(f"{flag} {path}: cannot write there ({why})") from None
    return path


LOG_FORMAT = "%(levelname).1s %(name)s: %(message)s"  # e.g. "I r2d2.kernels: distill_kl on ..."


def _usage() -> str:
    lines = ["usage: r2d2 [-q | -v] <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -q, --quiet    warnings and errors only",
        "  -v, --verbose  debug messages too",
        "  (or R2D2_LOG_LEVEL=DEBUG|INFO|WARNING|ERROR; default INFO, to stderr)",
    ]
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
            raise ValueError(
                f"R2D2_LOG_LEVEL={level!r} is not a level; expected DEBUG, INFO, WARNING or ERROR"
            )
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
        print(__version__)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"r2d2: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    try:
        rc = getattr(importlib.import_module(module), func)(argv[1:])
    except KeyboardInterrupt:
        print(f"r2d2 {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a command without its own guard: the same rule
        code = report_error(f"r2d2 {cmd}", e)
        if code is None:
            raise
        return code
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
