"""r2d2-engine: a custom-kernel training engine for R2D2 (CCMB) vision-language pre-training.

Sub-packages:
  r2d2.kernels  fused ops (Triton, CUDA via r2d2._C) with eager references and backend dispatch
  r2d2.engine   model, objectives, data, trainer, CLI
"""

__version__ = "0.1.0"
