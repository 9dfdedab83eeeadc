"""Evaluation loop shared by training, ``rahf eval`` and the scorer. No accelerate import: the caller
passes ``gather`` (e.g. ``accelerator.gather_for_metrics``) to evaluate under several processes."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..schema import MAP_NAMES, SCORE_NAMES
from .metrics import MetricAccumulator, heatmap_metrics

MODEL_KEYS = ("pixel_values", "input_ids", "attention_mask", "task_ids", "task_mask", "labels")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def upsample_to(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) → (B, H, W) bilinear (identity if equal)."""
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def summary_metric(metrics: dict) -> float:
    """One number to rank checkpoints by: the mean of the four score PLCCs, the two heatmap CCs and
    the pooled keyword F1 (each that is present and finite)."""
    keys = [f"score/plcc/{s}" for s in SCORE_NAMES] + [f"heatmap/cc/{m}" for m in MAP_NAMES] + ["keyword/f1"]
    vals = [metrics[k] for k in keys if k in metrics and metrics[k] is not None and math.isfinite(metrics[k])]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@torch.no_grad()
def evaluate(model, loader, gather: Optional[Callable] = None, decode: Optional[str] = "free",
             max_batches: Optional[int] = None, progress: bool = False, autocast: Optional[Callable] = None,
             loss_fn=None, heatmaps: bool = True) -> dict[str, float]:
    """Run ``model`` over ``loader`` and compute every metric (see ``rahf.eval.metrics`` and docs/metrics.md).

    Per-map metric values are computed where the batch is (predictions upsampled to the ground truth's
    size), then gathered per sample with ``gather`` — so several processes give the same numbers as one.
    ``decode``: ``"free"`` (greedy generation), ``"constrained"`` (tag/no-tag per prompt word), or None.
    ``heatmaps=False`` skips the map metrics (e.g. to compare decodings only).
    """
    gather = gather or (lambda x: x)
    unwrapped = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    loss_sums: dict[str, float] = {}
    n_loss = 0
    it = tqdm(loader, desc="eval", disable=not progress, leave=False)
    for bi, batch in enumerate(it):
        if max_batches is not None and bi >= max_batches:
            break
        if batch.get("empty"):  # every record of this batch was bad and skipped (counted by the loader)
            continue
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            out = model(**model_inputs(batch))
        if loss_fn is not None:
            losses = loss_fn(out, batch)
            for k, v in losses.items():  # local mean (this process's batches)
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v.detach())
            n_loss += 1
        per_sample = {"scores_pred": out.scores.float(), "scores_true": batch["scores"].float()}
        for m in MAP_NAMES if heatmaps else ():
            gt = batch[f"{m}_map"].float()
            pred = upsample_to(out.heatmaps[m].float(), gt.shape[-2:])
            for k, v in heatmap_metrics(pred, gt).items():
                per_sample[f"{m}/{k}"] = v.to(gt.device).double()
        per_sample = gather(per_sample)
        acc.update(pred_scores=per_sample["scores_pred"], true_scores=per_sample["scores_true"])
        for m in MAP_NAMES if heatmaps else ():
            acc.add_map_values(m, {k.split("/", 1)[1]: v.cpu() for k, v in per_sample.items() if k.startswith(m + "/")})
        if decode:
            preds = decode_batch(unwrapped, out, batch, decode)
            preds, targets = gather(preds), gather(list(batch["tagged_prompts"]))
            acc.update(pred_tagged=preds, target_tagged=targets)
    metrics = acc.compute()
    if n_loss:
        for k, v in loss_sums.items():
            metrics[f"loss/{k}"] = v / n_loss
    metrics["summary/mean"] = summary_metric(metrics)
    if was_training:
        model.train()
    return metrics


def decode_batch(model, out, batch: dict, mode: str) -> list[str]:
    """Tagged prompts for a batch: free generation or constrained (per-word tag decision)."""
    if mode == "free":
        return model.generate_tagged(out)
    if mode == "constrained":
        from ..model.decoding import constrained_tagging

        return constrained_tagging(model, out, batch["prompts"])
    raise ValueError(f"unknown decode mode {mode!r}; use 'free' or 'constrained'")
