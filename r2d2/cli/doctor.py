"""``r2d2 doctor``: what this install and machine can run, told truthfully."""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def _extension_state(_ext) -> str:
    """'CPU+CUDA' / 'CPU only', or why it is unavailable: not built, or built but failing to
    import (e.g. an undefined symbol after a torch upgrade), with the import error."""
    if not _ext.available():
        return f"unavailable: {_ext.why_missing()}"
    return "CPU+CUDA" if _ext.cuda_built() else "CPU only"


def _extension_file(_ext) -> str:
    """The file r2d2._C loaded from (the install's own build, or the first-use build's cache),
    else where the first-use build would put it."""
    if _ext.available():
        return str(_ext.load().__file__)
    from r2d2 import _jit

    try:
        return f"none; the first-use build goes to {_jit.plan()['dir']}"
    except ImportError as e:
        return f"none; {e}"


def report() -> dict:
    import torch

    from r2d2 import __version__, _ext
    from r2d2.kernels import dispatch

    info: dict = {
        "r2d2": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "triton": _version("triton"),
        "TRITON_INTERPRET": dispatch.triton_interpret(),
        "r2d2._C": _extension_state(_ext),
        "r2d2._C_file": _extension_file(_ext),
        "xformers": _version("xformers"),
        "apex": _version("apex"),
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["backends"] = {d: dispatch.describe(d) for d in devices}
    return info


def main(argv: list[str] | None = None) -> int:
    import argparse
    import warnings

    # one option: anything else given by mistake is a usage error (exit 2), not silently ignored
    ap = argparse.ArgumentParser(
        prog="r2d2 doctor", description="what this install and machine can run"
    )
    ap.add_argument(
        "--build",
        action="store_true",
        help="compile r2d2._C for this torch now if it is not built (cached; an "
        "earlier failed build is retried), then report; exit 1 if it cannot",
    )
    args = ap.parse_args([] if argv is None else argv)

    from r2d2 import _ext, _jit

    if args.build:
        try:
            mod = _ext.build()
        except ImportError as e:
            print(f"r2d2 doctor: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
        print(f"r2d2._C ready: {mod.__file__}", file=sys.stderr)
    else:
        # A report, not a 3-minute compile: a cached first-use build still loads.
        _jit.suspend("`r2d2 doctor` does not compile; the first use in a run does")

    # Doctor reports the extension's state itself (the r2d2._C line, with the import error), so the
    # fallback warning would only repeat it.
    warnings.simplefilter("ignore")
    info = report()
    width = max(len(k) for k in info if k != "backends")
    for k, v in info.items():
        if k != "backends":
            print(f"{k:<{width}}  {v}")
    for dev, ops in info["backends"].items():
        print(f"\nops on {dev} tensors:")
        for op, row in ops.items():
            print(f"  {op}: auto -> {row['auto']}")
            for b, why in row.items():
                if b != "auto":
                    print(f"      {b:<9} {why}")
    sys.stdout.flush()
    return 0
