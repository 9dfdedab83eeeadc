"""Evaluation metrics for RAHF: per-map heatmap metrics, score correlations, keyword P/R/F1.

Everything here is a pure function of tensors / strings (torch, numpy, scipy only), so it can be
used from training loops, offline evaluation and tests alike.

Heatmap metrics
---------------
``mse, cc, kld, sim, nss, auc_judd`` take ``(pred, gt)`` of shape ``(B, H, W)`` (or ``(B, N)``;
every dimension after the first is flattened into the N pixels of one map), values in [0, 1],
and return one value per map: a float64 tensor of shape ``(B,)``. They are fully vectorised over
the batch (large batches are processed in chunks internally to bound memory and stay in cache)
and compute in float64; AUC-Judd only needs the order of the values, which it gets exactly (one
sort of packed int64 keys per map) and counts in int64. Tensors on another device are moved to the
CPU.
``pred`` must already be resized to ``gt``'s size. Inputs are expected to be finite.

Notation for one map: p = prediction, g = ground truth, N pixels, F = {g > 0}, K = |F|,
ε = 1e-8 (:data:`EPS`).

* Empty ground truth (K = 0): ``cc, kld, sim, nss, auc_judd`` return NaN — they are only defined on
  maps with non-empty ground truth, and :class:`MetricAccumulator` averages them over those maps
  only. ``mse`` is defined for every map.
* Constant maps (max == min, tested exactly, so no rounding noise): ``cc`` is 0 if p or g is
  constant; ``nss`` is 0 if p is constant (also when N = 1, where the unbiased std is undefined);
  ``auc_judd`` of a constant p is 0.5 (the single threshold gives the point (1, 1)). No division
  by zero ever happens and no warnings are raised.
* ``auc_judd`` with ground truth covering every pixel (K = N): the FPR is undefined, NaN is
  returned; the aggregator skips NaN values (``nanmean``) and reports how many maps entered.

Score metrics
-------------
:func:`plcc` / :func:`srcc` on 1-D inputs return a Python float; NaN if fewer than two values or
either input is constant. SRCC uses average ranks for ties (same as ``scipy.stats.spearmanr``).

Keyword metrics
---------------
:func:`keyword_counts` / :func:`keyword_metrics` compare decoded tagged prompts with target tagged
prompts position by position (see their docstrings for the exact conventions). A pooled rate with
a zero denominator (precision when no word was tagged) is NaN.

Aggregation
-----------
:class:`MetricAccumulator` (``update`` per batch, ``compute`` at the end) and
:func:`evaluate_predictions` produce a flat ``dict[str, float]``; a metric that cannot be computed
is NaN there and :meth:`MetricAccumulator.unavailable` gives its reason. :func:`format_tables`
renders the dict in the paper's table layout (``n/a (reason)`` for unavailable metrics).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from scipy.stats import kendalltau, rankdata

from ..schema import MAP_NAMES, SCORE_NAMES, parse_tagged

__all__ = [
    "EPS",
    "HEATMAP_METRICS",
    "mse",
    "cc",
    "kld",
    "sim",
    "nss",
    "auc_judd",
    "heatmap_metrics",
    "plcc",
    "srcc",
    "KeywordCounts",
    "keyword_counts",
    "keyword_metrics",
    "MetricAccumulator",
    "evaluate_predictions",
    "format_tables",
]

EPS = 1e-8
#: Per-map metrics computed by :func:`heatmap_metrics`, in table order.
HEATMAP_METRICS: tuple[str, ...] = ("mse", "cc", "kld", "sim", "nss", "auc_judd")
# Upper bound on B * N elements processed at once: small chunks keep the float64 temporaries of the
# elementwise metrics in cache (several times faster than whole-batch ops); AUC-Judd's sort
# temporaries (int64 keys, counts) are bounded by its own limit.
_CHUNK_ELEMS = 1 << 18
_AUC_CHUNK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------
def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def _flatten_pair(pred, gt) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = _as_tensor(pred), _as_tensor(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != gt shape {tuple(g.shape)} (resize pred to gt first)")
    if p.ndim < 2:
        raise ValueError(f"expected (B, H, W) or (B, N) maps, got shape {tuple(p.shape)}")
    b = p.shape[0]
    p = p.reshape(b, -1).cpu()
    g = g.reshape(b, -1).cpu()
    if not p.is_floating_point():
        p = p.double()
    if not g.is_floating_point():
        g = g.double()
    return p, g


def _chunk_elems(fn) -> int:
    return _AUC_CHUNK_ELEMS if fn is _auc_judd_k else _CHUNK_ELEMS


def _chunks(b: int, n: int, elems: int) -> Iterable[slice]:
    step = max(1, elems // max(n, 1))
    for s in range(0, b, step):
        yield slice(s, min(b, s + step))


def _batched(fn, pred, gt) -> torch.Tensor:
    p, g = _flatten_pair(pred, gt)
    b, n = p.shape
    if b == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([fn(p[s], g[s]) for s in _chunks(b, n, _chunk_elems(fn))])


# ----------------------------------------------------------------------------------------------
# per-map metrics: chunk kernels (p, g are (b, N); return (b,) float64)
# ----------------------------------------------------------------------------------------------
def _mse_k(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    d = p.double() - g.double()
    return (d * d).mean(1)


def _empty(g: torch.Tensor) -> torch.Tensor:
    return ~(g > 0).any(1)


def _constant(x: torch.Tensor) -> torch.Tensor:
    return x.amax(1) == x.amin(1)


def _cc_k(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    const = _constant(p) | _constant(g)
    pd, gd = p.double(), g.double()
    pc = pd - pd.mean(1, keepdim=True)
    gc = gd - gd.mean(1, keepdim=True)
    num = (pc * gc).sum(1)
    den = torch.sqrt((pc * pc).sum(1) * (gc * gc).sum(1))
    den = torch.where(const | (den == 0), torch.ones_like(den), den)
    out = torch.where(const, torch.zeros_like(num), num / den)
    return out.masked_fill(_empty(g), math.nan)


def _normalised(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pd, gd = p.double(), g.double()
    return pd / (pd.sum(1, keepdim=True) + EPS), gd / (gd.sum(1, keepdim=True) + EPS)


def _kld_k(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    P, G = _normalised(p, g)
    out = (G * torch.log(G / (P + EPS) + EPS)).sum(1)
    return out.masked_fill(_empty(g), math.nan)


def _sim_k(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    P, G = _normalised(p, g)
    out = torch.minimum(P, G).sum(1)
    return out.masked_fill(_empty(g), math.nan)


def _nss_k(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = p.shape[1]
    F = g > 0
    const = _constant(p) | (n < 2)
    pd = p.double()
    pc = pd - pd.mean(1, keepdim=True)
    std = torch.sqrt((pc * pc).sum(1) / max(n - 1, 1))
    std = torch.where(const | (std == 0), torch.ones_like(std), std)
    k = F.sum(1)
    s = (pc * F).sum(1) / std
    out = torch.where(const, torch.zeros_like(s), s / k.clamp_min(1))
    return out.masked_fill(k == 0, math.nan)


def _sorted_keys(p: torch.Tensor, F: torch.Tensor) -> np.ndarray:
    """Each row's pixels as int64 keys, sorted ascending: ``key >> 1`` is a code that is monotone in
    p (equal codes iff equal values) and ``key & 1`` is 0 for pixels of F, 1 otherwise — so within a
    tie group the F pixels come first.

    float16/bfloat16/float32 inputs (exactly representable in float32): the code is the float32
    bit pattern mapped to a monotone integer, so a single value-only sort (numpy's SIMD sort) of
    the packed keys orders everything. float64 inputs: the code is the value's dense rank
    (``np.unique``), then the same sort.
    """
    notF = np.logical_not(F.numpy())
    if p.dtype in (torch.float16, torch.bfloat16, torch.float32):
        a = p.float().numpy() + np.float32(0.0)  # -0.0 -> +0.0 so equal values share one bit pattern
        bits = a.view(np.int32)
        if a.size and a.min() < 0:
            bits = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)  # monotone in the value
        keys = bits.astype(np.int64)
    else:
        a = p.double().numpy() + 0.0
        keys = np.unique(a, return_inverse=True)[1].reshape(a.shape).astype(np.int64)
    keys <<= 1
    keys |= notF
    keys.sort(axis=1)
    return keys


def _auc_judd_k(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """AUC-Judd by one sort per map; ties handled exactly.

    Pixels are sorted ascending with the F pixels first inside each tie group (see
    :func:`_sorted_keys`). A threshold t is a tie group containing an F pixel; its first element j
    (row position) is then an F pixel that starts the group, and with r = #F before j (the rank of
    that F pixel among the row's F pixels): TP = K − r, FP = (N − K) − (j − r). The trapezoid sum
    over (1, 1), the thresholds in ascending t, (0, 0) is accumulated as exact integers
    (2·area·K·(N − K)) and divided once at the end. Work beyond the sort is O(N) for finding the F
    pixels plus O(K).
    """
    b, n = p.shape
    F = (g > 0).contiguous()
    K = np.count_nonzero(F.numpy(), axis=1).astype(np.int64)
    neg = n - K
    keys = _sorted_keys(p.contiguous(), F)
    flat = keys.reshape(-1)
    posF = np.flatnonzero((flat & 1) == 0)  # F pixels in sorted order, row-major
    rowsF = posF // n
    colF = posF - rowsF * n
    offset = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(K, out=offset[1:])
    rank = np.arange(posF.size, dtype=np.int64) - offset[rowsF]  # #F before it in its row
    group_start = colF == 0
    inner = ~group_start
    group_start[inner] = (flat[posF[inner]] >> 1) != (flat[posF[inner] - 1] >> 1)
    del keys, flat
    rows = rowsF[group_start]
    r = rank[group_start]
    tp = K[rows] - r  # #F with p >= t
    fp = neg[rows] - (colF[group_start] - r)  # #not-F with p >= t
    m = rows.size
    last = np.ones(m, dtype=np.bool_)  # highest threshold of its row; its neighbour is (0, 0)
    first = np.ones(m, dtype=np.bool_)  # lowest threshold of its row (TP = K); neighbour (1, 1)
    if m > 1:
        np.not_equal(rows[1:], rows[:-1], out=last[:-1])
        first[1:] = last[:-1]
    tp_next = np.roll(tp, -1)
    fp_next = np.roll(fp, -1)
    tp_next[last] = 0
    fp_next[last] = 0
    w = ((fp - fp_next) * (tp + tp_next)).astype(np.float64)  # exact: |sum| <= 2 K (N - K) < 2**53
    twice = np.bincount(rows, weights=w, minlength=b)
    rf = rows[first]
    twice += np.bincount(rf, weights=((neg[rf] - fp[first]) * 2 * K[rf]).astype(np.float64), minlength=b)
    valid = (K > 0) & (neg > 0)
    den = 2.0 * np.maximum(K, 1) * np.maximum(neg, 1)
    area = np.where(valid, twice / den, np.nan)
    return torch.from_numpy(area)


_KERNELS = {"mse": _mse_k, "cc": _cc_k, "kld": _kld_k, "sim": _sim_k, "nss": _nss_k, "auc_judd": _auc_judd_k}


# ----------------------------------------------------------------------------------------------
# per-map metrics: public API
# ----------------------------------------------------------------------------------------------
def mse(pred, gt) -> torch.Tensor:
    """Per-map mean squared error: mean over pixels of (p − g)². Defined for every map (also empty GT).

    Returns (B,) float64.
    """
    return _batched(_mse_k, pred, gt)


def cc(pred, gt) -> torch.Tensor:
    """Per-map Pearson correlation over pixels: Σ(p−p̄)(g−ḡ) / sqrt(Σ(p−p̄)² Σ(g−ḡ)²).

    Edge cases: empty GT (no g > 0) → NaN; p constant or g constant (max == min) → 0.
    Returns (B,) float64.
    """
    return _batched(_cc_k, pred, gt)


def kld(pred, gt) -> torch.Tensor:
    """Per-map KL divergence with sum-normalised maps (ε = 1e-8):

    P = p/(Σp+ε), G = g/(Σg+ε), KLD = Σ G·ln(G/(P+ε) + ε).

    Edge cases: empty GT → NaN. An all-zero prediction gives P = 0 and a large but finite value.
    Returns (B,) float64.
    """
    return _batched(_kld_k, pred, gt)


def sim(pred, gt) -> torch.Tensor:
    """Per-map similarity (histogram intersection): Σ min(P, G), P and G as in :func:`kld`.

    Edge cases: empty GT → NaN; all-zero prediction → 0. Returns (B,) float64.
    """
    return _batched(_sim_k, pred, gt)


def nss(pred, gt) -> torch.Tensor:
    """Per-map normalised scanpath saliency: mean over F = {g > 0} of (p − mean p)/std p, where mean
    and std are over all N pixels and std is unbiased (ddof 1).

    Edge cases: empty GT → NaN; p constant (max == min) or N = 1 → 0. Returns (B,) float64.
    """
    return _batched(_nss_k, pred, gt)


def auc_judd(pred, gt) -> torch.Tensor:
    """Per-map AUC-Judd, deterministic.

    F = {g > 0}, K = |F|. Thresholds t = the distinct values of p on F;
    TPR(t) = #{F: p ≥ t}/K, FPR(t) = #{not F: p ≥ t}/(N − K); the points (0, 0) and (1, 1) are
    added and the area is the trapezoid rule over the points in increasing-FPR order. Ties are
    counted properly: all pixels with the same value enter at the same threshold. With distinct
    values this equals the MIT / reproduction implementation (which jitters instead).

    Implemented by one sort per map and cumulative counts (O(N log N), batched), in exact integer
    arithmetic with one final float64 division.

    Edge cases: empty GT (K = 0) → NaN; GT covering all pixels (K = N, FPR undefined) → NaN;
    constant p → 0.5. Returns (B,) float64.
    """
    return _batched(_auc_judd_k, pred, gt)


def heatmap_metrics(pred, gt, metrics: Sequence[str] = HEATMAP_METRICS) -> dict[str, torch.Tensor]:
    """All requested per-map metrics at once (one input conversion).

    Returns ``{name: (B,) float64}`` plus ``"gt_empty": (B,) bool`` (no g > 0 in the map).
    """
    unknown = set(metrics) - set(_KERNELS)
    if unknown:
        raise ValueError(f"unknown heatmap metrics {sorted(unknown)}; known: {HEATMAP_METRICS}")
    p, g = _flatten_pair(pred, gt)
    b, n = p.shape
    out: dict[str, list[torch.Tensor]] = {m: [] for m in metrics}
    for m in metrics:
        fn = _KERNELS[m]
        out[m] = [fn(p[s], g[s]) for s in _chunks(b, n, _chunk_elems(fn))]
    empty = [_empty(g[s]) for s in _chunks(b, n, _CHUNK_ELEMS)]
    res = {m: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for m, v in out.items()}
    res["gt_empty"] = torch.cat(empty) if empty else torch.zeros(0, dtype=torch.bool)
    return res


# ----------------------------------------------------------------------------------------------
# score metrics
# ----------------------------------------------------------------------------------------------
def _vec(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        a = a.reshape(-1)
    return a


def _pearson_np(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: {a.shape} vs {b.shape}")
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan
    if a.max() == a.min() or b.max() == b.min():
        return math.nan
    ac = a - a.mean()
    bc = b - b.mean()
    den = math.sqrt(float(np.dot(ac, ac)) * float(np.dot(bc, bc)))
    if den == 0.0:
        return math.nan
    r = float(np.dot(ac, bc)) / den
    return max(-1.0, min(1.0, r))


def plcc(pred, target) -> float:
    """Pearson linear correlation of two 1-D sequences (float64).

    NaN if fewer than 2 values, either input is constant, or an input is non-finite.
    """
    return _pearson_np(_vec(pred), _vec(target))


def srcc(pred, target) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties get the mean of
    their ranks, as ``scipy.stats.spearmanr``). NaN in the same cases as :func:`plcc`.
    """
    a, b = _vec(pred), _vec(target)
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: {a.shape} vs {b.shape}")
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan
    return _pearson_np(rankdata(a), rankdata(b))


# ----------------------------------------------------------------------------------------------
# keyword metrics
# ----------------------------------------------------------------------------------------------
class KeywordCounts(NamedTuple):
    tp: int
    fp: int
    fn: int


def keyword_counts(pred_tagged: str, target_tagged: str) -> KeywordCounts:
    """Misaligned-keyword counts of one prompt, position by position.

    Both strings are decoded with :func:`rahf.data.format.parse_tagged` (``"a yellow_0 cat"`` →
    words + misaligned flags). Position i is a true positive iff the predicted word at i equals the
    target word at i AND both are tagged misaligned. A wrong or missing word counts as wrong:
    predicted-misaligned positions that are not TP are false positives (including predicted words
    beyond the target's length); target-misaligned positions that are not TP are false negatives
    (including target words beyond the prediction's length).
    """
    pw, pf = parse_tagged(pred_tagged)
    tw, tf = parse_tagged(target_tagged)
    tp = fp = fn = 0
    for i in range(max(len(pw), len(tw))):
        pbad = i < len(pw) and pf[i]
        tbad = i < len(tw) and tf[i]
        hit = pbad and tbad and pw[i] == tw[i]
        tp += hit
        fp += pbad and not hit
        fn += tbad and not hit
    return KeywordCounts(int(tp), int(fp), int(fn))


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def keyword_metrics(preds: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Precision / recall / F1 of the misaligned-keyword class (counts from :func:`keyword_counts`).

    * Pooled (primary; keys ``precision, recall, f1``): TP, FP, FN summed over all prompts, then
      P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2·TP/(2·TP+FP+FN) (= 2PR/(P+R) whenever P and R are
      defined). A rate whose denominator is 0 is undefined and NaN: precision when no word was
      tagged misaligned, recall when no target word is misaligned, F1 when neither happened.
    * Per prompt (keys ``per_prompt_precision, per_prompt_recall, per_prompt_f1``; the
      reproduction's convention, for comparison only): P, R, F1 computed per prompt, where an
      undefined value (no predicted misaligned word for P, no true misaligned word for R,
      P + R = 0 for F1) scores 0 — so a prompt without any misaligned word scores 0 even if the
      prediction is correct — then averaged over prompts.

    Also returns ``tp, fp, fn`` (pooled counts) and ``n`` (number of prompts). With no prompts every
    rate is NaN.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    TP = FP = FN = 0
    pp, pr, pf = [], [], []
    for a, b in zip(preds, targets):
        c = keyword_counts(a, b)
        TP, FP, FN = TP + c.tp, FP + c.fp, FN + c.fn
        p, r, f = _prf(*c)
        pp.append(p)
        pr.append(r)
        pf.append(f)
    n = len(preds)
    if n == 0:
        nan = math.nan
        return dict(precision=nan, recall=nan, f1=nan, per_prompt_precision=nan, per_prompt_recall=nan,
                    per_prompt_f1=nan, tp=0.0, fp=0.0, fn=0.0, n=0.0)

    def rate(num: int, den: int) -> float:
        return num / den if den else math.nan

    return dict(precision=rate(TP, TP + FP), recall=rate(TP, TP + FN), f1=rate(2 * TP, 2 * TP + FP + FN),
                per_prompt_precision=float(np.mean(pp)), per_prompt_recall=float(np.mean(pr)),
                per_prompt_f1=float(np.mean(pf)), tp=float(TP), fp=float(FP), fn=float(FN), n=float(n))


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def _correlation_reason(pred: np.ndarray, true: np.ndarray) -> str:
    """Why :func:`plcc` / :func:`srcc` of these values is undefined."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.size < 2:
        return f"fewer than 2 examples ({pred.size})"
    if not np.all(np.isfinite(pred)):
        return "non-finite predictions"
    if not np.all(np.isfinite(true)):
        return "non-finite ground truth"
    if pred.max() == pred.min():
        return f"constant predictions (all {pred[0]:.4f})"
    if true.max() == true.min():
        return f"constant ground truth (all {true[0]:.4f})"
    return "not computable"


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else math.nan


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


class MetricAccumulator:
    """Streaming evaluation: call :meth:`update` per batch, :meth:`compute` once at the end.

    Only per-map metric values (6 floats + 1 flag per map), scores and strings are kept, so the
    maps of a large test set never need to be in memory together.

    :meth:`compute` returns a flat ``dict[str, float]``:

    * ``score/plcc/<name>``, ``score/srcc/<name>`` for name in ``SCORE_NAMES``
      (plausibility, alignment, aesthetics, overall) — if scores were given;
    * ``heatmap/mse_all/<map>``: per-map MSE averaged over all maps;
      ``heatmap/mse_gt0/<map>``: averaged over maps whose GT is all zero (NaN if there are none);
      ``heatmap/<cc|kld|sim|nss|auc_judd>/<map>``: averaged over maps with non-empty GT, skipping
      NaN values (only AUC-Judd of a GT covering every pixel) — if maps were given;
    * ``keyword/<precision|recall|f1>`` (pooled) and ``keyword_per_prompt/<precision|recall|f1>``
      (see :func:`keyword_metrics`) — if tagged prompts were given;
    * counts: ``count/n`` (examples), ``count/gt_nonempty/<map>``, ``count/gt_empty/<map>``,
      ``count/auc_judd/<map>`` (maps entering the AUC-Judd mean), ``count/keyword_prompts``.

    A metric that cannot be computed is NaN in that dict; :meth:`unavailable` says why.
    """

    def __init__(self, score_names: Sequence[str] = SCORE_NAMES, map_names: Sequence[str] = MAP_NAMES):
        self.score_names = tuple(score_names)
        self.map_names = tuple(map_names)
        self.reset()

    def reset(self) -> None:
        self._pred_scores: list[torch.Tensor] = []
        self._true_scores: list[torch.Tensor] = []
        self._maps: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._pred_tagged: list[str] = []
        self._target_tagged: list[str] = []
        self._n_scores = 0
        self._n_maps: dict[str, int] = {}

    def update(self, pred_scores=None, true_scores=None, pred_maps: Mapping | None = None,
               true_maps: Mapping | None = None, pred_tagged: Sequence[str] | None = None,
               target_tagged: Sequence[str] | None = None) -> None:
        """Add one batch. Any group (scores / maps / tagged prompts) may be omitted.

        ``pred_scores, true_scores``: (B, len(score_names)) in ``score_names`` order.
        ``pred_maps, true_maps``: ``{map_name: (B, H, W)}``, pred already resized to gt's size.
        ``pred_tagged, target_tagged``: lists of tagged prompts (``"a yellow_0 cat"``).
        """
        if (pred_scores is None) != (true_scores is None):
            raise ValueError("give both pred_scores and true_scores, or neither")
        if pred_scores is not None:
            ps = _as_tensor(pred_scores).detach().cpu().double()
            ts = _as_tensor(true_scores).detach().cpu().double()
            if ps.shape != ts.shape or ps.ndim != 2 or ps.shape[1] != len(self.score_names):
                raise ValueError(f"scores must be (B, {len(self.score_names)}) and match: "
                                 f"{tuple(ps.shape)} vs {tuple(ts.shape)}")
            self._pred_scores.append(ps)
            self._true_scores.append(ts)
            self._n_scores += ps.shape[0]
        if (pred_maps is None) != (true_maps is None):
            raise ValueError("give both pred_maps and true_maps, or neither")
        if pred_maps is not None:
            for name in self.map_names:
                if name not in pred_maps and name not in true_maps:
                    continue
                if name not in pred_maps or name not in true_maps:
                    raise ValueError(f"map {name!r} given for only one of pred_maps / true_maps")
                p = _as_tensor(pred_maps[name])
                g = _as_tensor(true_maps[name])
                if p.device.type != "cpu":
                    p, g = p.cpu(), g.cpu()
                vals = heatmap_metrics(p, g)
                store = self._maps.setdefault(name, {})
                for k, v in vals.items():
                    store.setdefault(k, []).append(v)
                self._n_maps[name] = self._n_maps.get(name, 0) + int(p.shape[0])
            extra = set(pred_maps) - set(self.map_names)
            if extra:
                raise ValueError(f"unknown map names {sorted(extra)}; expected {self.map_names}")
        if (pred_tagged is None) != (target_tagged is None):
            raise ValueError("give both pred_tagged and target_tagged, or neither")
        if pred_tagged is not None:
            if isinstance(pred_tagged, str) or isinstance(target_tagged, str):
                raise TypeError("pred_tagged / target_tagged must be sequences of strings")
            if len(pred_tagged) != len(target_tagged):
                raise ValueError(f"{len(pred_tagged)} predicted prompts but {len(target_tagged)} targets")
            self._pred_tagged.extend(pred_tagged)
            self._target_tagged.extend(target_tagged)

    def add_map_values(self, name: str, values: Mapping[str, torch.Tensor]) -> None:
        """Add per-map metric values already computed (e.g. by :func:`heatmap_metrics` on each process
        and then gathered): ``values[metric]`` is a (B,) tensor for every metric of ``heatmap_metrics``."""
        if name not in self.map_names:
            raise ValueError(f"unknown map name {name!r}; expected {self.map_names}")
        store = self._maps.setdefault(name, {})
        n = None
        for k, v in values.items():
            v = _as_tensor(v).detach().cpu()
            if k == "gt_empty":
                v = v.bool()
            n = int(v.shape[0]) if n is None else n
            if int(v.shape[0]) != n:
                raise ValueError(f"map {name!r}: metric {k!r} has {v.shape[0]} values, expected {n}")
            store.setdefault(k, []).append(v)
        self._n_maps[name] = self._n_maps.get(name, 0) + (n or 0)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        counts = [self._n_scores, *self._n_maps.values(), len(self._pred_tagged)]
        out["count/n"] = float(max(counts))
        if self._pred_scores:
            ps = torch.cat(self._pred_scores)
            ts = torch.cat(self._true_scores)
            for j, name in enumerate(self.score_names):
                out[f"score/plcc/{name}"] = plcc(ps[:, j], ts[:, j])
                out[f"score/srcc/{name}"] = srcc(ps[:, j], ts[:, j])
        for name in self.map_names:
            if name not in self._maps:
                continue
            vals = {k: torch.cat(v) for k, v in self._maps[name].items()}
            empty = vals["gt_empty"]
            out[f"heatmap/mse_all/{name}"] = _mean(vals["mse"])
            out[f"heatmap/mse_gt0/{name}"] = _mean(vals["mse"][empty])
            for m in HEATMAP_METRICS[1:]:
                out[f"heatmap/{m}/{name}"] = _nanmean(vals[m][~empty])
            out[f"count/gt_nonempty/{name}"] = float((~empty).sum())
            out[f"count/gt_empty/{name}"] = float(empty.sum())
            out[f"count/auc_judd/{name}"] = float((~torch.isnan(vals["auc_judd"])).sum())
        if self._pred_tagged:
            kw = keyword_metrics(self._pred_tagged, self._target_tagged)
            for m in ("precision", "recall", "f1"):
                out[f"keyword/{m}"] = kw[m]
                out[f"keyword_per_prompt/{m}"] = kw[f"per_prompt_{m}"]
            out["count/keyword_prompts"] = kw["n"]
        return out

    def unavailable(self, metrics: Mapping[str, float] | None = None) -> dict[str, str]:
        """Why each metric that :meth:`compute` could not compute (NaN) is undefined, as
        ``{key: reason}`` — e.g. ``{"score/plcc/alignment": "constant predictions (all 0.5123)"}``.
        ``metrics``: the result of :meth:`compute` (computed again when omitted)."""
        metrics = self.compute() if metrics is None else metrics
        nan_keys = [k for k, v in metrics.items() if isinstance(v, float) and math.isnan(v)]
        if not nan_keys:
            return {}
        out: dict[str, str] = {}
        if self._pred_scores:
            ps, ts = torch.cat(self._pred_scores), torch.cat(self._true_scores)
            for j, name in enumerate(self.score_names):
                why = _correlation_reason(ps[:, j].numpy(), ts[:, j].numpy())
                for k in ("plcc", "srcc"):
                    out[f"score/{k}/{name}"] = why
        for name in self.map_names:
            if name not in self._maps:
                continue
            vals = {k: torch.cat(v) for k, v in self._maps[name].items()}
            empty = vals["gt_empty"]
            n, n_empty = int(empty.numel()), int(empty.sum())
            out[f"heatmap/mse_all/{name}"] = "no maps" if n == 0 else "non-finite values"
            out[f"heatmap/mse_gt0/{name}"] = (f"no example with an empty ground-truth map (all {n} have g > 0)"
                                              if n_empty == 0 else "non-finite values")
            for m in HEATMAP_METRICS[1:]:
                if n_empty == n:
                    why = f"no example with a non-empty ground-truth map (all {n} are empty)"
                elif m == "auc_judd" and not bool((~torch.isnan(vals[m][~empty])).any()):
                    why = "every non-empty ground-truth map covers the whole map (no pixel outside it)"
                else:
                    why = "non-finite values"
                out[f"heatmap/{m}/{name}"] = why
        if self._pred_tagged:  # a pooled rate is NaN only when its denominator is 0
            n = len(self._pred_tagged)
            out["keyword/precision"] = f"no word tagged misaligned in the {n} predictions"
            out["keyword/recall"] = f"no misaligned word in the {n} targets"
            out["keyword/f1"] = f"no misaligned word predicted or in the {n} targets"
        return {k: out.get(k, "not computable (non-finite values)") for k in nan_keys}


def _is_array(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def evaluate_predictions(pred_scores, true_scores, pred_maps: Mapping | None, true_maps: Mapping | None,
                         pred_tagged: Sequence[str] | None = None,
                         target_tagged: Sequence[str] | None = None) -> dict[str, float]:
    """Evaluate a whole test set; returns the flat dict of :meth:`MetricAccumulator.compute`.

    ``pred_scores, true_scores``: (N, 4) in ``SCORE_NAMES`` order (or both None).
    ``pred_maps, true_maps``: ``{"implausibility": ..., "misalignment": ...}`` where each value is
    either an (N, H, W) tensor/array (pred resized to gt's size by the caller) or an iterable of
    (n_i, H, W) chunks (pred and true iterables must yield matching chunks) — the latter keeps
    memory bounded for large N.
    ``pred_tagged, target_tagged``: optional lists of tagged prompts.
    """
    acc = MetricAccumulator()
    acc.update(pred_scores=pred_scores, true_scores=true_scores, pred_tagged=pred_tagged,
               target_tagged=target_tagged)
    if (pred_maps is None) != (true_maps is None):
        raise ValueError("give both pred_maps and true_maps, or neither")
    if pred_maps is not None:
        if set(pred_maps) != set(true_maps):
            raise ValueError(f"pred_maps keys {sorted(pred_maps)} != true_maps keys {sorted(true_maps)}")
        for name in pred_maps:
            pm, tm = pred_maps[name], true_maps[name]
            if _is_array(pm) and _is_array(tm):
                acc.update(pred_maps={name: pm}, true_maps={name: tm})
                continue
            if _is_array(pm) or _is_array(tm):
                raise TypeError(f"map {name!r}: give both as arrays or both as iterables of chunks")
            sentinel = object()
            it_p, it_t = iter(pm), iter(tm)
            while True:
                a, b = next(it_p, sentinel), next(it_t, sentinel)
                if a is sentinel and b is sentinel:
                    break
                if a is sentinel or b is sentinel:
                    raise ValueError(f"map {name!r}: pred and true iterables yield different numbers of chunks")
                acc.update(pred_maps={name: a}, true_maps={name: b})
    return acc.compute()


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def _fmt(x, digits: int) -> str:
    if x is None:
        return "—"
    x = float(x)
    if math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


def keyword_prefixes(metrics: Mapping) -> list[str]:
    """``keyword`` first, then ``keyword_<mode>`` (another decoding's keyword metrics), as present."""
    found = {k.split("/", 1)[0] for k in metrics if k.startswith("keyword") and "/" in k}
    found -= {"keyword_per_prompt"} | {p for p in found if p.endswith("_per_prompt")}
    return sorted(found, key=lambda p: (p != "keyword", p))


def format_tables(metrics: Mapping[str, float], unavailable: Mapping[str, str] | None = None,
                  decode: str | None = None) -> str:
    """Plain-text (markdown) tables in the paper's table layout.

    Heatmap table: rows implausibility / misalignment, columns MSE all | MSE GT=0 | CC | KLD | SIM |
    NSS | AUC-Judd. Score table: rows PLCC / SRCC, columns plausibility | aesthetics | alignment |
    overall. Keyword lines: precision / recall / F1 in percent, pooled and per prompt, for the
    decoding ``decode`` (``keyword/…``) and for another decoding when present (``keyword_<mode>/…``).
    Sections whose keys are absent are left out; missing single values print as "—", and metrics
    listed in ``unavailable`` (``{key: reason}``; default: ``metrics["unavailable"]`` when ``metrics``
    is a metrics.json document) as ``n/a (reason)``.
    """
    if unavailable is None:
        unavailable = metrics.get("unavailable") if isinstance(metrics.get("unavailable"), Mapping) else {}

    def cell(key: str, digits: int, scale: float = 1.0) -> str:
        if key in unavailable:
            return f"n/a ({unavailable[key]})"
        v = metrics.get(key)
        return _fmt(None if v is None else scale * float(v), digits)

    lines: list[str] = []
    cols = [("mse_all", "MSE all", 5), ("mse_gt0", "MSE GT=0", 5), ("cc", "CC", 3), ("kld", "KLD", 3),
            ("sim", "SIM", 3), ("nss", "NSS", 3), ("auc_judd", "AUC-Judd", 3)]
    present = [m for m in MAP_NAMES if any(k.startswith("heatmap/") and k.endswith("/" + m) for k in metrics)]
    if present:
        lines.append("| heatmap | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for m in present:
            cells = [cell(f"heatmap/{k}/{m}", d) for k, _, d in cols]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    score_cols = ("plausibility", "aesthetics", "alignment", "overall")
    if any(k.startswith("score/") for k in metrics):
        if lines:
            lines.append("")
        lines.append("| score | " + " | ".join(score_cols) + " |")
        lines.append("|---" * (len(score_cols) + 1) + "|")
        for key, label in (("plcc", "PLCC"), ("srcc", "SRCC")):
            cells = [cell(f"score/{key}/{s}", 3) for s in score_cols]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    prefixes = keyword_prefixes(metrics)
    if prefixes:
        if lines:
            lines.append("")
        for prefix in prefixes:
            mode = decode if prefix == "keyword" else prefix[len("keyword_"):]
            how = f", {mode} decoding" if mode else ""

            def pct(kind: str) -> str:
                return cell(f"{prefix}{kind}", 1, 100.0)

            lines.append("Misaligned keywords (pooled{}): precision {}, recall {}, F1 {}".format(
                how, pct("/precision"), pct("/recall"), pct("/f1")))
            lines.append("Misaligned keywords (per-prompt avg, reproduction's convention{}): precision {}, recall {}, "
                         "F1 {}".format(how, pct("_per_prompt/precision"), pct("_per_prompt/recall"),
                                        pct("_per_prompt/f1")))
    if "count/n" in metrics:
        extra = [f"n={int(metrics['count/n'])}"]
        for m in MAP_NAMES:
            if f"count/gt_nonempty/{m}" in metrics:
                extra.append(f"{m} non-empty GT={int(metrics[f'count/gt_nonempty/{m}'])}")
        lines.append("")
        lines.append("(" + ", ".join(extra) + ")")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ranking metrics: a score judged as a detector of 0/1 labels (e.g. a reward telling aligned from
# misaligned pairs; rahf.reward.textnorm re-exports them)
# ----------------------------------------------------------------------------------------------
def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = _vec(scores), np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    yb = y.astype(bool)
    if not np.array_equal(yb.astype(np.float64), y.astype(np.float64)):
        raise ValueError("labels must be 0/1")
    return s, yb


def roc_auc(scores, labels) -> float:
    """ROC-AUC = P(score of a random positive > that of a random negative) + 1/2 P(tie), by the
    rank-sum (Mann-Whitney) statistic with average ranks. NaN if either class is empty."""
    s, y = _scores_labels(scores, labels)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return math.nan
    r = rankdata(s)
    return float((r[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def average_precision(scores, labels) -> float:
    """AUPRC as average precision: sum over distinct thresholds (descending) of
    (recall_t - recall_{t-1}) * precision_t, tied scores forming one threshold (the convention of
    scikit-learn's ``average_precision_score``). NaN if there is no positive."""
    s, y = _scores_labels(scores, labels)
    npos = int(y.sum())
    if npos == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each tie group
    tp = np.cumsum(y)[last].astype(np.float64)
    prec = tp / (last + 1)
    rec = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def ap_at_k(scores, labels, k: int) -> float:
    """Average precision at k: (1 / min(k, #positives)) * sum_{i <= k, item i positive} precision@i,
    items ranked by descending score (ties kept in input order). NaN if there is no positive."""
    s, y = _scores_labels(scores, labels)
    npos = int(y.sum())
    if npos == 0:
        return math.nan
    if k < 1:
        raise ValueError("k must be >= 1")
    order = np.argsort(-s, kind="mergesort")[:k]
    rel = y[order].astype(np.float64)
    prec = np.cumsum(rel) / np.arange(1, rel.size + 1)
    return float(np.sum(prec * rel) / min(k, npos))


def kendall_tau(a, b) -> float:
    """Kendall tau-b (``scipy.stats.kendalltau``). NaN in the same cases as :func:`plcc`."""
    x, y = _vec(a), _vec(b)
    if x.shape != y.shape:
        raise ValueError(f"length mismatch: {x.shape} vs {y.shape}")
    if x.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan
    if x.max() == x.min() or y.max() == y.min():
        return math.nan
    return float(kendalltau(x, y).statistic)


#: Keys of :func:`ranking_metrics` (``ap@k`` once per k).
RANKING_METRICS: tuple[str, ...] = ("auroc", "auprc", "ap@k", "spearman", "kendall")


def ranking_metrics(scores, labels, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """AUROC, AUPRC, AP@k for each k, Spearman rho (:func:`srcc`) and Kendall tau-b between the
    scores and the 0/1 labels (1 = the positive class, e.g. aligned; a good score ranks it first)."""
    s, y = _scores_labels(scores, labels)
    out = {"auroc": roc_auc(s, y), "auprc": average_precision(s, y)}
    for k in ks:
        out[f"ap@{k}"] = ap_at_k(s, y, k)
    out["spearman"] = srcc(s, y.astype(np.float64))
    out["kendall"] = kendall_tau(s, y.astype(np.float64))
    return out


__all__ += ["roc_auc", "average_precision", "ap_at_k", "kendall_tau", "RANKING_METRICS", "ranking_metrics"]
