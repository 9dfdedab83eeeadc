"""TextNorm: reward calibration over semantically contrastive prompts, and the ranking metrics used
to judge a reward as a detector of aligned vs misaligned (image, prompt) pairs.

* **Contrastive prompts** -- three sources, all giving ``prompt -> list of prompts``:

  - :class:`SwapContrast`: the package's one word-swap generator (:mod:`rahf.swaps`): each contrast
    changes one content word (colour, object noun, plural count, size, spatial relation) and, where
    needed, the article in front of it ("a red apple" -> "an orange apple"). Variants are keyed by
    the record's uid, so TextNorm sees the same swaps as evaluation and training. Vocabularies:
    ``DEFAULT_SWAPS`` (synth words plus common words of natural prompts; the default) or
    ``SYNTH_SWAPS``.
  - :class:`FileContrasts`: a JSONL file, one line per prompt, ``{"uid": ..., "prompt": ...,
    "contrasts": [...]}`` (looked up by uid, then by prompt), e.g. written by an LLM paraphraser.
  - any callable ``prompt -> list[str]``.

* **The normalized reward** -- :func:`textnorm`:

      r~(x, y) = exp(r(x, y)/tau) / sum_{y' in {y} U C(y)} exp(r(x, y')/tau)

  computed as ``exp(r/tau - logsumexp(...))`` in float64 (stable for any scale). Limits:
  ``tau = 0`` gives the hard limit (1/m on the m tied maxima, 0 elsewhere; so 1 for a strict winner),
  ``tau = inf`` gives the uniform 1/(1+K); adding a constant to all rewards of an example changes
  nothing. Contrasts may be ragged: pad with NaN (ignored). A pair with **no** contrast has no
  normalized reward (NaN): the softmax over one element is 1 whatever the reward, so such pairs
  are excluded from TextNorm comparisons and counted (:func:`restrict_contrasts`), never ranked.

* **Choosing tau** -- :func:`select_tau` picks tau on a development split by a ranking metric; the
  chosen value is then applied, unchanged, to the test split.

* **Ranking metrics** -- :func:`roc_auc` (Mann-Whitney with average ranks: ties count 1/2),
  :func:`average_precision` (AUPRC as step-wise average precision, ties grouped as one threshold),
  :func:`ap_at_k`, :func:`spearman`, :func:`kendall_tau` (tau-b), and :func:`ranking_metrics`
  bundling them. They are defined once, in :mod:`rahf.eval.metrics` (``spearman`` is its
  :func:`~rahf.eval.metrics.srcc`), and re-exported here. The positive class is label 1 (here:
  *aligned*); a good reward ranks positives first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.special import logsumexp

from ..eval.metrics import RANKING_METRICS as METRIC_NAMES
from ..eval.metrics import ap_at_k, average_precision, kendall_tau, ranking_metrics, roc_auc
from ..eval.metrics import srcc as spearman
from ..swaps import DEFAULT_SWAPS, SWAP_KINDS, SYNTH_SWAPS, SwapVocabulary, candidate_swaps, word_swaps
from ..schema import split_words

__all__ = [
    "SWAP_VOCABULARIES",
    "SwapContrast",
    "FileContrasts",
    "ContrastGenerator",
    "contrast_sets",
    "restrict_contrasts",
    "pad_contrasts",
    "textnorm",
    "log_textnorm",
    "select_tau",
    "roc_auc",
    "average_precision",
    "ap_at_k",
    "spearman",
    "kendall_tau",
    "ranking_metrics",
    "format_metric_table",
    "METRIC_NAMES",
]

ContrastGenerator = Callable[[str], Sequence[str]]
SWAP_VOCABULARIES: dict[str, SwapVocabulary] = {"default": DEFAULT_SWAPS, "synth": SYNTH_SWAPS}


# ----------------------------------------------------------------------------------------------
# contrastive prompts
# ----------------------------------------------------------------------------------------------
class SwapContrast:
    """Contrastive prompts from :mod:`rahf.swaps`: up to ``max_contrasts`` one-word swaps per prompt
    (0 or None: every swap the rules allow), picked by :func:`rahf.swaps.word_swaps` with the key
    ``(key or prompt, seed)``. ``vocab`` is a :class:`~rahf.swaps.SwapVocabulary` or a name of
    :data:`SWAP_VOCABULARIES`. Returned prompts are the swapped words joined by single spaces."""

    keyed = True  # contrast_sets passes each record's uid as ``key``

    def __init__(self, vocab: SwapVocabulary | str = DEFAULT_SWAPS, kinds: Sequence[str] = SWAP_KINDS,
                 max_contrasts: int | None = 8, seed: int = 0):
        if isinstance(vocab, str):
            if vocab not in SWAP_VOCABULARIES:
                raise ValueError(f"unknown swap vocabulary {vocab!r}; choose from {sorted(SWAP_VOCABULARIES)}")
            vocab = SWAP_VOCABULARIES[vocab]
        bad = set(kinds) - set(SWAP_KINDS)
        if bad:
            raise ValueError(f"unknown swap kinds {sorted(bad)}; choose from {SWAP_KINDS}")
        self.vocab, self.kinds, self.max_contrasts, self.seed = vocab, tuple(kinds), max_contrasts, seed

    def swaps(self, prompt: str, key: str | None = None):
        """The :class:`~rahf.swaps.WordSwap` records of ``prompt``."""
        if not self.max_contrasts:
            return candidate_swaps(split_words(prompt), self.vocab, self.kinds)
        return word_swaps(prompt, key if key is not None else prompt, self.max_contrasts, self.vocab, self.kinds,
                          self.seed)

    def __call__(self, prompt: str, key: str | None = None) -> list[str]:
        return [s.prompt for s in self.swaps(prompt, key)]


class FileContrasts:
    """Contrastive prompts read from a JSONL file: one object a line with ``"contrasts"`` (a list of
    prompts) and ``"uid"`` and/or ``"prompt"``. A record is looked up by its uid, then by its
    prompt; a prompt found in neither gets no contrasts (and is excluded, counted, by the caller)."""

    keyed = True

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.by_uid: dict[str, list[str]] = {}
        self.by_prompt: dict[str, list[str]] = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                cs = d["contrasts"]
                if not isinstance(cs, list) or not all(isinstance(c, str) for c in cs):
                    raise ValueError("'contrasts' must be a list of strings")
                if "uid" not in d and "prompt" not in d:
                    raise ValueError("a line needs 'uid' or 'prompt'")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n}: bad contrast line ({e})") from None
            if "uid" in d:
                self.by_uid[str(d["uid"])] = cs
            if "prompt" in d:
                self.by_prompt[d["prompt"]] = cs

    def __call__(self, prompt: str, key: str | None = None) -> list[str]:
        if key is not None and key in self.by_uid:
            return list(self.by_uid[key])
        return list(self.by_prompt.get(prompt, []))


def contrast_sets(prompts: Sequence[str], generator: ContrastGenerator | None = None,
                  keys: Sequence[str] | None = None) -> list[list[str]]:
    """Contrastive prompts for each prompt (``generator`` default: :class:`SwapContrast`()). A
    generator with ``keyed = True`` also gets the record's key (uid) as ``key=``. The prompt itself
    and duplicates are dropped from a generator's output."""
    gen = generator or SwapContrast()
    keyed = getattr(gen, "keyed", False)
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    out = []
    for i, p in enumerate(prompts):
        cs = gen(p, key=None if keys is None else keys[i]) if keyed else gen(p)
        out.append([c for c in dict.fromkeys(cs) if c != p])
    return out


