"""Loads the optional compiled extension ``r2d2._C`` once and says so once if it is missing."""

from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def load():
    """Return the ``r2d2._C`` module, or None when the package was installed without it."""
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from r2d2 import _C  # type: ignore[attr-defined]
    except ImportError as e:
        warnings.warn(
            f"r2d2._C is not available ({e}); ops fall back to Triton/eager. "
            "Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=3,
        )
        return None
    return _C


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
