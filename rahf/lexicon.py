"""The closed vocabulary of the embedded synth dataset: colour, shape, size, count and relation words
and the prompt templates' words.

The synth generator draws its prompts from these lists, the built-in word tokenizer is built from
them, and the counterfactual word swaps use them; so each word list is defined once, here.
"""

from __future__ import annotations

from .schema import split_words

COLOUR_WORDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "star": "stars", "cross": "crosses"}
SIZE_WORDS: tuple[str, ...] = ("small", "big")
COUNT_WORDS: dict[int, tuple[str, ...]] = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "next to", "inside")
PREFIXES: tuple[tuple[str, ...], ...] = (
    ("A", "photo", "of"), ("A", "picture", "of"), ("An", "image", "of"), ("A", "drawing", "of"),
    ("A", "painting", "of"), ("There", "is"), ("Scene", ":"),
)
CONNECTIVES: tuple[str, ...] = ("and", "with", "Also", "are")


def _vocabulary() -> list[str]:
    words = set(COLOUR_WORDS) | set(SHAPES) | set(PLURALS.values()) | set(SIZE_WORDS) | {"an"}
    words |= {w for ws in COUNT_WORDS.values() for w in ws}
    words |= {w for r in RELATIONS for w in r.split()}
    words |= {w for p in PREFIXES for w in p if split_words(w)}
    words |= set(CONNECTIVES)
    return sorted(words)


SYNTH_VOCABULARY: list[str] = _vocabulary()
"""Every word a synth prompt can contain (case as written)."""
