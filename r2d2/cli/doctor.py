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
        "xformers": _version("xformers"),
        "apex": _version("apex"),
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["backends"] = {d: dispatch.describe(d) for d in devices}
    return info


def main(argv: list[str] | None = None) -> int:
    import argparse
    import warnings

    # no options: one given by mistake is a usage error (exit 2), not silently ignored
    ap = argparse.ArgumentParser(prog="r2d2 doctor",
                                 description="what this install and machine can run")
    ap.parse_args([] if argv is None else argv)

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
