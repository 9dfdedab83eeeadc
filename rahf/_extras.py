"""Optional dependencies ("extras").

The base install (``pip install rahf``) trains, scores and evaluates. Libraries needed only by
some features come with an extra, declared in ``pyproject.toml``:

==========  =====================================  =========================================
extra       libraries                              needed by
==========  =====================================  =========================================
train       wandb, tensorboard                     ``tracking.tracker: wandb | tensorboard``
richhf      pyarrow, protobuf, google-crc32c       ``rahf data convert-richhf``
report      matplotlib                             overlays, plots, HTML pages
serve       fastapi, uvicorn, httpx                ``rahf serve`` and its client
==========  =====================================  =========================================

Code that needs one of these libraries imports it through :func:`require` where it is used, so a
missing library is reported in one line naming the ``pip install`` to run, never as a traceback
from deep inside a feature.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional library is not installed; the message names the ``pip install`` that adds it."""


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import and return ``module``; when it is not installed raise :class:`MissingExtra` naming
    ``pip install "rahf[<extra>]"``.

    ``purpose`` (e.g. ``"rahf predict's overlays"``) is added to the message. An installed library
    that fails while importing itself raises its own error unchanged.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or ""
        if not missing or not (module == missing or module.startswith(missing + ".")):
            raise  # the library is there but broken: its own error is the useful one
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingExtra(f'{module} is not installed{what}: pip install "rahf[{extra}]"',
                           name=module) from None
