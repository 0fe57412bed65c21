"""R2D2 engine: model, objectives, data, trainer, downstream tasks and the CLI.

Lazy re-exports (the model stack is imported on first use, so the CLI starts fast):
``R2D2Model``, ``from_hf_bert``, ``from_hf_clip_vision``, ``retrieve``.
"""

_EXPORTS = {
    "R2D2Model": "r2d2.engine.model",
    "from_hf_bert": "r2d2.engine.hf_io",
    "from_hf_clip_vision": "r2d2.engine.hf_io",
    "retrieve": "r2d2.engine.inference",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'r2d2.engine' has no attribute {name!r}")
