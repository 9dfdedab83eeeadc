"""The RAHF model: configuration and presets, the ViT + T5 network and its heads, the loss, the
tokenizers, decoding of the tagged prompt, and loading/saving checkpoints.

Imports only :mod:`rahf.schema`, :mod:`rahf.lexicon` and :mod:`rahf.configtools` from the package.
Names are imported on first use so that ``rahf.model.config`` alone does not load timm/transformers.
"""

_LAZY = {
    "RAHF": ("rahf.model.rahf_model", "RAHF"),
    "RAHFOutput": ("rahf.model.rahf_model", "RAHFOutput"),
    "FREEZABLE": ("rahf.model.rahf_model", "FREEZABLE"),
    "RAHFConfig": ("rahf.model.config", "RAHFConfig"),
    "RAHFLoss": ("rahf.model.loss", "RAHFLoss"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rahf.model' has no attribute {name!r}")
