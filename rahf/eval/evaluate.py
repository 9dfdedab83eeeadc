"""The evaluation loop shared by training (dev and test), ``rahf eval`` and the eval report.

No accelerate import: the caller passes ``gather_object`` (``accelerate.utils.gather_object``) to
evaluate under several processes, and ``autocast`` (e.g. ``accelerator.autocast``).

The rules (docs/metrics.md has the full definitions):

* Predictions come from :func:`rahf.eval.predict.predict_batch` — the one inference path — and the
  tagged prompts from its decoding, ``"constrained"`` unless told otherwise.
* Heatmap metrics are computed at the **stored ground-truth size**: each predicted map (model
  resolution) is resized bilinearly to its ground-truth map's own size; the ground truth is never
  resized. So they do not depend on the model's head resolution. A batch may hold maps of
  different stored sizes (a list, see :class:`rahf.data.torch_data.RAHFCollator`): each is
  measured at its own size.
* Per-map values are computed where the batch is and gathered per example, so several processes
  give the same numbers as one: every process joins one gather per batch (a batch whose records were
  all bad contributes no rows), and examples are counted once each by dataset index, not by the
  sampler's padding count, so bad records removed from a batch cannot shift which ones are dropped.
* Losses (training's dev evaluation) compare with the ground truth resized to the model's size by
  :func:`rahf.data.torch_data.resize_map`, exactly as in training.

:func:`run_evaluation` returns an :class:`Evaluation` (metrics, reasons for unavailable ones,
optional per-example records); :func:`evaluate` returns just the metric dict.
:func:`metrics_document` / :func:`read_metrics` write and read ``metrics.json`` with its
``measured`` block (how the numbers were measured) and ``unavailable`` block.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..schema import MAP_NAMES, SCORE_NAMES
from .metrics import HEATMAP_METRICS, MetricAccumulator, format_tables, heatmap_metrics
from .predict import (DEFAULT_DECODE, check_decode, decode_tagged, model_inputs, other_decode, predict_batch,
                      resize_to)

__all__ = ["HEATMAP_METRIC_SIZE", "SUMMARY_KEYS", "Evaluation", "Examples", "run_evaluation", "evaluate",
           "map_metric_values", "summary_metric", "also_key", "measurement", "metrics_document", "read_metrics",
           "write_metrics", "model_inputs", "DEFAULT_DECODE", "other_decode"]

#: The collator's per-example flags of texts cut at the model's token limits, counted as
#: ``count/truncated_prompts`` and ``count/truncated_targets``.
TRUNCATION_KEYS = ("prompt_truncated", "target_truncated")
#: How heatmap metrics are measured (recorded as ``measured["heatmap_metric_size"]``).
HEATMAP_METRIC_SIZE = "stored ground-truth size (predictions resized bilinearly)"
#: The metrics averaged by :func:`summary_metric` (the default keep-best metric ``summary/mean``).
SUMMARY_KEYS = tuple([f"score/plcc/{s}" for s in SCORE_NAMES] + [f"heatmap/cc/{m}" for m in MAP_NAMES] + ["keyword/f1"])


def summary_metric(metrics: dict) -> float:
    """One number to rank checkpoints by: the mean of the four score PLCCs, the two heatmap CCs and
    the pooled keyword F1 (each that is present and available, i.e. finite)."""
    vals = [metrics[k] for k in SUMMARY_KEYS if metrics.get(k) is not None and math.isfinite(metrics[k])]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def also_key(key: str, mode: str) -> str:
    """The key under which another decoding's keyword metric is reported: ``keyword/f1`` →
    ``keyword_free/f1``, ``keyword_per_prompt/f1`` → ``keyword_free_per_prompt/f1``."""
    return key.replace("keyword", f"keyword_{mode}", 1)


# ------------------------------------------------------------------------------------------ maps
def _maps_of(gt) -> list[torch.Tensor]:
    return list(gt.unbind(0)) if isinstance(gt, torch.Tensor) else list(gt)


def map_metric_values(pred: torch.Tensor, gt) -> dict[str, torch.Tensor]:
    """Per-example heatmap metrics (:func:`rahf.eval.metrics.heatmap_metrics`) of one batch at the
    stored ground-truth size. ``pred``: (B, h, w) at model resolution; ``gt``: (B, H, W) or a list
    of B (H_i, W_i) maps. Returns ``{metric: (B,)}`` (float64; ``gt_empty`` bool), in batch order."""
    if isinstance(gt, torch.Tensor):
        return heatmap_metrics(resize_to(pred, gt.shape[-2:]), gt.float())
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(gt):
        groups.setdefault(tuple(g.shape[-2:]), []).append(i)
    out: dict[str, torch.Tensor] = {}
    for size, idx in groups.items():
        vals = heatmap_metrics(resize_to(pred[idx], size), torch.stack([gt[i] for i in idx]).float())
        for k, v in vals.items():
            if k not in out:
                out[k] = torch.empty(len(gt), dtype=v.dtype)
            out[k][idx] = v
    return out


def _loss_batch(batch: dict, size: Sequence[int]) -> dict:
    """The batch with its maps at the model's heatmap size (training's resize), for a loss."""
    from ..data.torch_data import resize_map

    out = dict(batch)
    for m in MAP_NAMES:
        gt = batch[f"{m}_map"]
        if isinstance(gt, torch.Tensor) and tuple(gt.shape[-2:]) == tuple(size):
            continue
        out[f"{m}_map"] = torch.stack([resize_map(g, size[0]) for g in _maps_of(gt)])
    return out


# ------------------------------------------------------------------------------------------ results
@dataclass
class Examples:
    """Per-example results of one evaluation, in evaluation order.

    ``index``: the example's index in the dataset; ``pred_scores`` / ``true_scores``: (N, 4) in
    ``SCORE_NAMES`` order; ``tagged``: tagged prompts of the evaluation's decoding (None entries when
    not decoded); ``target``: the ground-truth tagged prompts; ``map_values[map][metric]``: (N,)
    per-map metric values (NaN where undefined, e.g. CC of an empty ground truth); ``maps``: predicted
    heatmaps at model resolution for the examples kept (``keep_maps`` best and worst by implausibility
    CC), by dataset index."""

    index: list[int] = field(default_factory=list)
    uid: list[str] = field(default_factory=list)
    prompt: list[str] = field(default_factory=list)
    pred_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, len(SCORE_NAMES))))
    true_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, len(SCORE_NAMES))))
    tagged: list[Optional[str]] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    map_values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    maps: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.index)

    def records(self) -> Iterator[dict]:
        """One JSON-ready dict per example (NaN → None)."""
        for j in range(len(self)):
            yield {"index": self.index[j], "uid": self.uid[j], "prompt": self.prompt[j],
                   "scores": {s: float(self.pred_scores[j, k]) for k, s in enumerate(SCORE_NAMES)},
                   "true_scores": {s: float(self.true_scores[j, k]) for k, s in enumerate(SCORE_NAMES)},
                   "tagged_prompt": self.tagged[j], "target_tagged_prompt": self.target[j],
                   "heatmap": {m: {k: _json_float(v[j]) for k, v in vals.items()}
                               for m, vals in self.map_values.items()}}


class _Collector:
    """Builds :class:`Examples` batch by batch; keeps predicted maps only for the current
    ``keep`` best and ``keep`` worst examples by implausibility CC."""

    def __init__(self, keep: int):
        self.keep = keep
        self.ex = Examples()
        self.scores_p: list[np.ndarray] = []
        self.scores_t: list[np.ndarray] = []
        self.values: dict[str, dict[str, list[np.ndarray]]] = {}
        self.ranked: list[tuple[float, int]] = []

    def add(self, per: dict, uids, prompts, tagged, targets) -> None:
        index = per["index"].cpu().tolist()
        self.ex.index += index
        self.ex.uid += list(uids)
        self.ex.prompt += list(prompts)
        self.ex.tagged += list(tagged) if tagged is not None else [None] * len(index)
        self.ex.target += list(targets)
        self.scores_p.append(per["scores_pred"].double().cpu().numpy())
        self.scores_t.append(per["scores_true"].double().cpu().numpy())
        for m in MAP_NAMES:
            for k in HEATMAP_METRICS:
                if f"{m}/{k}" in per:
                    self.values.setdefault(m, {}).setdefault(k, []).append(per[f"{m}/{k}"].double().cpu().numpy())
        if self.keep and "implausibility/cc" in per and "pred/implausibility" in per:
            cc = per["implausibility/cc"].double().cpu().numpy()
            maps = {m: per[f"pred/{m}"].float().cpu().numpy() for m in MAP_NAMES}
            for j, i in enumerate(index):
                if np.isfinite(cc[j]):
                    self.ranked.append((float(cc[j]), i))
                    self.ex.maps[i] = {m: maps[m][j] for m in MAP_NAMES}
            self.ranked.sort(key=lambda t: (-t[0], t[1]))
            kept = {i for _, i in self.ranked[:self.keep] + self.ranked[-self.keep:]}
            self.ex.maps = {i: v for i, v in self.ex.maps.items() if i in kept}

    def result(self) -> Examples:
        if self.scores_p:
            self.ex.pred_scores = np.concatenate(self.scores_p)
            self.ex.true_scores = np.concatenate(self.scores_t)
        self.ex.map_values = {m: {k: np.concatenate(v) for k, v in vals.items()} for m, vals in self.values.items()}
        return self.ex


@dataclass
class Evaluation:
    """What :func:`run_evaluation` measured.

    ``metrics``: the flat metric dict (NaN where a metric cannot be computed); ``unavailable``:
    ``{key: reason}`` for those; ``examples``: per-example results when asked for; ``map_sizes``:
    the distinct stored ground-truth map sizes met, as [H, W]; ``decode`` / ``decode_also``: the
    decodings of ``keyword/…`` and ``keyword_<decode_also>/…``; ``bad_records``: the records skipped
    as bad while loading (``{"index", "uid", "problem"}``, each once, by dataset index; every process's)."""

    metrics: dict[str, float]
    unavailable: dict[str, str]
    examples: Optional[Examples] = None
    map_sizes: list[list[int]] = field(default_factory=list)
    decode: Optional[str] = DEFAULT_DECODE
    decode_also: Optional[str] = None
    bad_records: list[dict] = field(default_factory=list)

    def tables(self) -> str:
        """The metric tables (:func:`rahf.eval.metrics.format_tables`), ``n/a (reason)`` where unavailable."""
        return format_tables(self.metrics, self.unavailable, self.decode)


# ------------------------------------------------------------------------------------------ the loop
def _cpu(rows: dict) -> dict:
    """``rows`` with its tensors on the CPU (to be pickled and sent to the other processes)."""
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in rows.items()}


