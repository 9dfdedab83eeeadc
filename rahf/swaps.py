"""One-word swaps: prompts that differ from a prompt in exactly one content word.

A swap replaces one word of a prompt (its words by :func:`rahf.schema.split_words`) with another
word of the same kind, by rule:

==========  ===================================================================================
kind        rule
==========  ===================================================================================
colour      a colour word -> another colour
object      a noun -> another noun of the same grammatical number ("circle" -> "star",
            "circles" -> "stars")
count       a plural numeral -> another plural numeral ("two" -> "three"; the noun stays plural)
size        a size word -> its opposite ("small" <-> "big")
relation    one word of a spatial phrase -> the word that makes the opposite phrase
            ("left of" -> "right of", "above" -> "below")
==========  ===================================================================================

The article in front of the swapped word is fixed ("a red apple" -> "an orange apple", "an orange
circle" -> "a red circle"); that is the only other word that may change. The case of the replaced
word is kept. Variants are drawn by :func:`word_swaps` with a generator seeded by a key (a record's
uid), so every caller (evaluation, training data, TextNorm) gets the same variants of a record.

Two vocabularies are built in: :data:`SYNTH_SWAPS` (exactly the synth generator's words, so a model
with the built-in word tokenizer knows every swapped-in word) and :data:`DEFAULT_SWAPS`, the synth
words plus common words of natural prompts (colours, everyday object nouns, numerals up to ten,
size adjectives and their opposites, opposite spatial words), for datasets such as RichHF-18K.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .lexicon import COLOUR_WORDS, COUNT_WORDS, PLURALS, RELATIONS, SIZE_WORDS
from .schema import split_words

SWAP_KINDS: tuple[str, ...] = ("colour", "object", "count", "size", "relation")
VARIANT_SEP = "~"  # uids of a record's prompt variants: "<record uid>~<k>", k = 1, 2, ...


def group_key(uid: str) -> str:
    """The uid of the record a (variant) uid belongs to: records of one image share it."""
    return uid.split(VARIANT_SEP, 1)[0]


VOWEL_SOUNDS = ("a", "e", "i", "o", "u")


@dataclass(frozen=True)
class SwapVocabulary:
    """Words the rules may swap (all lower case).

    ``colours``: swapped among themselves; ``nouns``: singular -> plural (a singular is swapped with
    singulars, a plural with plurals); ``numerals``: plural counts, swapped among themselves;
    ``opposites``: size words and relation words mapped to their opposite (symmetric pairs; the
    kind of each is given by ``relation_words``)."""

    colours: tuple[str, ...] = ()
    nouns: Mapping[str, str] = field(default_factory=dict)
    numerals: tuple[str, ...] = ()
    opposites: Mapping[str, str] = field(default_factory=dict)
    relation_words: frozenset[str] = frozenset()

    def kind_of(self, word: str) -> str | None:
        """The swap kind of a (lower-case) word, or None when no rule applies to it."""
        if word in self.colours:
            return "colour"
        if word in self.nouns or word in self._plurals:
            return "object"
        if word in self.numerals:
            return "count"
        if word in self.opposites:
            return "relation" if word in self.relation_words else "size"
        return None

    @property
    def _plurals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.nouns.values()))

    def replacements(self, word: str) -> list[str]:
        """Every word ``word`` may be swapped for (deterministic order)."""
        kind = self.kind_of(word)
        if kind == "colour":
            return [c for c in self.colours if c != word]
        if kind == "object":
            pool = list(self.nouns) if word in self.nouns else list(self._plurals)
            return [n for n in pool if n != word]
        if kind == "count":
            return [n for n in self.numerals if n != word]
        if kind in ("size", "relation"):
            return [self.opposites[word]]
        return []


def _pairs(*pairs: tuple[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a, b in pairs:
        out[a], out[b] = b, a
    return out


# relation phrases of the synth vocabulary with an opposite: the first word is the one swapped
_SYNTH_RELATION_PAIRS = (("left", "right"), ("above", "below"))
assert all(f"{a} of" in RELATIONS or a in RELATIONS for a, _ in _SYNTH_RELATION_PAIRS)

SYNTH_SWAPS = SwapVocabulary(
    colours=COLOUR_WORDS,
    nouns=dict(PLURALS),
    numerals=tuple(w for n, ws in COUNT_WORDS.items() if n > 1 for w in ws),
    opposites=_pairs(tuple(SIZE_WORDS), *_SYNTH_RELATION_PAIRS),  # type: ignore[arg-type]
    relation_words=frozenset(w for p in _SYNTH_RELATION_PAIRS for w in p),
)
"""The synth generator's words: colours, shapes, "two"/"three", small/big, left/right, above/below."""

_NATURAL_NOUNS = ("apple", "ball", "banana", "bear", "bicycle", "bird", "boat", "book", "bottle", "bowl",
                  "box", "bus", "car", "cat", "chair", "clock", "cow", "cup", "dog", "door", "elephant",
                  "flower", "giraffe", "hat", "horse", "house", "lamp", "man", "pizza", "robot", "sheep",
                  "table", "tree", "truck", "umbrella", "vase", "woman")
