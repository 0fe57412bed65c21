"""Image captioning (``train.task=caption``): the R2D2 text-image cross encoder run as a causal
decoder over the ViT's image tokens.

Kept light on purpose: :mod:`r2d2.engine.config` imports :mod:`.config` from here, so this
package's ``__init__`` imports nothing. The pieces:

config    :class:`CaptionConfig`, the run config's ``caption`` section
task      the trainer's entry points: ``build_objective(cfg, model)``, ``evaluate_heldout``
"""