def _new_rows(parts: Sequence[Optional[dict]], seen: set) -> Iterator[dict]:
    """The gathered per-example rows of every process, in process order, each example once: rows whose
    dataset index was met before (the copies a distributed sampler pads its last batches with) are
    dropped; a part of no rows (``None``: every record of that process's batch was bad) adds none.
    A part's batch-level ``loss`` is kept only when the part adds at least one example."""
    for part in parts:
        if part is None:
            continue
        index = part["index"].tolist()
        keep = [j for j, i in enumerate(index) if i not in seen]
        seen.update(index)
        if not keep:
            continue
        if len(keep) == len(index):
            yield part
            continue
        sel = torch.tensor(keep, dtype=torch.long)
        yield {k: (v[sel] if isinstance(v, torch.Tensor) else [v[j] for j in keep] if isinstance(v, list) else v)
               for k, v in part.items()}


@torch.no_grad()
def run_evaluation(model, loader, gather_object: Optional[Callable] = None, decode: Optional[str] = DEFAULT_DECODE,
                   decode_also: Optional[str] = None, max_batches: Optional[int] = None, progress: bool = False,
                   autocast: Optional[Callable] = None, loss_fn=None, heatmaps: bool = True, examples: bool = False,
                   keep_maps: int = 0) -> Evaluation:
    """Run ``model`` over ``loader`` (batches of :class:`rahf.data.torch_data.RAHFCollator`) and
    compute every metric (see :mod:`rahf.eval.metrics` and docs/metrics.md).

    ``decode``: ``"constrained"`` (default), ``"free"`` or None — the decoding of the ``keyword/…``
    metrics. ``decode_also``: another decoding of the same forward passes, reported as
    ``keyword_<mode>/…`` (e.g. ``keyword_free/f1``). ``loss_fn``: also report the mean losses
    (``loss/…``, the mean of the batches' losses). ``heatmaps=False`` skips the map metrics.
    ``examples``: also return per-example results (:class:`Examples`); ``keep_maps``: with them, keep
    the predicted maps of the ``keep_maps`` best and worst examples by implausibility CC (for the report).

    Several processes: pass ``gather_object`` (``accelerate.utils.gather_object``: a list from every
    process, concatenated in process order) and a loader sharded by ``accelerator.prepare``. Every
    process then joins one gather per batch of the loader, including a batch whose records were all bad
    (it contributes no example), and examples are de-duplicated by dataset index, which drops the
    copies the sharded sampler pads its last batches with however many bad records were removed. The
    per-example values are computed where the batch is, so every metric equals one process's; every
    process returns the same :class:`Evaluation`. Records skipped as bad are counted once each
    (``count/bad_records``, present when there are any) and listed in ``Evaluation.bad_records``.
    """
    decode, decode_also = check_decode(decode), check_decode(decode_also)
    if decode_also is not None and decode is None:
        raise ValueError("decode_also needs a primary decoding (decode)")
    if decode_also == decode:
        decode_also = None
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    acc_also = MetricAccumulator() if decode_also else None
    collector = _Collector(keep_maps) if examples else None
    loss_sums: dict[str, float] = {}
    n_loss = 0
    sizes: set[tuple[int, int]] = set()
    cut: dict[str, int] = {}  # texts the collator cut at the model's token limits
    seen: set[int] = set()  # dataset indices of the examples counted (several processes)
    bad: dict[tuple, dict] = {}  # records skipped as bad, by (dataset index, uid)
    try:
        for bi, batch in enumerate(tqdm(loader, desc="eval", disable=not progress, leave=False)):
            if max_batches is not None and bi >= max_batches:
                break
            rows = None if batch.get("empty") else _batch_rows(model, batch, decode, decode_also, autocast, loss_fn,
                                                                heatmaps, collector is not None, keep_maps > 0)
            if gather_object is not None and rows is not None and "index" not in rows:
                raise ValueError("evaluating with gather_object needs the batches' dataset indices (batch['index'], "
                                 "as RAHFCollator makes)")
            bad_here = list(batch.get("bad_records") or [])
            if gather_object is None:
                parts = [rows]
            else:  # every process joins, an empty batch included
                gathered = gather_object([(None if rows is None else _cpu(rows), bad_here)])
                parts = [p[0] for p in gathered]
                bad_here = [r for p in gathered for r in p[1]]
            for r in bad_here:  # a padding copy of a bad record is the same record
                bad.setdefault((int(r.get("index", -1)), str(r.get("uid"))), r)
            for per in (parts if gather_object is None else _new_rows(parts, seen)):
                if per is None:
                    continue
                if "loss" in per:
                    for k, v in per["loss"].items():
                        loss_sums[k] = loss_sums.get(k, 0.0) + v
                    n_loss += 1
                for k in TRUNCATION_KEYS:
                    if k in per:
                        cut[k] = cut.get(k, 0) + int(per[k].sum())
                acc.update(pred_scores=per["scores_pred"], true_scores=per["scores_true"])
                if heatmaps:
                    for m in MAP_NAMES:
                        acc.add_map_values(m, {k.split("/", 1)[1]: v.cpu() for k, v in per.items()
                                               if k.startswith(m + "/")})
                    sizes.update(tuple(s) for s in per["gt_size"].cpu().tolist())
                if decode:
                    acc.update(pred_tagged=per["tagged"], target_tagged=per["targets"])
                if acc_also is not None:
                    acc_also.update(pred_tagged=per["also"], target_tagged=per["targets"])
                if collector is not None:
                    collector.add(per, per["uids"], per["prompts"], per.get("tagged"), per["targets"])
    finally:
        if was_training:
            model.train()
    metrics = acc.compute()
    unavailable = acc.unavailable(metrics)
    if acc_also is not None:
        alt = acc_also.compute()
        metrics.update({also_key(k, decode_also): v for k, v in alt.items() if k.startswith("keyword")})
        unavailable.update({also_key(k, decode_also): v for k, v in acc_also.unavailable(alt).items()
                            if k.startswith("keyword")})
    for k, v in loss_sums.items():
        metrics[f"loss/{k}"] = v / n_loss
    for k, n in cut.items():  # count/truncated_prompts, count/truncated_targets
        metrics[f"count/truncated_{k.split('_')[0]}s"] = float(n)
    if bad:
        metrics["count/bad_records"] = float(len(bad))
    metrics["summary/mean"] = summary_metric(metrics)
    if math.isnan(metrics["summary/mean"]):
        unavailable["summary/mean"] = "none of its metrics is available"
    return Evaluation(metrics=metrics, unavailable=unavailable, examples=collector.result() if collector else None,
                      map_sizes=[list(s) for s in sorted(sizes)], decode=decode, decode_also=decode_also,
                      bad_records=[bad[i] for i in sorted(bad)])


