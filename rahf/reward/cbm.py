"""Concept-bottleneck reward aggregation.

Stage 1 is any set of fine-grained attributes per (image, prompt): RAHF's predicted scores and
heatmap statistics (:func:`rahf_attributes`), columns of a user's table, or -- in the controlled
experiment -- per-attribute classifiers trained on image features. Stage 2 is a class-balanced,
L2-regularised logistic regression on standardised attributes (:class:`Aggregator`) to a coarse
binary target (a score thresholded at e.g. its median, or a user's 0/1 column). Its standardised
weights say which attributes matter (:func:`bootstrap_weights` gives their intervals,
:func:`correlated_pairs` the attributes whose weights cannot be read one by one); per row,
:meth:`Aggregator.contributions` splits the logit into one term per attribute and
:meth:`Aggregator.intervene` fixes attributes to see the reward change. It is saved as plain JSON.

:func:`learning_curve` measures the aggregator against a *coarse* model -- the same logistic
regression trained directly on frozen image(+prompt) embeddings -- over label budgets (the concept-bottleneck paper's
Fig. 2). :func:`controlled_experiment` reproduces the concept-bottleneck paper's Experiment 2 on synth data, whose
attributes are known exactly (Fig. 3): a decision-tree target over three attributes; a CBM with the
right attributes, with extra ones, and with mismatched ones, against a coarse model.

Logistic regression
-------------------
:func:`fit_logistic` minimises ``sum_i s_i * logloss_i / sum_i s_i + l2/2 * |w|^2`` (bias not
penalised) with L-BFGS (scipy) and the exact gradient; with ``balanced=True`` the sample weights are
``s_i = n / (2 n_{y_i})`` so both classes weigh the same. Inputs are standardised by the caller
(:class:`Standardizer`): zero mean, unit variance on the fitting rows (constant columns get scale 1).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from .._extras import require
from ..eval.metrics import roc_auc
from ..schema import MAP_NAMES, SCORE_NAMES, parse_tagged

__all__ = [
    "Standardizer",
    "fit_logistic",
    "class_weights",
    "Aggregator",
    "fit_aggregator",
    "bootstrap_weights",
    "correlated_pairs",
    "join_column",
    "synth_arrays",
    "rahf_attributes",
    "RAHF_ATTRIBUTES",
    "binarize",
    "learning_curve",
    "image_features",
    "synth_attributes",
    "TREES",
    "controlled_experiment",
    "fit_probe",
    "fit_mlp",
    "paired_bootstrap",
    "verdicts",
    "format_interval_table",
    "CAPACITIES",
    "format_curve_table",
    "plot_curves",
    "read_table",
]

DEFAULT_BUDGETS: tuple = (25, 50, 100, 200, 400, "all")


# ----------------------------------------------------------------------------------------------
# logistic regression
# ----------------------------------------------------------------------------------------------
@dataclass
class Standardizer:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, X) -> "Standardizer":
        X = np.asarray(X, dtype=np.float64)
        mu = X.mean(axis=0)
        sd = X.std(axis=0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        return cls(mu, sd)

    def __call__(self, X) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean) / self.scale


def class_weights(y) -> np.ndarray:
    """Balanced sample weights n / (2 n_class): each class carries half the total weight."""
    y = np.asarray(y).astype(bool)
    n, npos = y.size, int(y.sum())
    if npos == 0 or npos == n:
        return np.ones(n)
    return np.where(y, n / (2.0 * npos), n / (2.0 * (n - npos)))


def fit_logistic(X, y, l2: float = 1e-2, balanced: bool = True, sample_weight=None,
                 max_iter: int = 500) -> tuple[np.ndarray, float]:
    """Weighted L2-regularised logistic regression; returns ``(w, b)``. ``y`` in {0, 1}.

    One-class ``y`` gives ``w = 0`` and the bias of the (clipped) class rate.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    n, d = X.shape
    if y.size != n:
        raise ValueError(f"{n} rows but {y.size} labels")
    if y.min() == y.max():
        p = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        return np.zeros(d), math.log(p / (1 - p))
    s = class_weights(y) if balanced else np.ones(n)
    if sample_weight is not None:
        s = s * np.asarray(sample_weight, dtype=np.float64)
    s = s / s.sum()

    def f(theta):
        w, b = theta[:d], theta[d]
        z = X @ w + b
        loss = float(np.dot(s, np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * float(np.dot(w, w))
        g = s * (expit(z) - y)
        return loss, np.r_[X.T @ g + l2 * w, g.sum()]

    res = minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return res.x[:d].copy(), float(res.x[d])


# ----------------------------------------------------------------------------------------------
# the aggregator
# ----------------------------------------------------------------------------------------------
@dataclass
class Aggregator:
    """Stage 2: ``p = sigmoid(b + sum_j w_j (x_j - mean_j) / scale_j)`` over named attributes."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]  # on standardised attributes: comparable across attributes
    bias: float
    target: dict = field(default_factory=dict)  # {"name", "threshold", "rule"} -- documentation only
    l2: float = 1e-2
    balanced: bool = True
    metrics: dict = field(default_factory=dict)

    weight_intervals: dict = field(default_factory=dict)  # :func:`bootstrap_weights` output ({} if not computed)

    FORMAT = "rahf-cbm-aggregator"

    def _matrix(self, X) -> np.ndarray:
        if isinstance(X, Mapping):
            X = [X]
        if len(X) and isinstance(X[0], Mapping):
            missing = [f for f in self.features if f not in X[0]]
            if missing:
                raise KeyError(f"rows lack the aggregator's features {missing}")
            X = [[float(r[f]) for f in self.features] for r in X]
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise ValueError(f"expected (N, {len(self.features)}) attributes, got {X.shape}")
        return X

    def decision_function(self, X) -> np.ndarray:
        """Logits for rows (an (N, M) array in ``features`` order, or dicts keyed by feature name)."""
        Z = (self._matrix(X) - np.asarray(self.mean)) / np.asarray(self.scale)
        return Z @ np.asarray(self.weights) + self.bias

    def predict_proba(self, X) -> np.ndarray:
        return expit(self.decision_function(X))

    def contributions(self, X) -> np.ndarray:
        """Per-row, per-attribute terms ``w_j (x_j - mean_j) / scale_j`` (N, M): with :attr:`bias` they
        sum to the logit, ``decision_function(X) == contributions(X).sum(1) + bias``."""
        Z = (self._matrix(X) - np.asarray(self.mean)) / np.asarray(self.scale)
        return Z * np.asarray(self.weights)

    def intervene(self, X, values: Mapping[str, float | str]) -> np.ndarray:
        """The attribute matrix of ``X`` with the named attributes fixed to ``values`` (raw units;
        ``"mean"``: the fitting rows' mean, i.e. a zero contribution) -- a concept intervention.
        Score it with :meth:`decision_function` / :meth:`predict_proba`."""
        X = self._matrix(X).copy()
        unknown = [k for k in values if k not in self.features]
        if unknown:
            raise KeyError(f"cannot set {unknown}: not attributes of this aggregator {self.features}")
        for k, v in values.items():
            j = self.features.index(k)
            X[:, j] = self.mean[j] if v == "mean" else float(v)
        return X

    @property
    def raw_weights(self) -> dict[str, float]:
        """Weights per unit of each attribute (``w_j / scale_j``)."""
        return {f: w / s for f, w, s in zip(self.features, self.weights, self.scale)}

    def ranked_weights(self) -> list[tuple[str, float]]:
        """(feature, standardised weight) by decreasing |weight|."""
        return sorted(zip(self.features, self.weights), key=lambda t: -abs(t[1]))

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "version": 1, "features": list(self.features),
                "mean": [float(v) for v in self.mean], "scale": [float(v) for v in self.scale],
                "weights": [float(v) for v in self.weights], "bias": float(self.bias), "target": self.target,
                "l2": self.l2, "balanced": self.balanced, "metrics": self.metrics,
                "weight_intervals": self.weight_intervals}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Aggregator":
        if d.get("format") != cls.FORMAT:
            raise ValueError(f"not a {cls.FORMAT} file (format={d.get('format')!r})")
        n = len(d["features"])
        if not (len(d["mean"]) == len(d["scale"]) == len(d["weights"]) == n):
            raise ValueError("aggregator JSON: features/mean/scale/weights lengths differ")
        return cls(list(d["features"]), list(d["mean"]), list(d["scale"]), list(d["weights"]), float(d["bias"]),
                   dict(d.get("target", {})), float(d.get("l2", 1e-2)), bool(d.get("balanced", True)),
                   dict(d.get("metrics", {})), dict(d.get("weight_intervals", {})))

    @classmethod
    def load(cls, path: str | Path) -> "Aggregator":
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit_aggregator(X, y, features: Sequence[str], l2: float = 1e-2, balanced: bool = True,
                   target: Mapping | None = None) -> Aggregator:
    """Standardise ``X`` (N, M) and fit the class-balanced logistic aggregator to 0/1 ``y``."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] != len(features):
        raise ValueError(f"{X.shape[1]} columns but {len(features)} feature names")
    st = Standardizer.fit(X)
    w, b = fit_logistic(st(X), y, l2=l2, balanced=balanced)
    return Aggregator(list(features), st.mean.tolist(), st.scale.tolist(), w.tolist(), b, dict(target or {}),
                      l2, balanced)


def bootstrap_weights(X, y, agg: Aggregator, replicates: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of ``agg``'s standardised weights: each replicate resamples the fitting
    rows ``(X, y)`` with replacement (the attributes and label of a row stay together) and refits the
    logistic regression with ``agg``'s standardisation, L2 and balancing, so the replicate weights
    are on the scale of ``agg.weights``. Resamples with one class only are redrawn.

    Returns ``{"replicates", "level", "seed", "weights": {feature: {"estimate", "lo", "hi"}}}``."""
    X = np.asarray(agg._matrix(X), dtype=np.float64)
    Z = (X - np.asarray(agg.mean)) / np.asarray(agg.scale)
    y = np.asarray(y).astype(int).reshape(-1)
    if y.min() == y.max():
        raise ValueError("bootstrap_weights: the fitting rows have one class only")
    rng = np.random.default_rng(seed)
    W = np.empty((replicates, len(agg.features)))
    r = 0
    while r < replicates:
        idx = rng.integers(0, y.size, y.size)
        if y[idx].min() == y[idx].max():
            continue
        W[r] = fit_logistic(Z[idx], y[idx], l2=agg.l2, balanced=agg.balanced)[0]
        r += 1
    lo, hi = np.percentile(W, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=0)
    return {"replicates": int(replicates), "level": level, "seed": seed,
            "weights": {f: {"estimate": float(w), "lo": float(a), "hi": float(b)}
                        for f, w, a, b in zip(agg.features, agg.weights, lo, hi)}}


def correlated_pairs(X, features: Sequence[str], threshold: float = 0.8) -> list[tuple[str, str, float]]:
    """Pairs of attribute columns whose Pearson correlation on the rows ``X`` has ``|r| > threshold``
    (constant columns are skipped), strongest first. The aggregator's weights of such a pair are not
    individually interpretable: the fit can trade one for the other, even flipping a sign."""
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    ok = np.flatnonzero(sd > 1e-12)
    C = np.corrcoef(X[:, ok], rowvar=False).reshape(ok.size, ok.size)
    out = [(features[ok[i]], features[ok[j]], float(C[i, j])) for i in range(ok.size) for j in range(i + 1, ok.size)
           if abs(C[i, j]) > threshold]
    return sorted(out, key=lambda t: -abs(t[2]))


def join_column(rows: Sequence[Mapping], table: Sequence[Mapping], column: str, uid_key: str = "uid",
                skip: bool = False, source: str = "the target file") -> tuple[list[float], dict]:
    """The numeric value of ``column`` in ``table`` for each of ``rows``, matched by ``uid_key`` (the
    order of ``table`` does not matter). Returns ``(values, counts)``; a row without a match or with a
    non-numeric value raises ValueError naming the uids, or -- with ``skip`` -- gets NaN and is
    counted (``counts``: ``{"joined", "missing", "non_numeric"}``). Duplicate uids in ``table`` are an
    error."""
    by_uid: dict = {}
    for i, t in enumerate(table):
        if uid_key not in t:
            raise ValueError(f"{source}: line {i + 1} has no {uid_key!r} column")
        u = str(t[uid_key])
        if u in by_uid:
            raise ValueError(f"{source}: uid {u!r} appears more than once")
        by_uid[u] = t
    values, missing, bad = [], [], []
    for r in rows:
        if uid_key not in r:
            raise ValueError(f"a row has no {uid_key!r} to join {source} on: {dict(list(r.items())[:3])}")
        u = str(r[uid_key])
        t = by_uid.get(u)
        if t is None or column not in t:
            missing.append(u)
            values.append(math.nan)
            continue
        try:
            v = float(t[column])
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            bad.append(f"{u} ({t[column]!r})")
        values.append(v)
    if (missing or bad) and not skip:
        msg = []
        if missing:
            msg.append(f"{len(missing)} uids without a {column!r} value: " + ", ".join(map(repr, missing[:5]))
                       + (" ..." if len(missing) > 5 else ""))
        if bad:
            msg.append(f"{len(bad)} non-numeric {column!r} values: " + ", ".join(bad[:5])
                       + (" ..." if len(bad) > 5 else ""))
        raise ValueError(f"{source}: " + "; ".join(msg) + " (skip such rows with --skip-missing)")
    return values, {"joined": len(rows) - len(missing) - len(bad), "missing": len(missing), "non_numeric": len(bad)}


def binarize(values, threshold="median", reference=None) -> tuple[np.ndarray, float]:
    """``values >= threshold`` as 0/1; ``threshold`` a number or ``"median"`` (of ``reference``,
    default ``values``). Returns (labels, the numeric threshold used)."""
    v = np.asarray(values, dtype=np.float64)
    if isinstance(threshold, str):
        if threshold != "median":
            threshold = float(threshold)
        else:
            threshold = float(np.median(v if reference is None else np.asarray(reference, dtype=np.float64)))
    return (v >= threshold).astype(np.int64), float(threshold)


# ----------------------------------------------------------------------------------------------
# stage 1 from RAHF predictions
# ----------------------------------------------------------------------------------------------
MAP_STATS = ("mean", "max", "area")
RAHF_ATTRIBUTES: tuple[str, ...] = SCORE_NAMES + tuple(f"{m}_{s}" for m in MAP_NAMES
                                                        for s in MAP_STATS) + ("misaligned_words", "misaligned_frac")


def _get(res, key):
    return res[key] if isinstance(res, Mapping) else getattr(res, key)


def _map(res, name: str) -> np.ndarray:
    """A heatmap of a scorer result: ``<name>_map``, ``<name>`` or ``heatmaps[name]``."""
    for key in (f"{name}_map", name):
        try:
            v = _get(res, key)
        except (KeyError, AttributeError):
            continue
        if v is not None:
            return np.asarray(v, dtype=np.float64)
    return np.asarray(_get(res, "heatmaps")[name], dtype=np.float64)


def rahf_attributes(result) -> dict[str, float]:
    """Fine-grained attributes from one scorer result: the four predicted scores; for each heatmap
    its mean, max and area (fraction of pixels > 0.5); the number and fraction of prompt words the
    decoder tagged as misaligned (0 when the scorer did not decode)."""
    out = {k: float(_get(result, "scores")[k]) for k in SCORE_NAMES}
    for m in MAP_NAMES:
        a = _map(result, m)
        out[f"{m}_mean"] = float(a.mean())
        out[f"{m}_max"] = float(a.max())
        out[f"{m}_area"] = float((a > 0.5).mean())
    try:
        words = _get(result, "misaligned_words") or []
        tagged = _get(result, "tagged_prompt") or ""
    except (KeyError, AttributeError):
        words, tagged = [], ""
    n_words = max(1, len(parse_tagged(tagged)[0]))
    out["misaligned_words"] = float(len(words))
    out["misaligned_frac"] = float(len(words)) / n_words
    return out


# ----------------------------------------------------------------------------------------------
# learning curves
# ----------------------------------------------------------------------------------------------
def _budgets(budgets, n: int) -> list[int]:
    out = []
    for b in budgets:
        k = n if b in ("all", None) else int(b)
        if k <= n and k not in out:
            out.append(k)
    return out


def _sample(rng, y, k: int, tries: int = 100) -> np.ndarray | None:
    """k row indices without replacement with both classes of ``y`` present (None if impossible)."""
    n = y.size
    if k >= n:
        return np.arange(n)
    for _ in range(tries):
        idx = rng.choice(n, k, replace=False)
        if 0 < y[idx].sum() < k:
            return idx
    return None


def _summarise(per_seed: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, dict]]:
    out = {}
    for name, by_b in per_seed.items():
        out[name] = {}
        for b, vals in by_b.items():
            v = np.asarray([x for x in vals if x == x], dtype=np.float64)
            out[name][b] = {"mean": float(v.mean()) if v.size else math.nan,
                            "std": float(v.std()) if v.size else math.nan, "n": int(v.size)}
    return out


def learning_curve(attrs_fit, y_fit, attrs_eval, y_eval, emb_fit=None, emb_eval=None,
                   budgets=DEFAULT_BUDGETS, seeds: int = 5, l2_cbm: float = 1e-2, l2_coarse: float = 1.0,
                   seed: int = 0) -> dict:
    """ROC-AUC on the eval rows of (a) the aggregator on attributes and (b) the coarse logistic model
    on embeddings, each fitted on ``k`` random labelled rows for ``k`` in ``budgets`` (``"all"``:
    every row), averaged over ``seeds`` draws (both models see the same rows).

    Returns ``{"budgets": [...], "curves": {"cbm"|"coarse": {k: {"mean", "std", "n"}}}}``.
    """
    A, Ae = np.asarray(attrs_fit, np.float64), np.asarray(attrs_eval, np.float64)
    y, ye = np.asarray(y_fit).astype(int), np.asarray(y_eval).astype(int)
    ks = _budgets(budgets, y.size)
    per: dict[str, dict[int, list[float]]] = {"cbm": {k: [] for k in ks}}
    if emb_fit is not None:
        E, Ee = np.asarray(emb_fit, np.float64), np.asarray(emb_eval, np.float64)
        per["coarse"] = {k: [] for k in ks}
    rng = np.random.default_rng(seed)
    for k in ks:
        for _ in range(1 if k >= y.size else seeds):
            idx = _sample(rng, y, k)
            if idx is None:
                continue
            st = Standardizer.fit(A[idx])
            w, b = fit_logistic(st(A[idx]), y[idx], l2=l2_cbm)
            per["cbm"][k].append(roc_auc(st(Ae) @ w + b, ye))
            if emb_fit is not None:
                st = Standardizer.fit(E[idx])
                w, b = fit_logistic(st(E[idx]), y[idx], l2=l2_coarse)
                per["coarse"][k].append(roc_auc(st(Ee) @ w + b, ye))
    return {"budgets": ks, "curves": _summarise(per)}


def format_curve_table(curve: Mapping, metric: str = "ROC-AUC") -> str:
    """Markdown table: one row per model, one column per budget, ``mean ± std``."""
    ks = curve["budgets"]
    lines = [f"| model ({metric}) | " + " | ".join(f"n={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for name, by_k in curve["curves"].items():
        cells = []
        for k in ks:
            c = by_k.get(k) or by_k.get(str(k))
            cells.append("" if c is None or c["n"] == 0 else
                         (f"{c['mean']:.3f}" if c["n"] == 1 else f"{c['mean']:.3f} ± {c['std']:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curve: Mapping, path: str | Path, title: str = "", ylabel: str = "ROC-AUC (held out)") -> None:
    """Save a PNG of the curves (x: label budget, log scale; y: mean with a ±std band)."""
    matplotlib = require("matplotlib", extra="report", purpose="plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = curve["budgets"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    colours = {"coarse": "black", "cbm": "tab:purple", "cbm-right": "tab:red", "cbm-extra": "tab:blue",
               "cbm-mismatched": "tab:orange", "oracle-attributes": "tab:grey"}
    for name, by_k in curve["curves"].items():
        xs = [k for k in ks if (by_k.get(k) or by_k.get(str(k)) or {}).get("n")]
        m = np.array([(by_k.get(k) or by_k.get(str(k)))["mean"] for k in xs])
        s = np.array([(by_k.get(k) or by_k.get(str(k)))["std"] for k in xs])
        c = colours.get(name)
        ax.plot(xs, m, "o--" if name.startswith("oracle") else "o-", label=name, color=c)
        ax.fill_between(xs, m - s, m + s, alpha=0.15, color=c)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("labelled examples (N)")
    ax.set_ylabel(ylabel)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def read_table(path: str | Path) -> list[dict]:
    """Rows of a JSONL (one object a line) or CSV (header row) file; numeric strings become floats."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import csv

        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k, v in r.items():
                try:
                    r[k] = float(v)
                except (TypeError, ValueError):
                    pass
    return rows


# ----------------------------------------------------------------------------------------------
# the controlled experiment (the concept-bottleneck paper's Experiment 2) on synth data
# ----------------------------------------------------------------------------------------------
def image_features(image) -> np.ndarray:
    """Simple frozen image features (no learning): an 8x8 RGB thumbnail (192), HSV statistics,
    grain (mean |pixel - 3x3 box blur|, per channel), colourful-pixel fraction and a 12-bin hue
    histogram of colourful pixels, dark-pixel fraction, gradient energy, mean colour. float64, length 228."""
    from PIL import Image

    im = image.convert("RGB")
    a = np.asarray(im, dtype=np.float64) / 255.0
    thumb = np.asarray(im.resize((8, 8), Image.Resampling.BOX), dtype=np.float64).reshape(-1) / 255.0
    mx, mn = a.max(axis=2), a.min(axis=2)
    v = mx
    s = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    d = np.maximum(mx - mn, 1e-12)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) / 6.0
    colourful = (s > 0.45) & (v > 0.3)
    hist = np.bincount(np.minimum((h[colourful] * 12).astype(int), 11), minlength=12) / a[..., 0].size
    pad = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    blur = sum(pad[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3)) / 9.0
    grain = np.abs(a - blur).mean(axis=(0, 1))
    gy, gx = np.abs(np.diff(v, axis=0)).mean(), np.abs(np.diff(v, axis=1)).mean()
    stats = [s.mean(), s.std(), v.mean(), v.std(), colourful.mean(), (v < 0.25).mean(), gx, gy,
             np.median(s), np.median(v), a.std(axis=(0, 1)).mean(), (s > 0.8).mean()]
    return np.concatenate([thumb, np.asarray(stats), grain, hist, a.mean(axis=(0, 1)),
                           np.abs(np.diff(a, axis=0)).mean(axis=(0, 1)), np.abs(np.diff(a, axis=1)).mean(axis=(0, 1))])


def synth_attributes(record, aesthetics_threshold: float = 0.55) -> dict[str, int]:
    """Known binary attributes of a regenerated synth record (``rahf.data.synth.make_record``).

    artifact: at least one rendering artifact; dull: background dullness > 0.5; cluttered: >= 4
    objects drawn; misaligned: some prompt word tagged; aesthetic: aesthetics score >= threshold;
    relation: the prompt has a spatial relation; big: a group drawn big; many_colours: >= 3 distinct
    drawn colours; off_centre: objects' area-weighted centroid > 0.15 of the side from the centre.
    """
    sc = record.scene
    drawn = [p for p in sc.instances if p.drawn]
    w = np.array([p.r ** 2 for p in drawn]) if drawn else np.ones(1)
    cx = float(np.dot([p.x for p in drawn], w) / w.sum()) if drawn else 0.5
    cy = float(np.dot([p.y for p in drawn], w) / w.sum()) if drawn else 0.5
    return {
        "artifact": int(len(sc.artifacts) > 0),
        "dull": int(sc.dull > 0.5),
        "cluttered": int(len(drawn) >= 4),
        "misaligned": int(any(record.misaligned)),
        "aesthetic": int(record.scores["aesthetics"] >= aesthetics_threshold),
        "relation": int(sc.spec.relation is not None),
        "big": int(any(g.size == "big" for g in sc.drawn)),
        "many_colours": int(len({sc.drawn[p.group].colour for p in drawn}) >= 3),
        "off_centre": int(math.hypot(cx - 0.5, cy - 0.5) > 0.15),
    }


SYNTH_ATTRIBUTES: tuple[str, ...] = ("artifact", "dull", "cluttered", "misaligned", "aesthetic", "relation", "big",
                                     "many_colours", "off_centre")


@dataclass(frozen=True)
class Tree:
    """A decision-tree target over three binary attributes (root, then two branches)."""

    name: str
    attributes: tuple[str, str, str]
    rule: Callable[[Mapping[str, int]], int]
    text: str


TREES: dict[str, Tree] = {
    # image-only, as in the concept-bottleneck paper's Experiment 2: every attribute is visible in the pixels
    "image": Tree("image", ("dull", "artifact", "cluttered"),
                  lambda a: int(not a["artifact"]) if a["dull"] else int(not a["cluttered"]),
                  "dull background? yes -> good iff no artifact; no -> good iff not cluttered"),
    # the RAHF feedback dimensions; 'misaligned' needs the prompt: use with --checkpoint embeddings
    "feedback": Tree("feedback", ("artifact", "misaligned", "aesthetic"),
                     lambda a: int(a["aesthetic"]) if a["artifact"] else int(not a["misaligned"]),
                     "artifact? yes -> good iff aesthetic; no -> good iff aligned"),
}


# ----------------------------------------------------------------------------------------------
# probes of selectable capacity (stage 1 and the coarse model)
# ----------------------------------------------------------------------------------------------
CAPACITIES = ("linear", "mlp")


def fit_mlp(X, Y, hidden: int = 32, l2: float = 1e-2, seed: int = 0, max_iter: int = 300):
    """A one-hidden-layer network (tanh, ``hidden`` units shared by every output) with a sigmoid
    output per column of the 0/1 matrix ``Y`` (N, T), fitted by class-balanced log loss (per output)
    plus ``l2/2 |W|^2`` with L-BFGS (scipy) and the exact gradient. Returns a function X -> logits (N, T)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64).reshape(X.shape[0], -1)
    n, d = X.shape
    T = Y.shape[1]
    S = np.stack([class_weights(Y[:, t]) for t in range(T)], 1) / n
    rng = np.random.default_rng(seed)
    shapes = [(d, hidden), (hidden,), (hidden, T), (T,)]
    sizes = [int(np.prod(s)) for s in shapes]

    def unpack(theta):
        out, i = [], 0
        for s, k in zip(shapes, sizes):
            out.append(theta[i:i + k].reshape(s))
            i += k
        return out

    def f(theta):
        W1, b1, W2, b2 = unpack(theta)
        H = np.tanh(X @ W1 + b1)
        Z = H @ W2 + b2
        loss = float(np.sum(S * (np.logaddexp(0.0, Z) - Y * Z))) + 0.5 * l2 * (np.sum(W1 ** 2) + np.sum(W2 ** 2))
        G = S * (expit(Z) - Y)
        gW2 = H.T @ G + l2 * W2
        GH = (G @ W2.T) * (1 - H ** 2)
        gW1 = X.T @ GH + l2 * W1
        return loss, np.concatenate([gW1.ravel(), GH.sum(0), gW2.ravel(), G.sum(0)])

    theta0 = np.concatenate([rng.normal(0, 1 / math.sqrt(d), d * hidden), np.zeros(hidden),
                             rng.normal(0, 1 / math.sqrt(hidden), hidden * T), np.zeros(T)])
    res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    W1, b1, W2, b2 = unpack(res.x)
    return lambda Xn: np.tanh(np.asarray(Xn, np.float64) @ W1 + b1) @ W2 + b2


def fit_probe(X, Y, capacity: str = "linear", l2: float = 1.0, hidden: int = 32, seed: int = 0):
    """Classifiers of every 0/1 column of ``Y`` from standardised ``X``: ``linear`` (one
    class-balanced logistic regression per column) or ``mlp`` (:func:`fit_mlp`). The coarse model and
    stage 1 use the same function, so their capacity is equal. Returns a function X -> logits (N, T)."""
    Y = np.asarray(Y, dtype=np.float64).reshape(np.shape(X)[0], -1)
    if capacity == "linear":
        wb = [fit_logistic(X, Y[:, t], l2=l2) for t in range(Y.shape[1])]
        W, b = np.stack([w for w, _ in wb], 1), np.array([c for _, c in wb])
        return lambda Xn: np.asarray(Xn, np.float64) @ W + b
    if capacity == "mlp":
        return fit_mlp(X, Y, hidden=hidden, l2=l2, seed=seed)
    raise ValueError(f"capacity must be one of {CAPACITIES}, got {capacity!r}")


def _stage1(F, attrs, idx, Fe, l2, capacity="linear", hidden=32, folds: int = 0, rng=None):
    """Stage 1 fitted on rows ``idx``: attribute logits of the eval rows ``Fe`` and, if ``folds`` > 1,
    out-of-fold logits of the ``idx`` rows (else None)."""
    def fit_predict(tr, X_out):
        st = Standardizer.fit(F[tr])
        return fit_probe(st(F[tr]), attrs[tr], capacity, l2, hidden)(st(X_out))

    ev = fit_predict(idx, Fe)
    if folds <= 1:
        return ev, None
    oof = np.empty((idx.size, attrs.shape[1]))
    parts = np.array_split((rng or np.random.default_rng(0)).permutation(idx.size), min(folds, idx.size))
    for p in parts:
        mask = np.ones(idx.size, bool)
        mask[p] = False
        oof[p] = fit_predict(idx[mask], F[idx[p]])
    return ev, oof


def _auc_rows(S, y) -> np.ndarray:
    """ROC-AUC of each row of scores ``S`` (R, n) against labels ``y`` (R, n) (Mann-Whitney, ties 1/2)."""
    from scipy.stats import rankdata

    r = rankdata(S, axis=1)
    npos = y.sum(1)
    nneg = y.shape[1] - npos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * y).sum(1) - npos * (npos + 1) / 2) / (npos * nneg)


def paired_bootstrap(scores: Mapping[str, np.ndarray], y, reference: str = "coarse", replicates: int = 500,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Intervals for models scored on the same eval rows over the same training draws.

    ``scores``: {model: (D draws, n eval rows) scores}. Each replicate resamples the draws and the
    eval rows (with replacement, the same resample for every model: a paired bootstrap) and takes
    each model's mean ROC-AUC over the resampled draws. Returns ``{"models": {m: {"mean", "lo",
    "hi"}}, "diff": {m: {"mean", "lo", "hi"}}}`` where diff is model minus ``reference``; ``mean``
    is the estimate on the data as drawn, lo/hi the percentile interval at ``level``."""
    y = np.asarray(y).astype(int)
    rng = np.random.default_rng(seed)
    D, n = next(iter(scores.values())).shape
    rows = rng.integers(0, n, (replicates, n))
    draws = rng.integers(0, D, (replicates, D))
    Y = y[rows]
    boot, point = {}, {}
    for m, S in scores.items():
        S = np.asarray(S, dtype=np.float64)
        per = np.stack([_auc_rows(S[d][rows], Y) for d in range(D)], 1)  # (R, D)
        boot[m] = np.take_along_axis(per, draws, 1).mean(1)
        point[m] = float(np.mean([roc_auc(S[d], y) for d in range(D)]))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def iv(est, b):
        lo, hi = np.nanpercentile(b, q)
        return {"mean": est, "lo": float(lo), "hi": float(hi)}

    out = {"models": {m: iv(point[m], boot[m]) for m in scores}, "diff": {}}
    if reference in scores:
        out["diff"] = {m: iv(point[m] - point[reference], boot[m] - boot[reference]) for m in scores if m != reference}
    return out


def controlled_experiment(feats_fit, attrs_fit: Mapping[str, np.ndarray], feats_eval,
                          attrs_eval: Mapping[str, np.ndarray], tree: Tree, budgets=DEFAULT_BUDGETS,
                          seeds: int = 5, l2_features: float = 1.0, l2_cbm: float = 1e-2, seed: int = 0,
                          mismatched: Sequence[str] | None = None, extra: Sequence[str] | None = None,
                          training: str = "sequential", folds: int = 5, capacity: str = "linear", hidden: int = 32,
                          axis: str = "images", attribute_cost: float = 1.0, replicates: int = 500) -> dict:
    """The concept-bottleneck paper's Experiment 2 with exact attributes. The target ``t = tree(attributes)``.

    For each budget and draw, every model is fitted on rows of the same random order (paired draws):
    the *coarse* model (:func:`fit_probe` of ``capacity``, features -> ``t``) and CBMs whose stage 1
    is the same kind of probe (features -> attributes) and whose stage 2 is the logistic aggregator.
    ``training="sequential"`` (default): stage 2 is fitted on stage 1's out-of-fold probabilities of
    the training rows (``folds``-fold), as it will be used; ``"independent"``: on their true attributes.
    At test the aggregator reads stage 1's predicted probabilities. CBM variants: ``cbm-right`` (the
    tree's 3 attributes), ``cbm-extra`` (those + ``extra``, default: all others), ``cbm-mismatched``
    (``mismatched``, default: all not in the tree). ``oracle-attributes``: the right-attribute
    aggregator on the *true* eval attributes (the ceiling of a linear aggregator).

    ``axis="images"``: a budget is a number of labelled images, the same rows for every model.
    ``axis="cost"``: a budget is a labelling cost; a coarse label costs 1 and an attribute label
    ``attribute_cost``, so a CBM with m attributes gets ``budget / (1 + m * attribute_cost)`` images
    (the first ones of the draw's order) and the coarse model ``budget`` images (at most all rows).

    Returns ``{"budgets", "curves" ({model: {budget: {"mean", "std", "n"}}}), "intervals" ({budget:
    paired_bootstrap(...)}), "rows" ({model: {budget: images used}}), "sets", "positive_rate", ...}``.
    """
    if training not in ("sequential", "independent"):
        raise ValueError(f"training must be 'sequential' or 'independent', got {training!r}")
    if axis not in ("images", "cost"):
        raise ValueError(f"axis must be 'images' or 'cost', got {axis!r}")
    names = list(attrs_fit)
    F, Fe = np.asarray(feats_fit, np.float64), np.asarray(feats_eval, np.float64)
    Afit = np.stack([np.asarray(attrs_fit[n]) for n in names], 1).astype(np.float64)
    Aev = np.stack([np.asarray(attrs_eval[n]) for n in names], 1).astype(np.float64)
    t = np.array([tree.rule(dict(zip(names, row))) for row in Afit.astype(int)])
    te = np.array([tree.rule(dict(zip(names, row))) for row in Aev.astype(int)])
    right = list(tree.attributes)
    others = [n for n in names if n not in right]
    sets = {"cbm-right": right, "cbm-extra": right + list(extra if extra is not None else others),
            "cbm-mismatched": list(mismatched if mismatched is not None else others)}
    col = {n: i for i, n in enumerate(names)}
    models = ["coarse", *sets, "oracle-attributes"]
    cost = {"coarse": 1.0, **{m: 1.0 + len(s) * attribute_cost for m, s in sets.items()}}
    cost["oracle-attributes"] = cost["cbm-right"]
    N = t.size
    if axis == "images":
        ks = _budgets(budgets, N)
        n_rows = {m: {k: k for k in ks} for m in models}
    else:
        ks = [int(b) for b in budgets if b not in ("all", None)]
        n_rows = {m: {k: min(N, int(k // cost[m])) for k in ks} for m in models}
    scores = {k: {m: [] for m in models} for k in ks}
    rng = np.random.default_rng(seed)
    for k in ks:
        full = all(n_rows[m][k] >= N for m in models)
        for _ in range(1 if full else seeds):
            order = rng.permutation(N)
            if not all(0 < t[order[: n_rows[m][k]]].sum() < n_rows[m][k] for m in models):
                continue  # a model would see one class only: redraw budget's rows next time
            cache: dict[int, tuple] = {}

            def stage1(n):
                if n not in cache:
                    idx = order[:n]
                    ev, oof = _stage1(F, Afit, idx, Fe, l2_features, capacity, hidden,
                                      folds if training == "sequential" else 0, rng)
                    cache[n] = (idx, expit(ev), Afit[idx] if training == "independent" else expit(oof))
                return cache[n]

            idx = order[: n_rows["coarse"][k]]
            st = Standardizer.fit(F[idx])
            scores[k]["coarse"].append(fit_probe(st(F[idx]), t[idx], capacity, l2_features, hidden)(st(Fe))[:, 0])
            for name, s in sets.items():
                i1, P, S = stage1(n_rows[name][k])
                cols = [col[n] for n in s]
                agg = fit_aggregator(S[:, cols], t[i1], s, l2=l2_cbm)
                scores[k][name].append(agg.decision_function(P[:, cols]))
            i1 = order[: n_rows["oracle-attributes"][k]]
            rc = [col[n] for n in right]
            agg = fit_aggregator(Afit[i1][:, rc], t[i1], right, l2=l2_cbm)
            scores[k]["oracle-attributes"].append(agg.decision_function(Aev[:, rc]))
    per = {m: {k: [roc_auc(s, te) for s in scores[k][m]] for k in ks} for m in models}
    intervals = {k: paired_bootstrap({m: np.stack(scores[k][m]) for m in models}, te, replicates=replicates,
                                     seed=seed) for k in ks if scores[k]["coarse"]}
    return {"budgets": ks, "curves": _summarise(per), "intervals": intervals, "rows": n_rows, "sets": sets,
            "tree": tree.text, "axis": axis, "attribute_cost": attribute_cost, "training": training,
            "capacity": capacity, "positive_rate": {"fit": float(t.mean()), "eval": float(te.mean())}}


def verdicts(result: Mapping, reference: str = "coarse") -> list[str]:
    """One line per (budget, CBM variant) whose paired 95 % interval of the ROC-AUC difference to
    ``reference`` excludes 0; budgets where it does not are within noise and get no line."""
    out = []
    for k, iv in result["intervals"].items():
        for m, d in iv["diff"].items():
            if m.startswith("cbm") and (d["lo"] > 0 or d["hi"] < 0):
                rel = "above" if d["lo"] > 0 else "below"
                out.append(f"{result['axis']} budget {k}: {m} {rel} {reference} by {d['mean']:+.3f} "
                           f"(95% interval {d['lo']:+.3f} .. {d['hi']:+.3f})")
    return out


def format_interval_table(result: Mapping) -> str:
    """Markdown table: one row per model, one column per budget, ``mean [lo, hi]`` of ROC-AUC and,
    for the CBMs, the paired difference to the coarse model."""
    ks = [k for k in result["budgets"] if k in result["intervals"]]
    lines = ["| model | " + " | ".join(f"{result['axis']} {k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    models = list(result["intervals"][ks[0]]["models"]) if ks else []
    for m in models:
        cells = []
        for k in ks:
            v = result["intervals"][k]["models"][m]
            cells.append(f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={result['rows'][m][k]})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in models:
        if m.startswith("cbm"):
            cells = [("{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]".format(**result["intervals"][k]["diff"][m])) for k in ks]
            lines.append(f"| {m} − coarse | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_UID = re.compile(r"^synth-(?P<split>[a-z]+)-(?P<index>\d+)$")


def regenerate_synth(root: str | Path, split: str, entries: Sequence[Mapping]) -> list:
    """Re-create the synth records of ``entries`` (manifest lines) from the dataset's seed and size,
    checking each against its manifest (prompt and tags). Raises ValueError if the data is not
    reproducible synth data."""
    from ..data.format import read_dataset_info
    from ..data.synth import make_record

    info = read_dataset_info(root)
    if info.get("source") != "synth":
        raise ValueError(f"{root} is not a synth dataset (dataset.json source={info.get('source')!r}); the "
                         "controlled experiment needs the known attributes of synth scenes")
    seed, size = int(info.get("seed", 0)), int(info.get("size", 128))
    easy = dict(info.get("easy_fraction") or {})
    out = []
    for e in entries:
        m = _UID.match(e["uid"])
        if not m:
            raise ValueError(f"record {e['uid']!r}: not a synth uid")
        rec = make_record(seed, m["split"], int(m["index"]), size, float(easy.get(m["split"], 0.0)))
        if rec.tagged_prompt != e["tagged_prompt"]:
            raise ValueError(f"record {e['uid']!r}: regenerated tags differ from the manifest "
                             "(different generator version?)")
        out.append(rec)
    return out


# bump when image_features, synth_attributes or the synth generator change what they return
SYNTH_CACHE_VERSION = 1


def synth_cache_key(root: str | Path, split: str, entries: Sequence[Mapping], aesthetics_threshold: float,
                    features: bool) -> str:
    """A hex key of everything the cached arrays depend on: the cache version, the dataset's generator
    settings (dataset.json: seed, size, easy fraction), the split, every record's uid and tagged
    prompt (in order), the aesthetics threshold and whether image features are included."""
    import hashlib

    from ..data.format import read_dataset_info

    info = read_dataset_info(root)
    h = hashlib.sha256(json.dumps({
        "version": SYNTH_CACHE_VERSION, "source": info.get("source"), "seed": info.get("seed"),
        "size": info.get("size"), "easy_fraction": info.get("easy_fraction"), "split": split,
        "aesthetics_threshold": float(aesthetics_threshold), "features": bool(features)}, sort_keys=True).encode())
    for e in entries:
        h.update(f"{e['uid']}\t{e['tagged_prompt']}\n".encode())
    return h.hexdigest()[:20]


def default_synth_cache_dir(root: str | Path) -> Path:
    """``<root>/.cache/cbm`` beside the data when that is writable, else ``$XDG_CACHE_HOME/rahf/cbm``
    (``~/.cache/rahf/cbm``)."""
    import os

    local = Path(root) / ".cache" / "cbm"
    try:
        local.mkdir(parents=True, exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rahf" / "cbm"


def synth_arrays(root: str | Path, split: str, entries: Sequence[Mapping], aesthetics_threshold: float = 0.55,
                 features: bool = True, cache_dir: str | Path | None = None) -> tuple[np.ndarray | None, dict, str]:
    """Known attributes (``{name: (N,) int array}`` of :data:`SYNTH_ATTRIBUTES`) and, with ``features``,
    :func:`image_features` (N, 228) of the synth records ``entries`` of ``split``.

    They take a re-render of every record (:func:`regenerate_synth`); with ``cache_dir`` they are
    stored there as ``<split>-<key>.npz`` (:func:`synth_cache_key`) and read back while the key
    matches -- a changed dataset, threshold or cache version gives a new key, so a stale file is
    never read. Returns ``(features or None, attributes, status)``, status ``"hit"``, ``"miss"``
    (computed and written) or ``"off"`` (no cache)."""
    path = None
    if cache_dir is not None:
        key = synth_cache_key(root, split, entries, aesthetics_threshold, features)
        path = Path(cache_dir) / f"{split}-{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                if list(z["names"]) == list(SYNTH_ATTRIBUTES) and z["attributes"].shape[0] == len(entries):
                    return (z["features"] if features else None,
                            {n: z["attributes"][:, j] for j, n in enumerate(SYNTH_ATTRIBUTES)}, "hit")
    recs = regenerate_synth(root, split, entries)
    A = np.array([[synth_attributes(r, aesthetics_threshold)[n] for n in SYNTH_ATTRIBUTES] for r in recs],
                 dtype=np.int64).reshape(len(recs), len(SYNTH_ATTRIBUTES))
    F = np.stack([image_features(r.image) for r in recs]) if features else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, names=np.array(SYNTH_ATTRIBUTES), attributes=A,
                 **({"features": F} if features else {}))
        tmp.replace(path)
    return F, {n: A[:, j] for j, n in enumerate(SYNTH_ATTRIBUTES)}, "miss" if path is not None else "off"
