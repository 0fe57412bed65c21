"""Text-to-image generation (``train.task=t2i``): a diffusion generator conditioned on the R2D2
text encoder, evaluated with R2D2 itself.

Kept light on purpose: :mod:`r2d2.engine.config` imports :mod:`.config` from here, so this
package's ``__init__`` imports nothing. The pieces:

config    :class:`T2IConfig`, the run config's ``t2i`` section
task      the trainer's entry points: ``build_objective(cfg, model)``, ``evaluate_heldout``
"""