def restrict_contrasts(contrasts: Sequence[Sequence[str]], fixed_k: int | None = None) -> tuple[list[list[str]], np.ndarray]:
    """Which pairs TextNorm can score: those with at least one contrast, or with ``fixed_k``: those
    with at least ``fixed_k`` contrasts, cut to their first ``fixed_k`` (every kept pair is then
    normalised over the same number of prompts). Returns (the kept pairs' sets -- ``[]`` for
    excluded pairs --, boolean mask of kept pairs)."""
    need = 1 if not fixed_k else int(fixed_k)
    if need < 1:
        raise ValueError(f"fixed_k must be >= 1, got {fixed_k}")
    keep = np.array([len(c) >= need for c in contrasts], dtype=bool)
    sets = [list(c[:fixed_k] if fixed_k else c) if k else [] for c, k in zip(contrasts, keep)]
    return sets, keep


def pad_contrasts(values: Sequence[Sequence[float]]) -> np.ndarray:
    """Ragged per-pair contrast rewards as an (N, max(1, K)) float64 array padded with NaN."""
    K = max((len(v) for v in values), default=0)
    out = np.full((len(values), max(K, 1)), np.nan)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


# ----------------------------------------------------------------------------------------------
# the normalized reward
# ----------------------------------------------------------------------------------------------
def _stack(reward, contrast_rewards) -> np.ndarray:
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    c = np.asarray(contrast_rewards, dtype=np.float64)
    if c.ndim == 1 and r.size == 1:
        c = c[None]
    if c.ndim != 2 or c.shape[0] != r.size:
        raise ValueError(f"contrast rewards must be (N, K) for N={r.size} rewards; got shape {c.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards must be finite")
    if np.any(np.isinf(c)):
        raise ValueError("contrast rewards must be finite (use NaN for padding)")
    return np.concatenate([r[:, None], c], axis=1)  # column 0: the prompt's own reward