def _batch_rows(model, batch: dict, decode, decode_also, autocast, loss_fn, heatmaps: bool, examples: bool,
                keep_maps: bool) -> dict:
    """One batch's per-example results (tensors of B rows, lists of B entries; ``loss``: the batch's
    mean losses), computed where the batch is."""
    pred = predict_batch(model, batch, decode=decode, autocast=autocast, teacher_forcing=loss_fn is not None)
    device = pred.scores.device
    per = {"scores_pred": pred.scores, "scores_true": batch["scores"].float().to(device),
           "targets": list(batch["tagged_prompts"])}
    if "index" in batch:
        per["index"] = batch["index"]
    if examples:
        per.update(uids=list(batch["uids"]), prompts=list(batch["prompts"]))
    if loss_fn is not None:
        losses = loss_fn(pred.output, _loss_batch(batch, pred.heatmaps[MAP_NAMES[0]].shape[-2:]))
        per["loss"] = {k: float(v.detach()) for k, v in losses.items()}
    per.update({k: batch[k].long() for k in TRUNCATION_KEYS if k in batch})
    if heatmaps:
        for m in MAP_NAMES:
            for k, v in map_metric_values(pred.heatmaps[m], batch[f"{m}_map"]).items():
                per[f"{m}/{k}"] = v.double()
        per["gt_size"] = torch.tensor([list(g.shape[-2:]) for g in _maps_of(batch[f"{MAP_NAMES[0]}_map"])],
                                      dtype=torch.long)
        if keep_maps:
            per.update({f"pred/{m}": pred.heatmaps[m] for m in MAP_NAMES})
    if decode:
        per["tagged"] = list(pred.tagged)
    if decode_also:
        per["also"] = decode_tagged(model, pred.output, batch["prompts"], decode_also, autocast=autocast)
    return per


