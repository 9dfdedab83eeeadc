"""The trainer (imports accelerate; the model library does not)."""

from .config import TrainConfig, resolve_config
from .trainer import Trainer, main

__all__ = ["TrainConfig", "Trainer", "main", "resolve_config"]
