"""r2d2-engine: a custom-kernel training engine for R2D2 (CCMB) vision-language pre-training.

Sub-packages:
  r2d2.kernels  fused ops (Triton, CUDA via r2d2._C) with eager references and backend dispatch
  r2d2.engine   model, objectives, data, trainer, CLI
  r2d2.bench    the benchmark harness and per-op scripts behind ``r2d2 bench``
  r2d2.configs  the YAML presets (``--config tiny``; ``r2d2 presets`` lists them)

Logging: everything logs under the ``r2d2`` logger (the kernels' ``auto`` backend picks, at INFO,
on ``r2d2.kernels``). As a library it stays silent until the application configures logging; the
``r2d2`` command shows INFO and above on stderr (``-q``/``-v`` or ``R2D2_LOG_LEVEL`` change that).
"""

import contextlib as _contextlib
import logging as _logging

# torch first: r2d2._C links against libc10/libtorch, which the dynamic loader finds only once
# torch has loaded them, so `import r2d2._C` on its own works (no rpath into another package).
# Every real use needs torch and says so; `r2d2 --version` does not.
with _contextlib.suppress(ImportError):
    import torch as _torch  # noqa: F401

# The library convention: no output unless the application asks (and no "no handlers" notice).
_logging.getLogger("r2d2").addHandler(_logging.NullHandler())

__version__ = "0.1.0"
