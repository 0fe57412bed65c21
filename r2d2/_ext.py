"""Loads the optional compiled extension ``r2d2._C`` once and says so once if it cannot.

Where it comes from: the ahead-of-time build (``r2d2/_C<suffix>.so``, from an install with torch
in the build environment), else the first-use build of :mod:`r2d2._jit` (compiled against the
running torch and cached; ``R2D2_NO_JIT=1`` turns it off). Two ways it can be missing, told apart
because the fixes differ:
  not built        no prebuilt file and no first-use build (R2D2_NO_JIT=1, no compiler, a compile
                   error): the reason is the first-use build's one line
  fails to import  the prebuilt file is there but loading it raised, e.g. an undefined symbol
                   after torch was upgraded under it; the first-use build for the new torch is
                   tried before giving up, and the import error says why
"""

from __future__ import annotations

import functools
import sys
import warnings

REBUILD = "pip install --no-build-isolation -e ."
BUILD = "r2d2 doctor --build"


@functools.cache
def _load() -> tuple[object | None, str | None]:
    """(module, None) or (None, why it is unavailable)."""
    import torch  # noqa: F401  (the extension links against torch's libraries)

    from r2d2 import _jit

    try:
        from r2d2 import _C  # type: ignore[attr-defined]  (prebuilt, or r2d2/_C.py: first-use build)

        return _C, None
    except ImportError as e:
        if _jit.prebuilt_extension() is None:
            why = (
                f"r2d2._C is not built ({e}); build it with `{BUILD}`, or in a checkout "
                f"with `{REBUILD}`"
            )
        else:
            try:  # a torch upgrade broke the prebuilt one: build for this torch, as first use does
                mod = _jit.load()
                sys.modules["r2d2._C"] = mod
                return mod, None
            except ImportError as jit_e:
                why = (
                    f"r2d2._C is built but fails to import: {e}; rebuild it with `{REBUILD}` "
                    f"(first-use build: {jit_e})"
                )
    warnings.warn(f"{why}. Ops fall back to Triton/eager.", stacklevel=4)
    return None, why


def build(force: bool = True):
    """Compile (or find cached) ``r2d2._C`` for this torch now, whatever ``R2D2_NO_JIT`` says:
    ``r2d2 doctor --build``. Returns the module; raises ImportError with one line."""
    from r2d2 import _jit

    mod = _jit.load(build=True, force=force)
    _load.cache_clear()
    sys.modules["r2d2._C"] = mod
    return mod


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
