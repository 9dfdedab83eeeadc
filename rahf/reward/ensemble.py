"""Reward ensembles: several reward models scored together.

Given rewards ``R`` of shape (M models, N examples) -- raw, or TextNorm-normalized per model --

* :func:`mean_ensemble`: ``mean_m R[m, i]``;
* :func:`uncertainty_ensemble`: ``mean_m R[m, i] - lam * std_m R[m, i]`` (population std, ddof 0:
  the spread of the M given models, not an estimate for unseen ones); ``lam = 0`` is the mean.

Members need not be rahf models: :func:`read_reward_table` reads any model's rewards as JSONL keyed
by uid (``{"uid", "reward", "contrast_rewards"?}``). :func:`ensemble_rewards` builds the whole family
(each model, mean, mean - lam*std for each lam) for raw and normalized rewards, with one TextNorm tau
per member; :func:`select_lambda` chooses lam on development pairs; :func:`ensemble_report` scores
the family with the ranking metrics of :mod:`rahf.reward.textnorm`. Scoring images with
checkpoints lives in :mod:`rahf.cli.reward`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..eval.metrics import ranking_metrics
from .textnorm import textnorm

__all__ = ["mean_ensemble", "uncertainty_ensemble", "ensemble_rewards", "ensemble_report", "select_lambda",
           "read_reward_table"]


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


def _taus(tau, M: int) -> list[float]:
    if np.ndim(tau) == 0:
        return [float(tau)] * M
    t = [float(x) for x in tau]
    if len(t) != M:
        raise ValueError(f"{len(t)} taus for {M} models")
    return t


def ensemble_rewards(raw, contrast=None, tau: float | Sequence[float] = 0.1, lams: Sequence[float] = (1.0,),
                     names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """All reward variants. ``raw``: (M, N) rewards of the given prompts; ``contrast``: (M, N, K)
    rewards of the contrastive prompts (NaN padding) or None (then raw variants only); ``tau``: one
    temperature for all members or one per member.

    Keys: ``<name>`` and ``<name>+textnorm`` per model; ``mean``, ``mean-<lam>std`` and their
    ``+textnorm`` versions (TextNorm applied per model with its own tau, then combined).
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
        taus = _taus(tau, M)
        variants["+textnorm"] = np.stack([textnorm(raw[m], c[m], taus[m]) for m in range(M)])
    out: dict[str, np.ndarray] = {}
    for suffix, R in variants.items():
        for m, n in enumerate(names):
            out[n + suffix] = R[m]
    for suffix, R in variants.items():
        out["mean" + suffix] = mean_ensemble(R)
        for lam in lams:
            out[f"mean-{lam:g}std" + suffix] = uncertainty_ensemble(R, lam)
    return out


def select_lambda(rewards, labels, lams: Sequence[float], metric: str = "auroc",
                  ks: Sequence[int] = (10, 50)) -> tuple[float, dict[float, float]]:
    """Choose lam for ``mean - lam * std`` on development pairs: the lam of ``lams`` (0 = the mean)
    with the highest ``metric`` (the first listed wins a tie). Returns (lam, {lam: metric})."""
    if not len(lams):
        raise ValueError("no lambda to select from")
    R = _as_matrix(rewards)
    table = {float(l): ranking_metrics(uncertainty_ensemble(R, l), labels, ks)[metric] for l in lams}
    best = max(table, key=lambda l: (np.nan_to_num(table[l], nan=-np.inf), -list(table).index(l)))
    return best, table


def read_reward_table(path: str | Path) -> dict[str, tuple[float, list[float] | None]]:
    """A reward model's output as JSONL, one line per (image, prompt) pair: ``{"uid": ...,
    "reward": r, "contrast_rewards": [r(x, y') ...]}`` (the last optional; needed for TextNorm).
    Returns ``{uid: (reward, contrast rewards or None)}``; a bad line raises naming file and line."""
    p = Path(path)
    out: dict[str, tuple[float, list[float] | None]] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            r = float(d["reward"])
            c = d.get("contrast_rewards")
            c = None if c is None else [float(v) for v in c]
            if not np.isfinite(r) or (c is not None and not np.all(np.isfinite(c))):
                raise ValueError("rewards must be finite")
            uid = str(d["uid"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}:{n}: bad reward line ({e})") from None
        if uid in out:
            raise ValueError(f"{p}:{n}: duplicate uid {uid!r}")
        out[uid] = (r, c)
    return out


def ensemble_report(rewards: Mapping[str, np.ndarray], labels, ks: Sequence[int] = (10, 50)) -> dict[str, dict]:
    """Ranking metrics (AUROC, AUPRC, AP@k, Spearman, Kendall) of every reward variant."""
    return {name: ranking_metrics(r, labels, ks) for name, r in rewards.items()}
