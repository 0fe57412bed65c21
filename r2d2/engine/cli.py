"""The ``r2d2`` command: a thin router; each subcommand lives in its own module.

    r2d2 doctor                          what this machine can run
    r2d2 pretrain  --config ... [--section.field=value ...]
    r2d2 finetune  --config ... [...]
    r2d2 eval retrieval|matching|zeroshot --config ... --checkpoint ...
    r2d2 bench [kernels|step|all] [--quick]

Works as ``python -m r2d2 ...`` too, which is what ``torchrun -m r2d2`` calls.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help); modules are imported only when used, so
# `r2d2 doctor` works even where the heavier pieces cannot import.
COMMANDS = {
    "doctor": ("r2d2.engine.doctor", "main", "print torch/CUDA/triton/extension state and backend picks"),
    "pretrain": ("r2d2.engine.train_cli", "pretrain", "R2D2 pre-training (GCPR + FGR + MLM + TgD + FgD)"),
    "finetune": ("r2d2.engine.train_cli", "finetune", "fine-tuning on a downstream set"),
    "eval": ("r2d2.engine.tasks.cli", "main", "retrieval / matching / zero-shot evaluation"),
    "bench": ("r2d2.engine.bench_cli", "main", "kernel and training-step benchmarks"),
}


def _usage() -> str:
    lines = ["usage: r2d2 <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
