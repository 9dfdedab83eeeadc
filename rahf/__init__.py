"""rahf: Rich Automatic Human Feedback models for text-to-image generation.

Layers (imports only run downward)::

    rahf.schema, rahf.lexicon, rahf.configtools      names, record rules, vocabulary, config plumbing
    rahf.data                                         on-disk format, synth generator, RichHF converter, torch loading
    rahf.model                                        config/presets, ViT + T5 network, heads, loss, tokenizers, decoding
    rahf.eval                                         one inference path, metrics, evaluation, scorer, reports
    rahf.reward                                       best-of-N, masks, concept bottlenecks, TextNorm, ensembles
    rahf.training                                     the accelerate trainer
    rahf.cli                                          the ``rahf`` command

The heavy names (``RAHF``, ``RAHFConfig``, ``RAHFLoss``, ``RAHFScorer``) are imported on first use,
so ``rahf data ...`` commands start without loading torch/timm/transformers.
"""

__version__ = "0.1.0"

from .schema import MAP_NAMES, SCORE_NAMES

_LAZY = {
    "RAHF": ("rahf.model.rahf_model", "RAHF"),
    "RAHFOutput": ("rahf.model.rahf_model", "RAHFOutput"),
    "RAHFConfig": ("rahf.model.config", "RAHFConfig"),
    "RAHFLoss": ("rahf.model.loss", "RAHFLoss"),
    "RAHFScorer": ("rahf.eval.scorer", "RAHFScorer"),
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
