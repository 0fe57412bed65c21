"""Loads the optional compiled extension ``r2d2._C`` once and says so once if it cannot.

Two ways it can be missing, told apart because the fixes differ:
  not built        no ``r2d2/_C*.so`` (installed with R2D2_SKIP_EXT=1, or never built)
  fails to import  the file is there but loading it raised, e.g. an undefined symbol after torch
                   was upgraded under it; the import error says why, and a rebuild fixes it
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

REBUILD = "pip install --no-build-isolation -e ."


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str | None]:
    """(module, None) or (None, why it is unavailable)."""
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from r2d2 import _C  # type: ignore[attr-defined]
    except ImportError as e:
        try:
            present = importlib.util.find_spec("r2d2._C") is not None
        except (ImportError, ValueError):
            present = False
        if present:
            why = f"r2d2._C is built but fails to import: {e}; rebuild it with `{REBUILD}`"
        else:
            why = f"r2d2._C is not built ({e}); build it with `{REBUILD}`"
        warnings.warn(f"{why}. Ops fall back to Triton/eager.", stacklevel=4)
        return None, why
    return _C, None


def load():
    """Return the ``r2d2._C`` module, or None when it is not built or fails to import."""
    return _load()[0]


def why_missing() -> str | None:
    """None when the extension loaded, else a sentence naming why (with the import error)."""
    return _load()[1]


def available() -> bool:
    return load() is not None


def cuda_built() -> bool:
    mod = load()
    return bool(mod is not None and mod.cuda_built())


def has_op(name: str) -> bool:
    """Whether ``torch.ops.r2d2.<name>`` is registered by the loaded extension."""
    if load() is None:
        return False
    import torch

    try:
        getattr(torch.ops.r2d2, name)
    except (AttributeError, RuntimeError):
        return False
    return True
