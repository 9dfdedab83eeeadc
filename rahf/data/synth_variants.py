"""Counterfactual prompts for synth scenes, with exact labels.

A synth record knows its scene (what the prompt asked for, what was drawn, where). A one-word swap
of its prompt (:mod:`rahf.swaps`, synth vocabulary) asks for something else of the *same image*;
since every label is a function of (prompt, drawn scene), the variant's labels are exact:

* a group's errors are recomputed attribute by attribute (asked colour vs drawn colour, shape,
  count, size); a missing group stays missing; a swap may add an error ("red" -> "blue" on a red
  circle) or remove one ("blue" -> "red" on a circle asked blue and drawn red); a group may carry
  two errors (a colour swap on a group drawn with the wrong shape): both are tagged and weigh;
* a relation swap to the opposite phrase ("left of" -> "right of", "above" -> "below") flips the
  place error (unless the subject is missing);
* tags follow the generator's rules; the misalignment map is drawn over the wrong groups' objects
  by the same simulated raters (clicks seeded by the variant's uid);
* alignment = the record's alignment + (noise-free alignment of the variant - of the record), so
  the variant keeps the record's rater noise; overall moves by 0.35 of that; plausibility,
  aesthetics and the implausibility map are the image's and do not change.

Swaps that the rules cannot label exactly are not made: count swaps only between plural numerals,
relation swaps only left/right and above/below, and no swap that makes two groups ask for the same
(colour, shape). :func:`grouped_generate` writes a training split where each scene comes with
several prompts (the record first, then its variants, uids ``<uid>~<k>``), so that the image alone
cannot predict alignment, tags or the misalignment map.
"""

from __future__ import annotations

import copy
import io
import multiprocessing as mp
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..lexicon import PLURALS
from ..swaps import SYNTH_SWAPS, VARIANT_SEP, group_key, WordSwap, candidate_swaps, pick_swaps, swap_rng
from . import synth
from .format import SplitWriter, map_to_png_bytes, read_dataset_info, tag_words, write_dataset_info

_ROLE_OF_KIND = {"colour": "colour", "object": "noun", "count": "count", "size": "size", "relation": "rel"}
_SINGULAR = {p: s for s, p in PLURALS.items()}
_OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class Variant:
    """A counterfactual of a synth record: the swap and the variant's exact labels."""

    swap: WordSwap
    record: synth.SynthRecord
    errors: dict[int, set[str]]
    place_error: bool
    true_alignment: float  # noise-free


def _new_spec(spec: synth.PromptSpec, swap: WordSwap) -> synth.PromptSpec:
    new = copy.deepcopy(spec)
    kind, gi = spec.roles[swap.index] if isinstance(spec.roles[swap.index], tuple) else (None, None)
    word = swap.new.lower()
    if swap.kind == "relation":
        new.relation = _OPPOSITE_RELATION[spec.relation]
    else:
        g = new.groups[gi]
        if swap.kind == "colour":
            g.colour = word
        elif swap.kind == "object":
            g.shape = _SINGULAR.get(word, word)
        elif swap.kind == "count":
            g.count = {"two": 2, "three": 3}[word]
            g.count_word = word
        elif swap.kind == "size":
            g.size = word
    if swap.article is not None:
        _, agi = spec.roles[swap.article]
        new.groups[agi].count_word = swap.words[swap.article]
    # the caption's tokens with the new words (punctuation kept)
    words = iter(swap.words)
    new.tokens = [(t if role == "punct" else next(words), role) for t, role in spec.tokens]
    return new


def exact_errors(scene: synth.Scene, spec: synth.PromptSpec) -> tuple[dict[int, set[str]], bool]:
    """The errors of ``scene``'s drawing against a (swapped) prompt ``spec``: per group a set of kinds,
    and whether the relation is violated."""
    errors: dict[int, set[str]] = {}
    for gi, (g, d) in enumerate(zip(spec.groups, scene.drawn)):
        if scene.errors.get(gi) == "missing":
            errors[gi] = {"missing"}
            continue
        kinds = {k for k, a, b in (("colour", g.colour, d.colour), ("shape", g.shape, d.shape),
                                   ("count", g.count, d.count), ("size", g.size, d.size)) if a != b}
        if kinds:
            errors[gi] = kinds
    place = scene.place_error
    if spec.relation != scene.spec.relation:
        place = not scene.place_error and errors.get(0) != {"missing"}
    return errors, place


