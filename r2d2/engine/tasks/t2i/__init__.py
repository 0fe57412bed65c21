"""Text-to-image generation (``train.task=t2i``): a diffusion generator conditioned on the R2D2
text encoder, evaluated with R2D2 itself.

Kept light on purpose: :mod:`r2d2.engine.config` imports :mod:`.config` from here, so this
package's ``__init__`` imports nothing (diffusers is imported only by :mod:`.model`). The pieces:

config    :class:`T2IConfig`, the run config's ``t2i`` section (also ``r2d2 eval t2i``'s)
model     :class:`T2IModel`: UNet + projection + null condition, its EMA, samplers, files
task      the trainer's entry points: ``build_objective(cfg, model)``, ``evaluate_heldout``
metrics   R-precision, attribute agreement, palette background (hand-checkable)
evaluate  generated / unconditional / real images scored by an R2D2 evaluator; ``r2d2 eval t2i``
grid      picture grids with the prompts (CJK font when there is one, else a .txt beside)
"""
