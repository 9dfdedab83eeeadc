"""``rahf.metrics`` is :mod:`rahf.eval.metrics` (kept importable under its first name)."""

import sys

from .eval import metrics as _metrics

sys.modules[__name__] = _metrics