def variant_tags(spec: synth.PromptSpec, errors: dict[int, set[str]], place: bool) -> list[bool]:
    return [k is not None for k in synth.tag_kinds(spec, errors, place)]


def true_alignment_of(spec: synth.PromptSpec, errors: dict[int, set[str]], place: bool) -> float:
    w = sum(synth.ERROR_WEIGHTS[k] for kinds in errors.values() for k in kinds) + (synth.ERROR_WEIGHTS["place"] if place else 0)
    return float(np.clip(0.96 - 0.42 * w / (1 + 0.15 * (len(spec.groups) - 1)), 0.02, 0.98))


def synth_swaps(rec: synth.SynthRecord) -> list[WordSwap]:
    """Every swap of ``rec``'s prompt that can be labelled exactly (see the module docstring)."""
    spec = rec.scene.spec
    words, roles = spec.words, spec.roles
    out = []
    for s in candidate_swaps(words, SYNTH_SWAPS):
        role = roles[s.index]
        if not isinstance(role, tuple) or role[0] != _ROLE_OF_KIND[s.kind]:
            continue
        if s.kind == "relation" and spec.relation not in _OPPOSITE_RELATION:
            continue
        if s.kind == "count" and spec.groups[role[1]].count < 2:
            continue
        if s.article is not None and not (isinstance(roles[s.article], tuple) and roles[s.article][0] == "count"):
            continue
        if s.kind in ("colour", "object"):
            asked = _new_spec(spec, s).groups
            if len({(g.colour, g.shape) for g in asked}) < len(asked):
                continue
        out.append(s)
    return out


def make_variant(rec: synth.SynthRecord, swap: WordSwap, uid: str) -> Variant:
    """The counterfactual of ``rec`` under ``swap`` with exact labels (same image, new uid)."""
    scene = rec.scene
    spec = _new_spec(scene.spec, swap)
    errors, place = exact_errors(scene, spec)
    old = true_alignment_of(scene.spec, scene.error_sets, scene.place_error)
    new = true_alignment_of(spec, errors, place)
    scores = dict(rec.scores)
    scores["alignment"] = round(float(np.clip(rec.scores["alignment"] + new - old, 0, 1)), 4)
    scores["overall"] = round(float(np.clip(rec.scores["overall"] + 0.35 * (new - old), 0, 1)), 4)
    view = synth.Scene(spec, {g: next(iter(k)) for g, k in errors.items()}, place, scene.drawn, scene.instances,
                       scene.artifacts, scene.dull)
    size = rec.misalignment_map.shape[0]
    mis = synth._misalignment_map(view, size, swap_rng(uid))
    out = synth.SynthRecord(uid=uid, prompt=" ".join(spec.words), tagged_prompt=tag_words(spec.words, variant_tags(spec, errors, place)),
                            scores=scores, image=rec.image, implausibility_map=rec.implausibility_map,
                            misalignment_map=mis, caption=spec.caption, scene=view)
    return Variant(swap, out, errors, place, new)


VARIANT_PICKS = ("random", "balanced")


def _error_count(errors: dict[int, set[str]], place: bool) -> int:
    return sum(len(k) for k in errors.values()) + int(place)


def record_variants(rec: synth.SynthRecord, n: int, seed: int = 0, pick: str = "random") -> list[Variant]:
    """Up to ``n`` exact-labelled variants of ``rec``.

    ``pick="random"``: swaps picked by :func:`rahf.swaps.pick_swaps` seeded by the uid (most swaps
    add an error). ``pick="balanced"``: a record drawn with an error gets, first, a swap that *fixes*
    one (the asked word swapped to what was drawn: fewer errors than the record), so its image is
    seen under a better-fitting prompt too; an aligned record gets error-adding swaps (every swap of
    an aligned record adds one). With ``n = 1`` the prompts of a scene are then split about evenly
    between aligned and misaligned, and the image alone cannot say which it is.
    """
    if pick not in VARIANT_PICKS:
        raise ValueError(f"pick must be one of {VARIANT_PICKS}, got {pick!r}")
    rng = swap_rng(rec.uid, seed)
    cands = synth_swaps(rec)
    if pick == "balanced" and (rec.scene.errors or rec.scene.place_error):
        base = _error_count(rec.scene.error_sets, rec.scene.place_error)
        fixing = [s for s in cands if _error_count(*exact_errors(rec.scene, _new_spec(rec.scene.spec, s))) < base]
        first = [fixing[int(i)] for i in rng.permutation(len(fixing))[:n]]
        rest = pick_swaps([c for c in cands if c not in first], n - len(first), rng)
        swaps = first + rest
    else:
        swaps = pick_swaps(cands, n, rng)
    return [make_variant(rec, s, f"{rec.uid}{VARIANT_SEP}{k + 1}") for k, s in enumerate(swaps)]


