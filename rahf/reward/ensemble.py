"""Reward ensembles : several reward models scored together.

Given rewards ``R`` of shape (M models, N examples) -- raw, or TextNorm-normalized per model --

* :func:`mean_ensemble`: ``mean_m R[m, i]``;
* :func:`uncertainty_ensemble`: ``mean_m R[m, i] - lam * std_m R[m, i]`` (population std, ddof 0:
  the spread of the M given models, not an estimate for unseen ones); ``lam = 0`` is the mean.

:func:`ensemble_rewards` builds the whole family (each model, mean, mean - lam*std for each lam)
for raw and normalized rewards; :func:`ensemble_report` scores them with the ranking metrics of
:mod:`rahf.reward.textnorm`. Scoring images with checkpoints lives in :mod:`rahf.cli.reward`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..eval.metrics import ranking_metrics
from .textnorm import textnorm

__all__ = ["mean_ensemble", "uncertainty_ensemble", "ensemble_rewards", "ensemble_report"]


def _as_matrix(rewards) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim == 1:
        r = r[None]
    if r.ndim != 2 or r.shape[0] < 1:
        raise ValueError(f"rewards must be (models, examples); got shape {r.shape}")
    return r


def mean_ensemble(rewards) -> np.ndarray:
    """Mean over models (axis 0) of a (M, N) reward matrix."""
    return _as_matrix(rewards).mean(axis=0)


def uncertainty_ensemble(rewards, lam: float = 1.0) -> np.ndarray:
    """mean - lam * std over models (population std, ddof 0) of a (M, N) reward matrix."""
    r = _as_matrix(rewards)
    return r.mean(axis=0) - float(lam) * r.std(axis=0, ddof=0)


def ensemble_rewards(raw, contrast=None, tau: float = 0.1, lams: Sequence[float] = (1.0,),
                     names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """All reward variants. ``raw``: (M, N) rewards of the given prompts; ``contrast``: (M, N, K)
    rewards of the contrastive prompts (NaN padding) or None (then raw variants only).

    Keys: ``<name>`` and ``<name>+textnorm`` per model; ``mean``, ``mean-<lam>std`` and their
    ``+textnorm`` versions (TextNorm applied per model, then combined).
    """
    raw = _as_matrix(raw)
    M = raw.shape[0]
    names = list(names) if names is not None else [f"model{m}" for m in range(M)]
    if len(names) != M:
        raise ValueError(f"{len(names)} names for {M} models")
    variants = {"": raw}
    if contrast is not None:
        c = np.asarray(contrast, dtype=np.float64)
        if c.ndim != 3 or c.shape[:2] != raw.shape:
            raise ValueError(f"contrast rewards must be (M, N, K) = {raw.shape} + (K,); got {c.shape}")
        variants["+textnorm"] = np.stack([textnorm(raw[m], c[m], tau) for m in range(M)])
    out: dict[str, np.ndarray] = {}
    for suffix, R in variants.items():
        for m, n in enumerate(names):
            out[n + suffix] = R[m]
    for suffix, R in variants.items():
        out["mean" + suffix] = mean_ensemble(R)
        for lam in lams:
            out[f"mean-{lam:g}std" + suffix] = uncertainty_ensemble(R, lam)
    return out


def ensemble_report(rewards: Mapping[str, np.ndarray], labels, ks: Sequence[int] = (10, 50)) -> dict[str, dict]:
    """Ranking metrics (AUROC, AUPRC, AP@k, Spearman, Kendall) of every reward variant."""
    return {name: ranking_metrics(r, labels, ks) for name, r in rewards.items()}
