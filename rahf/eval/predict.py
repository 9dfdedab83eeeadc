"""The one inference path: run a model over a batch and decode the tagged prompts.

Every consumer of model outputs — the evaluation loop (training's dev/test evaluation and
``rahf eval``), :class:`rahf.eval.scorer.RAHFScorer` and through them ``rahf predict`` and the
reports — calls :func:`predict_batch`, so the same inputs give the same scores, heatmaps and
tagged prompts everywhere. Decoding is dispatched in one place, :func:`decode_tagged`:

* ``"constrained"`` (:data:`DEFAULT_DECODE`): the output is the prompt's own words, each tagged
  ``_0`` or not by one teacher-forced decoder pass (:mod:`rahf.model.decoding`);
* ``"free"``: greedy generation of the tagged prompt (may drop, repeat or invent words);
* ``"word_head"``: the prompt's own words, each tagged when the word head's probability is above 0.5
  (models trained with ``model.word_head``; :func:`rahf.model.decoding.word_head_tagging`);
* ``None`` (or ``"none"``): no decoding.

Forward pass and decoding run under the same ``autocast`` context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..schema import DECODE_MODES, MAP_NAMES

__all__ = ["DEFAULT_DECODE", "DECODE_MODES", "MODEL_KEYS", "Predictions", "predict_batch", "decode_tagged",
           "check_decode", "other_decode", "model_inputs", "unwrap", "resize_to"]

#: The decoding used wherever none is named: training's evaluation, ``rahf eval``, the scorer.
DEFAULT_DECODE = "constrained"
# DECODE_MODES (rahf.schema): the decoding modes; None (``"none"`` on the command line) is accepted everywhere too.
MODEL_KEYS = ("pixel_values", "input_ids", "attention_mask", "task_ids", "task_mask", "labels")


def check_decode(mode: Optional[str]) -> Optional[str]:
    """``mode`` as a decoding mode: ``"constrained"``, ``"free"`` or None (``"none"`` → None)."""
    if mode is None or mode == "none":
        return None
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; use {', '.join(map(repr, DECODE_MODES))} or None")
    return mode


def other_decode(mode: Optional[str], word_head: bool = False) -> Optional[str]:
    """The decoding reported beside ``mode``: ``"free"`` ↔ ``"constrained"``, ``"word_head"`` →
    ``"constrained"``; for a model with a word head (``word_head``), the decoder's modes are reported
    beside ``"word_head"``; None for None."""
    mode = check_decode(mode)
    if mode is None:
        return None
    if word_head and mode != "word_head":
        return "word_head"
    return {"constrained": "free", "free": "constrained", "word_head": "constrained"}[mode]


def model_inputs(batch: dict, labels: bool = True) -> dict:
    """The model's keyword arguments from a collated batch (``labels`` for teacher forcing)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch and (labels or k != "labels")}


def unwrap(model):
    """The :class:`rahf.model.RAHF` inside a DDP/FSDP wrapper or a ``torch.compile`` module."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def resize_to(pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, h, w) → (B, H, W) float32, bilinear (``align_corners=False``); identity if equal."""
    pred = pred.float()
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _context(autocast: Optional[Callable]):
    return autocast() if autocast is not None else contextlib.nullcontext()


@torch.no_grad()
def decode_tagged(model, out, prompts: Sequence[str], mode: Optional[str],
                  autocast: Optional[Callable] = None) -> Optional[list[str]]:
    """Tagged prompts (``"a yellow_0 cat"``) of one forward pass ``out`` by ``mode`` (see the module
    docstring); None when ``mode`` is None. ``prompts``: the clean prompts the batch was made from."""
    mode = check_decode(mode)
    if mode is None:
        return None
    model = unwrap(model)
    with _context(autocast):
        if mode == "free":
            return model.generate_tagged(out)
        if mode == "word_head":
            from ..model.decoding import word_head_tagging

            return word_head_tagging(model, out, list(prompts))
        from ..model.decoding import constrained_tagging

        return constrained_tagging(model, out, list(prompts))


@dataclass
class Predictions:
    """One batch's predictions.

    ``scores``: (B, 4) float32 in ``SCORE_NAMES`` order; ``heatmaps[name]``: (B, h, w) float32 at the
    model's own resolution (``config.heatmap_size``); ``tagged``: the tagged prompts, or None when not
    decoded; ``decode``: the mode used; ``output``: the raw :class:`rahf.model.RAHFOutput` (for
    losses, or to decode it another way with :func:`decode_tagged`)."""

    scores: torch.Tensor
    heatmaps: dict[str, torch.Tensor]
    tagged: Optional[list[str]]
    decode: Optional[str]
    output: object

    def heatmaps_at(self, size: Sequence[int]) -> dict[str, torch.Tensor]:
        """Both heatmaps resized (bilinear) to ``size`` = (H, W)."""
        return {m: resize_to(h, size) for m, h in self.heatmaps.items()}


@torch.no_grad()
def predict_batch(model, batch: dict, decode: Optional[str] = DEFAULT_DECODE, autocast: Optional[Callable] = None,
                  teacher_forcing: bool = False) -> Predictions:
    """Run ``model`` over a collated ``batch`` (:class:`rahf.data.torch_data.RAHFCollator`, or
    :meth:`rahf.eval.scorer.RAHFScorer.prepare`) and decode its tagged prompts.

    ``decode``: ``"constrained"`` (default), ``"free"`` or None. ``autocast``: a callable returning a
    context manager (e.g. ``accelerator.autocast``) that wraps the forward pass and the decoding;
    None runs in the model's dtype. ``teacher_forcing``: also pass the batch's ``labels`` (the
    decoder logits a loss needs); it changes neither scores, heatmaps nor decoding. Tensors not yet
    on the model's device are moved there.
    """
    decode = check_decode(decode)
    try:
        device = next(unwrap(model).parameters()).device
    except StopIteration:
        device = None
    inputs = model_inputs(batch, labels=teacher_forcing)
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    with _context(autocast):
        out = model(**inputs)
    tagged = decode_tagged(model, out, batch["prompts"], decode, autocast=autocast) if decode else None
    return Predictions(scores=out.scores.float(), heatmaps={m: out.heatmaps[m].float() for m in MAP_NAMES},
                       tagged=tagged, decode=decode, output=out)