def evaluate(model, loader, gather_object: Optional[Callable] = None, decode: Optional[str] = DEFAULT_DECODE,
             max_batches: Optional[int] = None, progress: bool = False, autocast: Optional[Callable] = None,
             loss_fn=None, heatmaps: bool = True, decode_also: Optional[str] = None) -> dict[str, float]:
    """:func:`run_evaluation`'s metric dict (NaN where a metric is unavailable)."""
    return run_evaluation(model, loader, gather_object=gather_object, decode=decode, decode_also=decode_also,
                          max_batches=max_batches, progress=progress, autocast=autocast, loss_fn=loss_fn,
                          heatmaps=heatmaps).metrics


# ------------------------------------------------------------------------------------------ metrics.json
def _json_float(v):
    v = float(v)
    return v if math.isfinite(v) else None


def measurement(evaluation: Evaluation, *, split: str, dataset, checkpoint=None, batch_size: int,
                max_batches: Optional[int] = None, mixed_precision: str = "no", num_processes: int = 1,
                on_bad_record: str = "error", model_heatmap_size: Optional[int] = None) -> dict:
    """The ``measured`` block of metrics.json: everything needed to measure the same numbers again
    (``rahf eval`` on a directory holding this metrics.json reuses it)."""
    from .. import __version__

    return {
        "package_version": __version__,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "dataset": str(Path(dataset).resolve()),
        "split": split,
        "examples": int(evaluation.metrics.get("count/n", 0)),
        "decode": evaluation.decode,
        "decode_also": evaluation.decode_also,
        "heatmap_metric_size": HEATMAP_METRIC_SIZE,
        "ground_truth_map_sizes": evaluation.map_sizes,
        "model_heatmap_size": model_heatmap_size,
        "batch_size": int(batch_size),
        "max_batches": max_batches,
        "mixed_precision": mixed_precision,
        "num_processes": int(num_processes),
        "on_bad_record": on_bad_record,
    }


