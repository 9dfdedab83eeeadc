"""TextNorm: reward calibration over semantically contrastive prompts, and the ranking metrics used
to judge a reward as a detector of aligned vs misaligned (image, prompt) pairs.

Three parts, all pure numpy/scipy (no model needed):

* **Contrastive prompts** -- :class:`RuleContrast` rewrites a prompt by *swapping one thing* (a
  colour, a count, an object noun, a size or a spatial relation) for another of the same kind from
  a :class:`Vocabulary` (default: the synth generator's words, extendable or loaded from JSON). Each
  contrast keeps the prompt's form -- same number of words, every other word untouched, the case
  of the replaced word kept -- and changes its meaning. Counts are swapped only among plural
  numerals ("two" <-> "three") and nouns keep their grammatical number, so exactly one word changes;
  a relation swap changes the relation phrase only ("left of" -> "right of", "above" -> "below"),
  to a phrase with the same number of words. Any callable ``prompt -> list[str]`` can replace the
  rules (e.g. an LLM paraphraser): every function taking ``generator=`` accepts one.

* **The normalized reward** -- :func:`textnorm`:

      r~(x, y) = exp(r(x, y)/tau) / sum_{y' in {y} U C(y)} exp(r(x, y')/tau)

  computed as ``exp(r/tau - logsumexp(...))`` in float64 (stable for any scale). Limits:
  ``tau = 0`` gives the hard limit (1/m on the m tied maxima, 0 elsewhere; so 1 for a strict winner),
  ``tau = inf`` gives the uniform 1/(1+K); adding a constant to all rewards of an example changes
  nothing. Contrasts may be ragged: pad with NaN (ignored).

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy.special import logsumexp

from ..eval.metrics import RANKING_METRICS as METRIC_NAMES
from ..eval.metrics import ap_at_k, average_precision, kendall_tau, ranking_metrics, roc_auc
from ..eval.metrics import srcc as spearman
from ..lexicon import COLOUR_WORDS, COUNT_WORDS, PLURALS, RELATIONS, SIZE_WORDS

__all__ = [
    "Vocabulary",
    "default_vocabulary",
    "Contrast",
    "RuleContrast",
    "ContrastGenerator",
    "contrast_sets",
    "textnorm",
    "log_textnorm",
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
KINDS: tuple[str, ...] = ("colour", "count", "object", "size", "relation")


# ----------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------
@dataclass
class Vocabulary:
    """Words the rules may swap. ``nouns`` maps singular -> plural; ``numerals`` are plural counts
    (swapped among themselves); ``relations`` are phrases (swapped with phrases of equal length)."""

    colours: list[str] = field(default_factory=list)
    nouns: dict[str, str] = field(default_factory=dict)
    numerals: list[str] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)
    relations: list[str] = field(default_factory=list)

    def extend(self, colours: Iterable[str] = (), nouns: Mapping[str, str] | None = None,
               numerals: Iterable[str] = (), sizes: Iterable[str] = (), relations: Iterable[str] = ()) -> "Vocabulary":
        """Return a new vocabulary with the given words added (duplicates dropped, order kept)."""
        def merge(a, b):
            return list(dict.fromkeys([*a, *(w.lower() for w in b)]))
        n = dict(self.nouns)
        n.update({k.lower(): v.lower() for k, v in (nouns or {}).items()})
        return Vocabulary(merge(self.colours, colours), n, merge(self.numerals, numerals), merge(self.sizes, sizes),
                          merge(self.relations, relations))

    def to_dict(self) -> dict:
        return {"colours": self.colours, "nouns": self.nouns, "numerals": self.numerals, "sizes": self.sizes,
                "relations": self.relations}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Vocabulary":
        unknown = set(d) - {"colours", "nouns", "numerals", "sizes", "relations"}
        if unknown:
            raise ValueError(f"unknown vocabulary keys {sorted(unknown)}")
        nouns = d.get("nouns", {})
        if isinstance(nouns, list):  # a list of singular nouns: naive English plural
            nouns = {w: w + ("es" if w.endswith(("s", "x", "ch", "sh")) else "s") for w in nouns}
        return cls().extend(d.get("colours", ()), nouns, d.get("numerals", ()), d.get("sizes", ()),
                            d.get("relations", ()))

    @classmethod
    def load(cls, path: str | Path, extend_default: bool = True) -> "Vocabulary":
        """Read a JSON vocabulary; by default it extends :func:`default_vocabulary`."""
        d = json.loads(Path(path).read_text())
        v = cls.from_dict(d)
        return default_vocabulary().extend(v.colours, v.nouns, v.numerals, v.sizes, v.relations) if extend_default else v


def default_vocabulary() -> Vocabulary:
    """The synth dataset's words (:mod:`rahf.lexicon`: colours, shapes, counts two/three, sizes, relations)."""
    numerals = [w for n, ws in COUNT_WORDS.items() if n > 1 for w in ws]
    return Vocabulary(colours=list(COLOUR_WORDS), nouns=dict(PLURALS), numerals=numerals, sizes=list(SIZE_WORDS),
                      relations=list(RELATIONS))


# ----------------------------------------------------------------------------------------------
# contrastive prompts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contrast:
    """One contrastive prompt: ``kind`` of swap, word ``span`` [start, stop) replaced, old/new text."""

    prompt: str
    kind: str
    span: tuple[int, int]
    old: str
    new: str


def _match_case(new: str, old: str) -> str:
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