_IRREGULAR = {"man": "men", "woman": "women", "sheep": "sheep"}

DEFAULT_SWAPS = SwapVocabulary(
    colours=COLOUR_WORDS + ("black", "white", "brown", "pink", "gray", "grey", "gold", "silver"),
    nouns={**PLURALS, **{n: _IRREGULAR.get(n, n + ("es" if n.endswith(("s", "x", "ch", "sh")) else "s"))
                         for n in _NATURAL_NOUNS}},
    numerals=("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    opposites=_pairs(tuple(SIZE_WORDS), ("large", "tiny"), ("tall", "short"),
                     ("old", "new"), *_SYNTH_RELATION_PAIRS, ("under", "over"), ("top", "bottom"),
                     ("front", "behind"), ("inside", "outside")),
    relation_words=frozenset(w for p in (*_SYNTH_RELATION_PAIRS, ("under", "over"), ("top", "bottom"),
                                         ("front", "behind"), ("inside", "outside")) for w in p),
)
"""For natural prompts: the synth words plus common colours, 37 everyday object nouns, numerals
two-ten, size adjectives (large/tiny, tall/short, old/new) and opposite spatial words
(left/right, above/below, under/over, top/bottom, front/behind, inside/outside). Swaps in natural
prompts are approximate: a swapped word is assumed to no longer fit the image."""


@dataclass(frozen=True)
class WordSwap:
    """A prompt with one word swapped: ``words`` is the new prompt's words, ``index`` the swapped
    word's position, ``article`` the position of the fixed article (or None)."""

    kind: str
    index: int
    old: str
    new: str
    words: tuple[str, ...]
    article: int | None = None

    @property
    def prompt(self) -> str:
        return " ".join(self.words)


def _case_like(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def article_for(word: str, like: str = "a") -> str:
    """"a" or "an" for the word that follows (by its first letter), in the case of ``like``."""
    art = "an" if word[:1].lower() in VOWEL_SOUNDS else "a"
    return _case_like(art, like)


def candidate_swaps(words: Sequence[str], vocab: SwapVocabulary = DEFAULT_SWAPS,
                    kinds: Sequence[str] = SWAP_KINDS) -> list[WordSwap]:
    """Every one-word swap of ``words`` the rules allow, in word order then vocabulary order."""
    bad = set(kinds) - set(SWAP_KINDS)
    if bad:
        raise ValueError(f"unknown swap kinds {sorted(bad)}; choose from {SWAP_KINDS}")
    out = []
    for i, w in enumerate(words):
        low = w.lower()
        kind = vocab.kind_of(low)
        if kind not in kinds:
            continue
        if kind == "relation" and low in ("left", "right") and (i + 1 >= len(words) or words[i + 1].lower() != "of"):
            continue  # "left"/"right" are relation words only in "left of"/"right of"
        for new in vocab.replacements(low):
            new_words = list(words)
            new_words[i] = _case_like(new, w)
            art = None
            if i > 0 and words[i - 1].lower() in ("a", "an"):
                fixed = article_for(new, words[i - 1])
                if fixed != words[i - 1]:
                    new_words[i - 1], art = fixed, i - 1
            out.append(WordSwap(kind, i, w, new_words[i], tuple(new_words), art))
    return out


def swap_rng(key: str, seed: int = 0) -> np.random.Generator:
    """The generator that picks the variants of the record ``key`` (its uid)."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def pick_swaps(cands: Sequence[WordSwap], n: int, rng: np.random.Generator) -> list[WordSwap]:
    """Up to ``n`` swaps, round-robin over kinds in a random order, one per word position at most
    until every position is used."""
    by_kind: dict[str, list[WordSwap]] = {}
    for c in cands:
        by_kind.setdefault(c.kind, []).append(c)
    kinds = [k for k in SWAP_KINDS if k in by_kind]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    queues = []
    for k in kinds:
        q = by_kind[k]
        q = [q[i] for i in rng.permutation(len(q))]
        # prefer distinct positions first
        seen: set[int] = set()
        first = [c for c in q if not (c.index in seen or seen.add(c.index))]
        queues.append(first + [c for c in q if c not in first])
    picked: list[WordSwap] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def word_swaps(prompt: str | Sequence[str], key: str, n: int = 4, vocab: SwapVocabulary = DEFAULT_SWAPS,
               kinds: Sequence[str] = SWAP_KINDS, seed: int = 0) -> list[WordSwap]:
    """Up to ``n`` one-word swaps of ``prompt`` (a string, split by the package's word rule, or its
    words), picked with :func:`swap_rng` ``(key, seed)``: the same key always gives the same swaps."""
    words = split_words(prompt) if isinstance(prompt, str) else list(prompt)
    return pick_swaps(candidate_swaps(words, vocab, kinds), n, swap_rng(key, seed))