def regenerate(root: str | Path, split: str, uid: str) -> synth.SynthRecord | None:
    """The synth record ``uid`` of ``split`` regenerated (with its scene) from the dataset's seed and size,
    or None when ``root`` is not a synth dataset or ``uid`` is not a synth uid of that split."""
    info = read_dataset_info(root)
    prefix = f"synth-{split}-"
    if info.get("source") != "synth" or not uid.startswith(prefix) or not uid[len(prefix):].isdigit():
        return None
    return synth.make_record(int(info.get("seed", 0)), split, int(uid[len(prefix):]), int(info.get("size", 128)),
                             float(info.get("easy_fraction", {}).get(split, 0.0)))


# ----------------------------------------------------------------------------------------------
# grouped training data
def _encode(rec: synth.SynthRecord, image_png: bytes) -> tuple:
    return (rec.uid, rec.prompt, rec.tagged_prompt, rec.scores, image_png,
            map_to_png_bytes(rec.implausibility_map), map_to_png_bytes(rec.misalignment_map))


def _grouped_rows(task: tuple[int, str, int, int, int, str, float]) -> list[tuple]:
    seed, split, index, size, k, pick, easy = task
    rec = synth.make_record(seed, split, index, size, easy)
    buf = io.BytesIO()
    rec.image.save(buf, format="PNG")
    png = buf.getvalue()
    rows = [_encode(rec, png)]
    rows += [_encode(v.record, png) for v in record_variants(rec, k - 1, seed, pick)]
    return rows


def grouped_generate(out: str | Path, split: str, scenes: int, prompts_per_image: int, size: int = 128,
                     seed: int = 0, workers: int | None = None, pick: str = "random",
                     easy_fraction: float = 0.0) -> int:
    """Write ``split`` of a synth dataset at ``out`` with ``scenes`` records, each followed by up to
    ``prompts_per_image - 1`` exact-labelled variants (same image; ``pick``: see :func:`record_variants`;
    ``easy_fraction``: see :func:`rahf.data.synth.is_easy`).
    Returns the records written.
    The scenes are the plain generator's (``synth-<split>-<index>``), so the split's first prompts
    equal a plain synth split's."""
    if prompts_per_image < 1:
        raise ValueError("prompts_per_image must be >= 1")
    import os

    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    tasks = [(seed, split, i, size, prompts_per_image, pick, easy_fraction) for i in range(scenes)]
    pool = mp.get_context("fork" if sys.platform.startswith("linux") else None).Pool(workers) if workers > 1 else None
    try:
        rows = pool.imap(_grouped_rows, tasks, chunksize=8) if pool else map(_grouped_rows, tasks)
        with SplitWriter(out, split) as w:
            for group in rows:
                for r in group:
                    w.add(r[0], r[1], r[2], r[3], (r[4], "png"), r[5], r[6])
            n = w.count
    finally:
        if pool:
            pool.close()
            pool.join()
    info = {k: v for k, v in read_dataset_info(out).items() if k not in ("format", "version")}
    info.setdefault("source", "synth")
    info.setdefault("seed", seed)
    info.setdefault("size", size)
    info["splits"] = {**info.get("splits", {}), split: n}
    info["prompts_per_image"] = {**info.get("prompts_per_image", {}), split: prompts_per_image}
    info["variant_pick"] = {**info.get("variant_pick", {}), split: pick}
    if easy_fraction:
        info["easy_fraction"] = {**info.get("easy_fraction", {}), split: easy_fraction}
    write_dataset_info(out, **info)
    return n


__all__ = ["VARIANT_PICKS", "Variant", "VARIANT_SEP", "group_key", "exact_errors", "synth_swaps", "make_variant", "record_variants",
           "regenerate", "grouped_generate", "variant_tags", "true_alignment_of"]