def metrics_document(metrics: dict, unavailable: Optional[dict] = None, measured: Optional[dict] = None) -> dict:
    """metrics.json's content: every metric key (null where unavailable or not finite), then
    ``"unavailable": {key: reason}`` and ``"measured": {...}``."""
    doc: dict = {}
    reasons = dict(unavailable or {})
    for k, v in metrics.items():
        doc[k] = _json_float(v) if isinstance(v, (int, float)) else v
        if doc[k] is None and k not in reasons:
            reasons[k] = "not finite"
    doc["unavailable"] = reasons
    if measured is not None:
        doc["measured"] = measured
    return doc


def write_metrics(path, metrics: dict, unavailable: Optional[dict] = None, measured: Optional[dict] = None) -> Path:
    """Write :func:`metrics_document` as JSON to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics_document(metrics, unavailable, measured), indent=2) + "\n")
    return path


def read_metrics(path) -> tuple[dict[str, float], dict[str, str], dict]:
    """``(metrics, unavailable, measured)`` from a metrics.json (null → NaN). Files written before
    the ``measured`` block existed give an empty ``measured``."""
    doc = json.loads(Path(path).read_text())
    unavailable = doc.get("unavailable") or {}
    measured = doc.get("measured") or {}
    metrics = {k: (math.nan if v is None else float(v)) for k, v in doc.items()
               if k not in ("unavailable", "measured") and (v is None or isinstance(v, (int, float)))}
    return metrics, dict(unavailable), dict(measured)
