"""Arguments shared by the ``rahf`` commands, so each means the same everywhere.

Each ``add_*`` function adds one argument (or one small group) to an ``argparse`` parser; the
``*_from_args`` functions turn the parsed values into what the library takes. Nothing here imports
torch until a value is converted, so building the parser stays fast.

================================  ==========================================================
helper                            adds
================================  ==========================================================
:func:`add_checkpoint`            ``--checkpoint`` (a directory or a Hub repo id)
:func:`add_device`                ``--device``
:func:`add_dtype`                 ``--dtype fp32|bf16|fp16``
:func:`add_batch_size`            ``--batch-size``
:func:`add_decode`                ``--decode constrained|free[|both]|none``
:func:`add_data`                  ``--data`` and ``--split``
:func:`add_model_args`            ``--checkpoint``, ``--device``, ``--dtype``, ``--batch-size``
================================  ==========================================================
"""

from __future__ import annotations

import argparse
from typing import Optional

from ..schema import DECODE_MODES as _MODES, SPLITS

CHECKPOINT_HELP = "a checkpoint directory or a Hugging Face Hub repo id (org/name[@revision])"
DTYPES = ("fp32", "bf16", "fp16")
DECODE_MODES = _MODES + ("none",)


def add_checkpoint(p: argparse.ArgumentParser, required: bool = True, help: Optional[str] = None) -> None:
    """``--checkpoint``: a ``save_pretrained`` directory (e.g. ``RUN/export``) or a Hub repo id."""
    p.add_argument("--checkpoint", required=required, metavar="CHECKPOINT",
                   help=help or CHECKPOINT_HELP)


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device``: a torch device; default cuda when available, else cpu."""
    p.add_argument("--device", default=None, help="torch device: cuda, cuda:1, cpu, ... (default: cuda if available)")


def add_dtype(p: argparse.ArgumentParser, default: Optional[str] = "fp32", help: Optional[str] = None) -> None:
    """``--dtype``: the autocast dtype of inference (fp32: none)."""
    p.add_argument("--dtype", default=default, choices=DTYPES,
                   help=help or f"autocast dtype of the forward pass (default {default}; fp32: no autocast)")


def add_batch_size(p: argparse.ArgumentParser, default: Optional[int] = 16, help: Optional[str] = None) -> None:
    """``--batch-size``: images per forward pass."""
    p.add_argument("--batch-size", type=int, default=default,
                   help=help or f"images per forward pass (default {default})")


def add_decode(p: argparse.ArgumentParser, default: Optional[str] = "constrained", both: bool = False,
               help: Optional[str] = None) -> None:
    """``--decode``: how the tagged prompt is made. ``both`` (for evaluation) adds the choice ``both``."""
    choices = _MODES + (("both",) if both else ()) + ("none",)
    p.add_argument("--decode", default=default, choices=choices,
                   help=help or ("tagged prompt: constrained (the prompt's own words), free generation, "
                                 "word_head (a word-head model's per-word probabilities)"
                                 + (", both (constrained and free)" if both else "") + f", or none (default {default})"))


def add_data(p: argparse.ArgumentParser, required: bool = True, split: Optional[str] = "test", with_split: bool = True,
             help: Optional[str] = None, split_help: Optional[str] = None) -> None:
    """``--data`` (a dataset directory in the package's format) and, with ``with_split``, ``--split``
    (default ``split``; ``None`` lets the command choose, e.g. the recorded one)."""
    p.add_argument("--data", required=required, metavar="DIR",
                   help=help or "dataset directory in the package's format (rahf data synth / convert-richhf)")
    if with_split:
        p.add_argument("--split", default=split,
                       help=split_help or f"split directory under --data: {', '.join(SPLITS)}, ... (default {split})")


def add_model_args(p: argparse.ArgumentParser, required: bool = True, batch_size: int = 16) -> None:
    """The arguments of every command that runs a checkpoint: ``--checkpoint``, ``--device``,
    ``--dtype`` and ``--batch-size``; load the model with :func:`scorer_from_args`."""
    add_checkpoint(p, required=required)
    add_device(p)
    add_dtype(p)
    add_batch_size(p, batch_size)


# ------------------------------------------------------------------------------------------ values
def torch_dtype(name: str):
    """``--dtype`` as a torch dtype for autocast (``None`` for fp32)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def mixed_precision(name: str) -> str:
    """``--dtype`` as accelerate's ``mixed_precision`` (``no``, ``bf16``, ``fp16``)."""
    return {"fp32": "no"}.get(name, name)


def decode_mode(name: Optional[str]) -> Optional[str]:
    """``--decode`` as the scorer's ``decode`` argument (``none`` becomes ``None``)."""
    return None if name in (None, "none") else name


def scorer_from_args(args: argparse.Namespace, checkpoint: Optional[str] = None):
    """A :class:`rahf.eval.scorer.RAHFScorer` for ``--checkpoint`` (or ``checkpoint``) on
    ``--device`` with ``--dtype``."""
    from ..eval.scorer import RAHFScorer

    return RAHFScorer.from_pretrained(checkpoint or args.checkpoint, device=args.device,
                                      dtype=torch_dtype(getattr(args, "dtype", "fp32")))
