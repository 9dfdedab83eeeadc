"""The package's one schema (rahf.schema): the word and tag rules, and that the names, the tag and the
record rules are defined there only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rahf
from rahf import schema
from rahf.schema import (MAP_NAMES, SCORE_NAMES, SPLITS, TAG, TASKS, clean_prompt, misaligned_words, parse_tagged,
                         split_words, tag_words)

PACKAGE = Path(rahf.__file__).parent
# names whose value the schema defines; no other package module may assign them
DEFINED_IN_SCHEMA = ("SCORE_NAMES", "MAP_NAMES", "TASKS", "SPLITS", "TAG", "MIN_IMAGE_SIDE", "MAX_PROMPT_CHARS")


def test_word_rule_and_tags_round_trip():
    caption = 'A photo of two red circles, left of a "big" blue square.  Also: stars!'
    words = split_words(caption)
    assert words == ["A", "photo", "of", "two", "red", "circles", "left", "of", "a", "big", "blue", "square",
                     "Also", "stars"]
    assert clean_prompt(caption) == " ".join(words)
    flags = [w in ("red", "big") for w in words]
    tagged = tag_words(words, flags)
    assert "red" + TAG in tagged.split() and "big" + TAG in tagged.split()
    assert parse_tagged(tagged) == (words, flags)
    assert misaligned_words(tagged) == ["red", "big"] and misaligned_words(None) == []
    assert parse_tagged(TAG + " a") == ([TAG, "a"], [False, False])  # the tag alone is a word, untagged
    with pytest.raises(ValueError, match="2 words but 1 labels"):
        tag_words(["a", "b"], [True])


def test_names():
    assert TASKS == MAP_NAMES + SCORE_NAMES + ("keywords",)
    assert SPLITS == ("train", "dev", "test") and TAG == "_0"
    assert rahf.SCORE_NAMES is SCORE_NAMES and rahf.MAP_NAMES is MAP_NAMES


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "schema.py":
            yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(encoding="utf-8"))


def test_names_tag_and_rules_are_not_restated():
    values = {getattr(schema, n): n for n in ("SCORE_NAMES", "MAP_NAMES", "TASKS", "SPLITS")}
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == TAG:
                found.append(f"{path}:{node.lineno}: the tag literal {TAG!r} (use rahf.schema.TAG or its functions)")
            elif isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                name = values.get(tuple(e.value for e in node.elts))
                if name:
                    found.append(f"{path}:{node.lineno}: a literal copy of rahf.schema.{name}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Name) and t.id in DEFINED_IN_SCHEMA:
                        found.append(f"{path}:{node.lineno}: assigns {t.id} (defined in rahf.schema)")
    assert not found, "\n".join(found)


def test_the_record_rules_have_one_home():
    """The dataset loader and the validator reach the image/map rules only through rahf.schema."""
    from rahf.data import format as fmt
    from rahf.data import validate

    assert fmt.load_image is schema.load_image and fmt.load_map is schema.load_map
    tree = ast.parse(Path(validate.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "load_record_files" in imported and "check_entry" in imported
    assert "PIL" not in {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}  # no rules of its own
