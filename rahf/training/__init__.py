"""The trainer (imports accelerate; the model library does not). Names are imported on first use,
so ``rahf --help`` does not load torch."""

_LAZY = {
    "TrainConfig": ("rahf.training.config", "TrainConfig"),
    "resolve_config": ("rahf.training.config", "resolve_config"),
    "Trainer": ("rahf.training.trainer", "Trainer"),
    "main": ("rahf.training.trainer", "main"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rahf.training' has no attribute {name!r}")
