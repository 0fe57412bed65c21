"""r2d2-engine: a custom-kernel training engine for R2D2 (CCMB) vision-language pre-training.

Sub-packages:
  r2d2.kernels  fused ops (Triton, CUDA via r2d2._C) with eager references and backend dispatch
  r2d2.engine   model, objectives, data, trainer, CLI

Logging: everything logs under the ``r2d2`` logger (the kernels' ``auto`` backend picks, at INFO,
on ``r2d2.kernels``). As a library it stays silent until the application configures logging; the
``r2d2`` command shows INFO and above on stderr (``-q``/``-v`` or ``R2D2_LOG_LEVEL`` change that).
"""

import logging as _logging

# The library convention: no output unless the application asks (and no "no handlers" notice).
_logging.getLogger("r2d2").addHandler(_logging.NullHandler())

__version__ = "0.1.0"