class RuleContrast:
    """Rule-based contrastive prompt generator (see the module docstring).

    ``kinds``: which swaps to make; ``max_contrasts``: at most this many per prompt (0 or None: all),
    picked round-robin over kinds in a random order seeded by ``seed`` and the prompt, so the same
    prompt always gets the same set. Calling the object returns the prompts; :meth:`contrasts`
    returns :class:`Contrast` records. Words are whitespace-separated; punctuation glued to a word
    (``"red,"``) is kept.
    """

    def __init__(self, vocabulary: Vocabulary | None = None, kinds: Sequence[str] = KINDS,
                 max_contrasts: int | None = 8, seed: int = 0):
        bad = set(kinds) - set(KINDS)
        if bad:
            raise ValueError(f"unknown contrast kinds {sorted(bad)}; choose from {KINDS}")
        self.vocab = vocabulary or default_vocabulary()
        self.kinds = tuple(kinds)
        self.max_contrasts = max_contrasts
        self.seed = seed
        v = self.vocab
        self._singular = list(v.nouns)  # lists, not sets: a deterministic order
        self._plural = list(dict.fromkeys(v.nouns.values()))
        self._rel = [r.lower().split() for r in v.relations]

    def _all(self, prompt: str) -> list[Contrast]:
        toks = prompt.split()
        core = [re.match(r"^(\W*)(.*?)(\W*)$", t).groups() for t in toks]  # (lead, word, trail)
        low = [c[1].lower() for c in core]
        out: list[Contrast] = []
        seen = {" ".join(toks)}

        def emit(kind, i, j, new_words):
            new_toks = list(toks)
            for k, w in zip(range(i, j), new_words):
                lead, word, trail = core[k]
                new_toks[k] = lead + _match_case(w, word) + trail
            p = " ".join(new_toks)
            if p not in seen:
                seen.add(p)
                out.append(Contrast(p, kind, (i, j), " ".join(toks[i:j]), " ".join(new_toks[i:j])))

        v = self.vocab
        for i, w in enumerate(low):
            if not w:
                continue
            if "colour" in self.kinds and w in v.colours:
                for c in v.colours:
                    if c != w:
                        emit("colour", i, i + 1, [c])
            if "count" in self.kinds and w in v.numerals:
                for c in v.numerals:
                    if c != w:
                        emit("count", i, i + 1, [c])
            if "size" in self.kinds and w in v.sizes:
                for c in v.sizes:
                    if c != w:
                        emit("size", i, i + 1, [c])
            if "object" in self.kinds and (w in self._singular or w in self._plural):
                pool = self._singular if w in self._singular else self._plural
                for c in pool:
                    if c != w:
                        emit("object", i, i + 1, [c])
        if "relation" in self.kinds:
            for i in range(len(low)):
                for r in self._rel:
                    if low[i:i + len(r)] == r and all(core[k][1] for k in range(i, i + len(r))):
                        for r2 in self._rel:
                            if r2 != r and len(r2) == len(r):
                                emit("relation", i, i + len(r), r2)
        return out

    def contrasts(self, prompt: str) -> list[Contrast]:
        allc = self._all(prompt)
        if not self.max_contrasts or len(allc) <= self.max_contrasts:
            return allc
        import zlib

        rng = np.random.default_rng([self.seed, zlib.crc32(prompt.encode())])
        by_kind: dict[str, list[Contrast]] = {}
        for c in allc:
            by_kind.setdefault(c.kind, []).append(c)
        kinds = [self.kinds[i] for i in rng.permutation(len(self.kinds))]
        queues = [[by_kind[k][i] for i in rng.permutation(len(by_kind[k]))] for k in kinds if k in by_kind]
        picked: list[Contrast] = []
        while len(picked) < self.max_contrasts:
            for q in queues:
                if q and len(picked) < self.max_contrasts:
                    picked.append(q.pop(0))
        return picked

    def __call__(self, prompt: str) -> list[str]:
        return [c.prompt for c in self.contrasts(prompt)]


def contrast_sets(prompts: Sequence[str], generator: ContrastGenerator | None = None) -> list[list[str]]:
    """Contrastive prompts for each prompt (``generator`` default: :class:`RuleContrast`()).
    The prompt itself and duplicates are dropped from a generator's output."""
    gen = generator or RuleContrast()
    out = []
    for p in prompts:
        cs = [c for c in dict.fromkeys(gen(p)) if c != p]
        out.append(cs)
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
    tau = float(tau)
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0 (inf allowed), got {tau}")
    if tau == 0.0:  # hard limit: share 1 among the tied maxima
        zz = np.where(valid, z, -np.inf)
        m = zz.max(axis=1, keepdims=True)
        ties = (zz == m).sum(axis=1)
        with np.errstate(divide="ignore"):
            return np.where(z[:, 0] == m[:, 0], -np.log(ties), -np.inf)
    if math.isinf(tau):
        return -np.log(valid.sum(axis=1).astype(np.float64))
    s = np.where(valid, z / tau, -np.inf)
    return s[:, 0] - logsumexp(s, axis=1)


def textnorm(reward, contrast_rewards, tau: float = 1.0) -> np.ndarray:
    """TextNorm: r~ = exp(r/tau) / sum over {y} U C(y) of exp(r(x, y')/tau), per example.

    ``reward``: (N,) rewards r(x_i, y_i); ``contrast_rewards``: (N, K) rewards r(x_i, y') of the
    contrastive prompts (NaN = no contrast in that slot: ragged sets). ``tau`` > 0; 0 and ``inf``
    give the limits (see the module docstring). Returns float64 (N,) values in [0, 1].
    """
    return np.exp(log_textnorm(reward, contrast_rewards, tau))


def format_metric_table(rows: Mapping[str, Mapping[str, float]], title: str = "reward") -> str:
    """A markdown table: one row per named reward, one column per metric."""
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| " + title + " | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = ["" if r.get(c) is None else ("nan" if r[c] != r[c] else f"{r[c]:.3f}") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
