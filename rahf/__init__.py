"""rahf: Rich Automatic Human Feedback models for text-to-image generation."""

from .config import MAP_NAMES, SCORE_NAMES, RAHFConfig
from .loss import RAHFLoss
from .model import RAHF, RAHFOutput

__version__ = "0.1.0"

__all__ = ["RAHF", "RAHFConfig", "RAHFLoss", "RAHFOutput", "MAP_NAMES", "SCORE_NAMES", "RAHFScorer", "__version__"]


def __getattr__(name):  # lazy: the scorer pulls in more than the model library needs
    if name == "RAHFScorer":
        from .scorer import RAHFScorer

        return RAHFScorer
    raise AttributeError(f"module 'rahf' has no attribute {name!r}")
