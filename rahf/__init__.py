"""rahf: Rich Automatic Human Feedback models for text-to-image generation.

The heavy names (``RAHF``, ``RAHFConfig``, ``RAHFLoss``, ``RAHFScorer``) are imported on first use,
so ``rahf data ...`` commands start without loading torch/timm/transformers.
"""

__version__ = "0.1.0"

SCORE_NAMES = ("plausibility", "alignment", "aesthetics", "overall")
MAP_NAMES = ("implausibility", "misalignment")

_LAZY = {
    "RAHF": ("rahf.model", "RAHF"),
    "RAHFOutput": ("rahf.model", "RAHFOutput"),
    "RAHFConfig": ("rahf.config", "RAHFConfig"),
    "RAHFLoss": ("rahf.loss", "RAHFLoss"),
    "RAHFScorer": ("rahf.scorer", "RAHFScorer"),
}

__all__ = ["MAP_NAMES", "SCORE_NAMES", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rahf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
