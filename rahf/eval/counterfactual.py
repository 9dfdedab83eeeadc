"""Does the model read the prompt? Counterfactual evaluation with one-word swaps.

For each record, the model scores its image with the record's own prompt and with up to ``variants``
prompts that differ in one word (:mod:`rahf.swaps`: a colour, an object noun, a count, a size or a
spatial relation; the article in front fixed; the variants picked by the record's uid, so every
run and every caller gets the same ones). Keys (all under ``counterfactual/``):

* ``pairwise_acc``: over (prompt, variant) pairs whose variant fits the image worse, the fraction in
  which the model's alignment score is higher for the record's own prompt (chance: 0.5);
* ``swapped_tagged``: over variants whose swapped word does not fit the image, the fraction in which
  the model tags the swapped word (constrained decoding);
* ``aligned_tagged``: over records whose own prompt has no misaligned word, the fraction in which the
  model tags some word of it;
* ``pairwise_acc/<kind>``, ``pairs/<kind>``, ``swapped_tagged/<kind>``: the same by the kind of word
  swapped (``colour``, ``object``, ``count``, ``size``, ``relation``; kinds met only), to see which
  comparisons a model makes and which it does not;
* ``spread_within`` / ``spread_across``: the standard deviation of the predicted alignment over the
  prompts of one image (mean over images) and over the images' own prompts; a model that ignores the
  prompt has ``spread_within`` near 0. ``label_spread_within`` / ``label_spread_across``: the same for
  the labels (synth only);
* ``own_tag_recall/<error>``, ``own_tags/<error>`` (synth, exact labels): over the records' own prompts,
  the fraction of the misaligned words that the model tags, by the error that makes them misaligned
  (``colour``, ``shape``, ``count``, ``size``, ``missing`` — a missing group's count, size, colour and
  noun —, ``place`` — the relation's words; :func:`rahf.data.synth.tag_kinds`), and how many there
  are: which errors the keyword output finds;
* on synth data, where the scene is regenerated from the dataset's seed and the record's uid, every
  variant carries exact labels (:mod:`rahf.data.synth_variants`): ``pairwise_acc`` uses pairs whose
  noise-free alignment drops by at least ``margin``, ``swapped_tagged`` the variants whose swapped word
  is tagged, and ``variant_keyword_f1`` (pooled F1 of the tagged words), ``variant_misalignment_cc``
  (mean CC over the variants' non-empty maps), ``variant_alignment_plcc`` and ``within_alignment_plcc``
  (PLCC of prediction and label after subtracting each image's mean: prompt use alone) are reported
  over the variants and own prompts together.

On other datasets every variant is assumed to fit the image worse than the record's own prompt (the
swapped word was asked for and is now wrong): an approximation, documented as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.format import read_dataset_info
from ..data.synth import TAG_KINDS, tag_kinds
from ..schema import SCORE_NAMES, parse_tagged
from ..swaps import DEFAULT_SWAPS, SYNTH_SWAPS, word_swaps
from .metrics import heatmap_metrics, keyword_metrics, plcc

PREFIX = "counterfactual/"


@dataclass
class _Item:
    """One (image, prompt) pair to score: ``group`` = record index, ``swapped`` = the swapped word's index
    (None: the record's own prompt)."""

    group: int
    prompt: str
    swapped: Optional[int] = None
    tagged: Optional[str] = None  # exact label (synth) or the record's own label
    alignment: Optional[float] = None  # the label
    true_alignment: Optional[float] = None  # noise-free label (synth)
    mis_map: Optional[np.ndarray] = field(default=None, repr=False)
    swapped_bad: bool = True  # whether the swapped word is misaligned in the label
    kind: Optional[str] = None  # the swap's kind (rahf.swaps), for variants
    word_errors: Optional[list] = None  # per word, the error that tags it or None (exact labels only)


def _scorer(model_or_scorer):
    from .scorer import RAHFScorer

    if isinstance(model_or_scorer, RAHFScorer):
        return model_or_scorer, None
    model = getattr(model_or_scorer, "module", model_or_scorer)
    device = next(model.parameters()).device
    was_training = model.training
    return RAHFScorer(model, device=device), was_training


def build_items(split, max_records: Optional[int] = None, variants: int = 4, seed: int = 0):
    """The records' images and the prompts to score (own + variants). Returns ``(images, items, exact)``:
    ``exact`` is True when every record's scene was regenerated (synth) and labels are exact."""
    from ..data import synth_variants as sv

    root, name = getattr(split, "root", None), getattr(split, "split", None)
    is_synth = root is not None and read_dataset_info(root).get("source") == "synth"
    vocab = SYNTH_SWAPS if is_synth else DEFAULT_SWAPS
    n = len(split) if max_records is None else min(len(split), int(max_records))
    images, items, exact = [], [], is_synth
    for i in range(n):
        ex = split[i]
        images.append(ex.image)
        rec = sv.regenerate(root, name, ex.uid) if is_synth else None
        if rec is not None and rec.prompt != ex.prompt:
            rec = None  # the record on disk is not the generator's (edited): fall back to approximate labels
        if rec is None:
            exact = False
            items.append(_Item(i, ex.prompt, tagged=ex.tagged_prompt, alignment=ex.scores["alignment"]))
            for s in word_swaps(ex.prompt, ex.uid, variants, vocab, seed=seed):
                items.append(_Item(i, s.prompt, s.index, kind=s.kind))
            continue
        errors = rec.scene.error_sets
        true_al = sv.true_alignment_of(rec.scene.spec, errors, rec.scene.place_error)
        items.append(_Item(i, ex.prompt, tagged=rec.tagged_prompt, alignment=rec.scores["alignment"],
                           true_alignment=true_al, mis_map=rec.misalignment_map,
                           word_errors=tag_kinds(rec.scene.spec, errors, rec.scene.place_error)))
        for v in sv.record_variants(rec, variants, seed):
            r = v.record
            bad = parse_tagged(r.tagged_prompt)[1][v.swap.index]
            items.append(_Item(i, r.prompt, v.swap.index, r.tagged_prompt, r.scores["alignment"], v.true_alignment,
                               r.misalignment_map, bad, v.swap.kind))
    return images, items, exact


@torch.no_grad()
def predict_items(scorer, images, items, batch_size: int = 32, decode: str = "constrained"):
    """Predicted alignment (N,), tagged prompts (N,) and misalignment maps (N, h, w) for ``items``."""
    align, tagged, maps = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pred = scorer.predict([images[it.group] for it in chunk], [it.prompt for it in chunk], decode=decode)
        align.append(pred.scores[:, SCORE_NAMES.index("alignment")].float().cpu())
        maps.append(pred.heatmaps["misalignment"].float().cpu())
        tagged += list(pred.tagged)
    return torch.cat(align).numpy(), tagged, torch.cat(maps)


def _std_within(values: np.ndarray, groups: np.ndarray) -> float:
    stds = [values[groups == g].std() for g in np.unique(groups) if (groups == g).sum() > 1]
    return float(np.mean(stds)) if stds else math.nan


def counterfactual_metrics(model_or_scorer, split, max_records: Optional[int] = None, variants: int = 4,
                           batch_size: int = 32, decode: str = "constrained", margin: float = 0.1,
                           seed: int = 0) -> dict[str, float]:
    """The counterfactual block (see the module docstring) for ``split`` (an ``open_dataset`` split) and a
    :class:`rahf.model.RAHF` model or a :class:`rahf.eval.scorer.RAHFScorer`. Records are taken in the
    split's order (the first ``max_records``); a model's train/eval mode is restored."""
    scorer, was_training = _scorer(model_or_scorer)
    try:
        images, items, exact = build_items(split, max_records, variants, seed)
        if not items:
            return {}
        pred, tagged, maps = predict_items(scorer, images, items, batch_size, decode)
    finally:
        if was_training:
            scorer.model.train()
    groups = np.array([it.group for it in items])
    own = np.array([it.swapped is None for it in items])
    m: dict[str, float] = {"records": float(own.sum()), "variants": float((~own).sum()), "exact": float(exact)}

    # pairs: own prompt vs each variant that fits the image worse
    own_idx = {it.group: k for k, it in enumerate(items) if it.swapped is None}
    wins, swapped_hits = [], []
    by_kind: dict[str, tuple[list, list]] = {}  # kind -> (wins, swapped hits)
    for k, it in enumerate(items):
        if it.swapped is None:
            continue
        o = items[own_idx[it.group]]
        worse = (o.true_alignment - it.true_alignment >= margin) if (exact and it.true_alignment is not None) else True
        if worse:
            a, b = pred[own_idx[it.group]], pred[k]
            wins.append(1.0 if a > b else 0.5 if a == b else 0.0)  # ties count half
            by_kind.setdefault(it.kind, ([], []))[0].append(wins[-1])
        if it.swapped_bad:
            words, flags = parse_tagged(tagged[k]) if tagged[k] else ([], [])
            swapped_hits.append(float(it.swapped < len(flags) and flags[it.swapped]))
            by_kind.setdefault(it.kind, ([], []))[1].append(swapped_hits[-1])
    m["pairwise_acc"] = float(np.mean(wins)) if wins else math.nan
    m["pairs"] = float(len(wins))
    m["swapped_tagged"] = float(np.mean(swapped_hits)) if swapped_hits else math.nan
    for kind, (w, h) in sorted((k, v) for k, v in by_kind.items() if k is not None):
        m[f"pairwise_acc/{kind}"] = float(np.mean(w)) if w else math.nan
        m[f"pairs/{kind}"] = float(len(w))
        m[f"swapped_tagged/{kind}"] = float(np.mean(h)) if h else math.nan
    aligned = [k for k, it in enumerate(items) if it.swapped is None and it.tagged is not None
               and not any(parse_tagged(it.tagged)[1])]
    # the own prompts' misaligned words, by the error that tags them: which errors the model finds
    found: dict[str, list] = {}
    for k, it in enumerate(items):
        if it.swapped is None and it.word_errors is not None:
            flags = parse_tagged(tagged[k])[1] if tagged[k] else []
            for j, err in enumerate(it.word_errors):
                if err is not None:
                    found.setdefault(err, []).append(float(j < len(flags) and flags[j]))
    for err in [e for e in TAG_KINDS if e in found]:
        m[f"own_tag_recall/{err}"] = float(np.mean(found[err]))
        m[f"own_tags/{err}"] = float(len(found[err]))
    m["aligned_tagged"] = (float(np.mean([any(parse_tagged(tagged[k])[1]) if tagged[k] else 0.0 for k in aligned]))
                           if aligned else math.nan)
    m["spread_within"] = _std_within(pred, groups)
    m["spread_across"] = float(pred[own].std())
    if exact:
        labels = np.array([it.alignment for it in items], dtype=np.float64)
        m["label_spread_within"] = _std_within(labels, groups)
        m["label_spread_across"] = float(labels[own].std())
        m["variant_alignment_plcc"] = plcc(pred, labels)
        centred_p = pred - np.array([pred[groups == g].mean() for g in groups])
        centred_l = labels - np.array([labels[groups == g].mean() for g in groups])
        m["within_alignment_plcc"] = plcc(centred_p, centred_l)
        kw = keyword_metrics([t or "" for t in tagged], [it.tagged for it in items])
        m["variant_keyword_f1"] = kw["f1"]
        m["variant_keyword_precision"] = kw["precision"]
        m["variant_keyword_recall"] = kw["recall"]
        gt = torch.from_numpy(np.stack([it.mis_map for it in items])).float()
        up = F.interpolate(maps[:, None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
        hm = heatmap_metrics(up, gt, ("cc", "mse"))
        nonempty = gt.flatten(1).amax(1) > 0
        cc = hm["cc"][nonempty]
        m["variant_misalignment_cc"] = float(torch.nanmean(cc.double())) if len(cc) else math.nan
        m["variant_misalignment_mse"] = float(hm["mse"].double().mean())
        m["variant_misalignment_mse_empty"] = (float(hm["mse"][~nonempty].double().mean()) if (~nonempty).any()
                                               else math.nan)
    return {PREFIX + k: v for k, v in m.items()}


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.0f} %"


def format_counterfactual(metrics: dict[str, float]) -> str:
    """The counterfactual block as a few printable lines."""
    g = {k[len(PREFIX):]: v for k, v in metrics.items() if k.startswith(PREFIX)}
    if not g:
        return ""
    lines = [f"Counterfactual prompts ({int(g['records'])} images, {int(g['variants'])} one-word swaps"
             f"{', exact labels' if g.get('exact') else ', approximate labels'}):",
             f"  own prompt scored above a worse variant: {100 * g['pairwise_acc']:.1f} % of {int(g['pairs'])} pairs;"
             f" swapped word tagged: {100 * g['swapped_tagged']:.1f} %; aligned prompts tagged: {100 * g['aligned_tagged']:.1f} %",
             f"  alignment spread within an image {g['spread_within']:.3f}, across images {g['spread_across']:.3f}"]
    kinds = [k.split("/", 1)[1] for k in g if k.startswith("pairs/")]
    if kinds:
        lines.append("  by swap kind (pairwise / swapped tagged): " + "; ".join(
            f"{k} {_pct(g[f'pairwise_acc/{k}'])} / {_pct(g[f'swapped_tagged/{k}'])}" for k in kinds))
    errs = [k.split("/", 1)[1] for k in g if k.startswith("own_tags/")]
    if errs:
        lines.append("  own prompts' misaligned words tagged, by error: " + "; ".join(
            f"{e} {_pct(g[f'own_tag_recall/{e}'])} of {int(g[f'own_tags/{e}'])}" for e in errs))
    if g.get("exact"):
        lines.append(f"  on own + variant prompts: alignment PLCC {g['variant_alignment_plcc']:.3f} (within images "
                     f"{g['within_alignment_plcc']:.3f}), keyword F1 {100 * g['variant_keyword_f1']:.1f}, "
                     f"misalignment CC {g['variant_misalignment_cc']:.3f}")
    return "\n".join(lines)