def log_textnorm(reward, contrast_rewards, tau: float = 1.0) -> np.ndarray:
    """log r~ for each example (float64, shape (N,)); see :func:`textnorm`."""
    z = _stack(reward, contrast_rewards)
    valid = ~np.isnan(z)
    none = valid[:, 1:].sum(axis=1) == 0  # no contrast: undefined
    tau = float(tau)
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0 (inf allowed), got {tau}")
    if tau == 0.0:  # hard limit: share 1 among the tied maxima
        zz = np.where(valid, z, -np.inf)
        m = zz.max(axis=1, keepdims=True)
        ties = (zz == m).sum(axis=1)
        with np.errstate(divide="ignore"):
            out = np.where(z[:, 0] == m[:, 0], -np.log(ties), -np.inf)
    elif math.isinf(tau):
        out = -np.log(valid.sum(axis=1).astype(np.float64))
    else:
        s = np.where(valid, z / tau, -np.inf)
        out = s[:, 0] - logsumexp(s, axis=1)
    return np.where(none, np.nan, out)


def textnorm(reward, contrast_rewards, tau: float = 1.0) -> np.ndarray:
    """TextNorm: r~ = exp(r/tau) / sum over {y} U C(y) of exp(r(x, y')/tau), per example.

    ``reward``: (N,) rewards r(x_i, y_i); ``contrast_rewards``: (N, K) rewards r(x_i, y') of the
    contrastive prompts (NaN = no contrast in that slot: ragged sets). ``tau`` > 0; 0 and ``inf``
    give the limits (see the module docstring). Returns float64 (N,) values in [0, 1]; NaN for a
    pair without any contrast (exclude those: :func:`restrict_contrasts`).
    """
    return np.exp(log_textnorm(reward, contrast_rewards, tau))


def select_tau(reward, contrast_rewards, labels, taus: Sequence[float], metric: str = "auroc",
               ks: Sequence[int] = (10, 50)) -> tuple[float, dict[float, dict[str, float]]]:
    """Pick tau on development pairs: the tau of ``taus`` whose TextNorm reward has the highest
    ``metric`` (a key of :func:`ranking_metrics`; the first listed wins a tie). Pairs without a
    contrast are ignored. Returns (tau, {tau: all metrics})."""
    if not len(taus):
        raise ValueError("no tau to select from")
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    c = np.asarray(contrast_rewards, dtype=np.float64).reshape(r.size, -1)
    keep = (~np.isnan(c)).any(axis=1)
    y = np.asarray(labels)[keep]
    table = {float(t): ranking_metrics(textnorm(r[keep], c[keep], t), y, ks) for t in taus}
    if metric not in next(iter(table.values())):
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(next(iter(table.values())))}")
    best = max(table, key=lambda t: (np.nan_to_num(table[t][metric], nan=-np.inf), -list(table).index(t)))
    return best, table


def format_metric_table(rows: Mapping[str, Mapping[str, float]], title: str = "reward") -> str:
    """A markdown table: one row per named reward, one column per metric."""
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| " + title + " | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = ["" if r.get(c) is None else ("nan" if r[c] != r[c] else f"{r[c]:.3f}") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
