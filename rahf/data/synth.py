"""The embedded synthetic dataset ("synth"): text-to-image-like scenes with exact rich-feedback labels.

Each record is a prompt naming 1-4 *groups* of objects ("two red circles", "a big blue square"),
optionally with one spatial relation between the first two groups ("left of", "right of", "above",
"below", "next to", "inside"), phrased in several templates with punctuation::

    A photo of two red circles, left of a big blue square.
    There is a small green star inside a big yellow circle. Also, three purple crosses.
    Scene: a blue triangle, an orange circle and two red stars

The image renders the scene on a textured gradient background, some groups as asked and some
wrongly, and sometimes adds rendering artifacts. Every label is computed from what was drawn.

Misalignment (which prompt words get the ``_0`` tag, and where the misalignment map is non-zero):

==============  ==========================================  ==========================================
error           tagged words                                 misalignment map
==============  ==========================================  ==========================================
wrong colour    the group's colour word                      over every drawn object of the group
wrong shape     the group's noun                             over every drawn object of the group
wrong count     the group's count word (a/an/one/two/three)  over every drawn object of the group
wrong size      the group's size word (small/big)            over every drawn object of the group
missing         count, size, colour words and the noun       where the group's objects should have been
wrong place     every word of the relation ("left of")       over the relation's subject (first group)
==============  ==========================================  ==========================================

So a prompt word is tagged if and only if its object has a non-empty misalignment region, and a
prompt with no tag has an all-zero misalignment map. About half of the records have no error.
Map regions are drawn as real annotations are: three simulated raters each click every wrong
object (centre jittered by at most half a disk radius) and put a disk of radius 1/20-1/10 of the
image (about 3/4 of the object's radius) there; the map is the mean of the raters' disk masks
(so it reaches 1 where all three agree), with a one-pixel soft edge.

Implausibility: artifacts drawn on about half of the images (0-3 per image), each of five kinds:
*smear* (a motion streak of an object's colour), *duplicate* (a ghost copy of an object's outline,
offset), *broken* (a jagged wedge cut out of an object with a dark crack), *melt* (drips hanging
from an object) and *blotch* (a blob of saturated random-colour noise). The implausibility map is
built from the artifacts with the same simulated-rater disks; no artifact -> all-zero map.

Scores (all in [0, 1], higher is better; each gets Gaussian rater noise of std 0.025, then clipped):

- plausibility = 0.96 - 0.2 * sum of artifact severities (severity: 0.7-1.0 by kind, times
  0.8-1.2 by the artifact's extent).
- alignment = 0.96 - 0.42 * sum of error weights / (1 + 0.15 * (groups - 1)); weights: missing 1.0,
  wrong shape 0.75, colour 0.65, count 0.55, place 0.55, size 0.45.
- aesthetics = 0.12 + 0.30 * (1 - background dullness: mixed toward a muddy grey, and grainier)
  + 0.20 * balance (area-weighted centroid of the drawn objects near the image centre)
  + 0.15 * (1 - clutter: drawn objects + artifacts) + 0.15 * palette harmony (fewer distinct object
  colours is better) - 0.08 * min(1, artifact severity).
- overall = 0.4 * plausibility + 0.35 * alignment + 0.25 * aesthetics (noise-free parts).

Every quantity is visible in the picture, so the scores need the image; records come in pairs
that (30% of the time) share the prompt with a different rendering.

Determinism: record ``index`` of split ``split`` uses numpy Generators seeded from
``(seed, crc32(split), index, stream)``, so the bytes written depend only on the arguments, never
on ``workers``. uids are ``synth-<split>-<index:06d>``.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..lexicon import (COLOUR_WORDS, CONNECTIVES, COUNT_WORDS, PLURALS, PREFIXES, RELATIONS, SHAPES,  # noqa: F401
                       SIZE_WORDS, SYNTH_VOCABULARY)
from .format import SCORE_NAMES, Example, SplitWriter, map_to_png_bytes, read_dataset_info, split_words, tag_words, write_dataset_info

# ----------------------------------------------------------------------------------------------
# Vocabulary
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 75, 225),
    "yellow": (250, 215, 0),
    "purple": (145, 40, 190),
    "orange": (255, 125, 0),
}
assert tuple(COLOURS) == COLOUR_WORDS
# size word -> radius range as a fraction of the image side (None: no size word)
SIZES: dict[str | None, tuple[float, float]] = {"small": (0.10, 0.115), None: (0.125, 0.145), "big": (0.17, 0.19)}
assert tuple(s for s in SIZES if s) == SIZE_WORDS

ERROR_WEIGHTS = {"missing": 1.0, "shape": 0.75, "colour": 0.65, "count": 0.55, "place": 0.55, "size": 0.45}
ARTIFACT_KINDS: tuple[str, ...] = ("smear", "duplicate", "broken", "melt", "blotch")
ARTIFACT_SEVERITY = {"smear": 0.8, "duplicate": 0.7, "broken": 1.0, "melt": 0.9, "blotch": 0.85}
PASTELS = ((236, 232, 220), (220, 232, 240), (232, 240, 222), (242, 226, 230), (226, 224, 242), (245, 238, 212))
OUTLINE = (30, 30, 35)
MUD = (118, 108, 96)  # a dull background is mixed toward this colour (and gets more grain)
SCORE_NOISE = 0.025
BOUND = 1.2  # bounding-circle radius of every shape, in units of its nominal radius
_STREAM_PROMPT, _STREAM_RENDER, _STREAM_SHARE, _STREAM_EASY = 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------
# Prompts
@dataclass
class Group:
    colour: str
    shape: str
    count: int
    size: str | None
    count_word: str = "a"


@dataclass
class PromptSpec:
    """A sampled prompt: the groups, the relation (subject = groups[0], reference = groups[1]) and
    the caption as tokens ``(text, role)``; role is ``(attribute, group)``, ``("rel", -1)``,
    ``None`` (template word) or ``"punct"``."""

    groups: list[Group]
    relation: str | None
    tokens: list[tuple[str, object]]

    @property
    def caption(self) -> str:
        out = ""
        for text, role in self.tokens:
            out += text if role == "punct" or not out else " " + text
        return out

    @property
    def words(self) -> list[str]:
        return [t for t, role in self.tokens if role != "punct"]

    @property
    def roles(self) -> list[object]:
        return [role for _, role in self.tokens if role != "punct"]


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(split.encode()), int(index), stream])


def _sample_group(rng: np.random.Generator) -> Group:
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    size = [None, "small", "big"][int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    return Group(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), count, size)


def _groups_ok(groups: list[Group]) -> bool:
    if len({(g.colour, g.shape) for g in groups}) < len(groups):
        return False
    if sum(g.count for g in groups) > 6:
        return False
    area = sum(g.count * math.pi * (BOUND * SIZES[g.size][1] + 0.01) ** 2 for g in groups)
    return area <= 0.42


def _apply_relation(groups: list[Group], relation: str | None, rng: np.random.Generator) -> None:
    if relation in ("next to", "inside"):
        groups[0].count = groups[1].count = 1
    if relation == "inside":
        groups[0].size, groups[1].size = "small", "big"
        groups[1].shape = str(rng.choice(["circle", "square"]))


def _group_tokens(g: Group, gi: int) -> list[tuple[str, object]]:
    noun = g.shape if g.count == 1 else PLURALS[g.shape]
    toks: list[tuple[str, object]] = [(g.count_word, ("count", gi))]
    if g.size:
        toks.append((g.size, ("size", gi)))
    toks += [(g.colour, ("colour", gi)), (noun, ("noun", gi))]
    return toks


def _join_groups(parts: list[list[tuple[str, object]]]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for i, p in enumerate(parts):
        if i == len(parts) - 1 and i > 0:
            out.append(("and", None))
        elif i > 0:
            out.append((",", "punct"))
        out += p
    return out


def _caption_tokens(groups: list[Group], relation: str | None, rng: np.random.Generator) -> list:
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    toks: list[tuple[str, object]] = [(w, "punct" if w == ":" else None) for w in prefix]
    if prefix[:2] == ("There", "is") and groups[0].count > 1:
        toks[1] = ("are", None)
    parts = [_group_tokens(g, i) for i, g in enumerate(groups)]
    if relation:
        toks += parts[0] + ([(",", "punct")] if rng.random() < 0.3 else [])
        toks += [(w, ("rel", -1)) for w in relation.split()] + parts[1]
        if len(parts) > 2:
            style = int(rng.integers(3))
            lead = [[(",", "punct"), ("and", None)], [(".", "punct"), ("Also", None), (",", "punct")],
                    [(",", "punct"), ("with", None)]][style]
            toks += lead + _join_groups(parts[2:])
    elif len(parts) > 1 and rng.random() < 0.3:
        toks += parts[0] + [("with", None)] + _join_groups(parts[1:])
    else:
        toks += _join_groups(parts)
    if rng.random() < 0.8:
        toks.append((".", "punct"))
    return toks


def sample_prompt(rng: np.random.Generator, easy: bool = False) -> PromptSpec:
    """Sample a prompt: 1-4 groups, maybe a relation, a template. ``easy``: one object ("a red
    circle", "a big blue star"; see :data:`EASY_ERRORS`)."""
    k = 1 if easy else int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.25, 0.1]))
    relation = str(rng.choice(RELATIONS)) if k >= 2 and rng.random() < 0.6 else None
    for _ in range(200):
        groups = [_sample_group(rng) for _ in range(k)]
        if easy:
            groups[0].count = 1
            groups[0].size = None if rng.random() < 0.5 else "big"
        _apply_relation(groups, relation, rng)
        if _groups_ok(groups):
            break
    for g in groups:
        g.count_word = str(rng.choice(COUNT_WORDS[g.count], p=[0.75, 0.25] if g.count == 1 else None))
        if g.count_word == "a" and g.size is None and g.colour[0] in "aeiou":
            g.count_word = "an"
    return PromptSpec(groups, relation, _caption_tokens(groups, relation, rng))


# ----------------------------------------------------------------------------------------------
# Scene: errors, layout
@dataclass
class Instance:
    x: float  # centre, fraction of the image side
    y: float
    r: float  # nominal radius, fraction of the image side
    group: int
    drawn: bool = True


@dataclass
class Artifact:
    kind: str
    anchor: tuple[float, float]  # a point of the artifact (fraction of the side); the map covers it
    points: list[tuple[float, float]]
    extent: float
    severity: float


@dataclass
class Scene:
    spec: PromptSpec
    errors: dict[int, str]  # group -> error kind ("colour", "shape", "count", "size", "missing")
    place_error: bool
    drawn: list[Group]  # per group, what was actually drawn
    instances: list[Instance] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    dull: float = 0.0  # background dullness in [0, 1]: darker, muddier, grainier

    @property
    def error_sets(self) -> dict[int, set[str]]:
        """``errors`` as per-group sets, the form :func:`tag_kinds` and the counterfactual variants use."""
        return {g: {k} for g, k in self.errors.items()}


def _allowed_errors(spec: PromptSpec, gi: int) -> list[str]:
    g, rel = spec.groups[gi], spec.relation
    kinds = ["colour", "shape"]
    in_pair = rel is not None and gi < 2
    if not (in_pair and rel in ("next to", "inside")):
        kinds.append("count")
        if g.size:
            kinds.append("size")
    if rel == "inside" and gi == 1:
        kinds.remove("shape")  # keep the container a circle or square
    if len(spec.groups) >= 2 and not (rel and gi == 1):
        kinds.append("missing")
    return kinds


# the errors of an easy (one-object) scene: half are drawn as asked, the others in another colour or shape
EASY_ERRORS = ("colour", "shape")


def _sample_errors(spec: PromptSpec, rng: np.random.Generator, easy: bool = False) -> tuple[dict[int, str], bool]:
    if easy:
        return ({0: str(rng.choice(EASY_ERRORS))} if rng.random() < 0.5 else {}), False
    n = int(rng.choice([0, 1, 2], p=[0.5, 0.33, 0.17]))
    slots = [("group", i) for i in range(len(spec.groups))] + ([("place", -1)] if spec.relation else [])
    order = rng.permutation(len(slots))[:n]
    errors, place, missing = {}, False, False
    for j in order:
        kind, gi = slots[j]
        if kind == "place":
            place = True
            continue
        kinds = [k for k in _allowed_errors(spec, gi) if not (k == "missing" and missing)]
        errors[gi] = str(rng.choice(kinds))
        missing |= errors[gi] == "missing"
    if place and errors.get(0) == "missing":
        place = False  # a missing subject is not also misplaced
    return errors, place


def _drawn_group(g: Group, err: str | None, rng: np.random.Generator) -> Group:
    d = Group(g.colour, g.shape, g.count, g.size, g.count_word)
    if err == "colour":
        d.colour = str(rng.choice([c for c in COLOURS if c != g.colour]))
    elif err == "shape":
        d.shape = str(rng.choice([s for s in SHAPES if s != g.shape]))
    elif err == "count":
        d.count = int(rng.choice([c for c in (1, 2, 3) if c != g.count]))
    elif err == "size":
        d.size = "big" if g.size == "small" else "small"
    return d


def _box(r: float, region: str | None) -> tuple[float, float, float, float]:
    m = BOUND * r + 0.01
    x0, x1, y0, y1 = m, 1 - m, m, 1 - m
    if region == "left":
        x1 = min(x1, 0.42)
    elif region == "right":
        x0 = max(x0, 0.58)
    elif region == "top":
        y1 = min(y1, 0.42)
    elif region == "bottom":
        y0 = max(y0, 0.58)
    return x0, x1, y0, y1


def _free(x: float, y: float, r: float, placed: list[Instance], slack: float, skip: int = -99) -> bool:
    return all(math.hypot(x - p.x, y - p.y) >= slack * (BOUND * (r + p.r) + 0.02)
               for p in placed if p.group != skip)


def _place(rng, r, region, placed, slack, near=None, far=None, skip=-99) -> tuple[float, float] | None:
    x0, x1, y0, y1 = _box(r, region)
    for _ in range(60):
        if near is not None:  # "next to": same row, just beside the reference
            side = 1 if rng.random() < 0.5 else -1
            x = near.x + side * (BOUND * (r + near.r) + rng.uniform(0.03, 0.07))
            y = near.y + rng.uniform(-0.04, 0.04)
        else:
            x, y = rng.uniform(x0, max(x0, x1)), rng.uniform(y0, max(y0, y1))
        if not (x0 - 1e-9 <= x <= x1 + 1e-9 and y0 - 1e-9 <= y <= y1 + 1e-9):
            continue
        if far is not None:  # a wrong "next to": far away, and not side by side in the same row either
            dist = math.hypot(x - far.x, y - far.y)
            if dist < 0.45 or (abs(y - far.y) < 0.1 and dist - BOUND * (r + far.r) < 0.15):
                continue
        if slack <= 0 or _free(x, y, r, placed, slack, skip):
            return x, y
    return None


_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_REGIONS = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
            "below": ("bottom", "top")}


def _radii(g: Group, rng: np.random.Generator) -> list[float]:
    lo, hi = SIZES[g.size]
    base = rng.uniform(lo, hi)
    return [base * rng.uniform(0.97, 1.03) for _ in range(g.count)]


def _try_layout(scene: Scene, rng: np.random.Generator, slack: float) -> list[Instance] | None:
    spec, rel = scene.spec, scene.spec.relation
    # a missing group is laid out with the prompt's attributes, and not drawn
    plan = [spec.groups[i] if scene.errors.get(i) == "missing" else d for i, d in enumerate(scene.drawn)]
    radii = [_radii(g, rng) for g in plan]
    order = ([1, 0] if rel else []) + [i for i in range(len(plan)) if not (rel and i < 2)]
    placed: list[Instance] = []
    for gi in order:
        region, near, far, skip = None, None, None, -99
        if rel in _REGIONS and gi < 2:
            region = _REGIONS[rel][gi]
            if scene.place_error:
                region = _OPPOSITE[region]
        for r in radii[gi]:
            pos = None
            if rel == "inside" and gi == 0 and not scene.place_error:
                ref = placed[0]
                pos = (ref.x + rng.uniform(-0.015, 0.015), ref.y + rng.uniform(-0.015, 0.015))
            else:
                if rel == "next to" and gi == 0:
                    near, far = (None, placed[0]) if scene.place_error else (placed[0], None)
                pos = _place(rng, r, region, placed, slack, near, far, skip)
            if pos is None:
                return None
            placed.append(Instance(pos[0], pos[1], r, gi, scene.errors.get(gi) != "missing"))
    return placed


def _layout(scene: Scene, rng: np.random.Generator) -> list[Instance]:
    for slack in [1.0] * 20 + [0.85] * 10 + [0.6] * 10 + [0.0]:
        placed = _try_layout(scene, rng, slack)
        if placed is not None:
            return sorted(placed, key=lambda p: p.group)
    raise RuntimeError("layout failed")  # unreachable: slack 0 places without overlap checks


# ----------------------------------------------------------------------------------------------
# Drawing (on a canvas of side W = 2 * size, coordinates in pixels)
def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.15 * r
        return [(cx + R * math.cos(a), cy + R * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (1.2 * r if i % 2 == 0 else 0.5 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (1.2 * r if i % 2 == 0 else 0.5 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if shape == "cross":
        a, b = r, 0.36 * r
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, fill, outline, width: int) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill, outline=outline, width=width)


def _background(rng: np.random.Generator, W: int, dull: float) -> np.ndarray:
    c0, c1 = (np.array(PASTELS[i], np.float32) for i in rng.choice(len(PASTELS), 2, replace=False))
    c0, c1 = ((1 - 0.6 * dull) * c + 0.6 * dull * np.array(MUD, np.float32) for c in (c0, c1))
    a = rng.uniform(0, 2 * math.pi)
    t = np.linspace(-0.5, 0.5, W, dtype=np.float32)
    g = np.clip(0.5 + math.cos(a) * t[None, :] + math.sin(a) * t[:, None], 0, 1)[..., None]
    bg = c0 * (1 - g) + c1 * g  # (W, W, 3)
    # faint low-frequency texture: a few soft waves
    fx, fy, ph = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * (fx * t[None, :] + fy * t[:, None]) + ph)[..., None]
    return bg + 4.0 * wave


class _Canvas:
    def __init__(self, bg: np.ndarray):
        self.bg = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
        self.img = self.bg.copy()
        self.draw = ImageDraw.Draw(self.img)
        self.W = bg.shape[0]
        self.ow = max(2, round(0.012 * self.W))

    def px(self, v: float) -> float:
        return v * self.W

    def overlay(self, paint) -> None:
        """Alpha-composite what ``paint(draw)`` draws on a transparent layer."""
        layer = Image.new("RGBA", self.img.size, (0, 0, 0, 0))
        paint(ImageDraw.Draw(layer))
        self.img = Image.alpha_composite(self.img.convert("RGBA"), layer).convert("RGB")
        self.draw = ImageDraw.Draw(self.img)

    def object(self, inst: Instance, g: Group) -> None:
        _draw_shape(self.draw, g.shape, self.px(inst.x), self.px(inst.y), self.px(inst.r), COLOURS[g.colour],
                    OUTLINE, self.ow)


def _art_smear(cv: _Canvas, inst: Instance, g: Group, rng) -> Artifact:
    a = rng.uniform(0, 2 * math.pi)
    d = (math.cos(a), math.sin(a))
    L = rng.uniform(0.18, 0.3)
    col = COLOURS[g.colour]
    dark = tuple(int(0.55 * c) for c in col)

    def paint(dr):
        for t in np.linspace(0.1, 1.0, 12):
            x, y, rr = inst.x + t * L * d[0], inst.y + t * L * d[1], inst.r * (0.9 - 0.4 * t)
            dr.ellipse([cv.px(x - rr), cv.px(y - rr), cv.px(x + rr), cv.px(y + rr)], fill=col + (int(235 * (1 - 0.6 * t)),))
        for k in (-0.5, 0.0, 0.5):  # streak lines along the smear
            ox, oy = -d[1] * k * inst.r, d[0] * k * inst.r
            dr.line([(cv.px(inst.x + ox), cv.px(inst.y + oy)), (cv.px(inst.x + ox + L * d[0]), cv.px(inst.y + oy + L * d[1]))],
                    fill=dark + (200,), width=max(1, cv.ow // 2))
    cv.overlay(paint)
    pts = [(inst.x + f * L * d[0], inst.y + f * L * d[1]) for f in (0.6, 0.9)]
    return Artifact("smear", pts[0], pts, max(0.5 * L, inst.r), (L - 0.18) / 0.12)


def _art_duplicate(cv: _Canvas, inst: Instance, g: Group, rng) -> Artifact:
    a = rng.uniform(0, 2 * math.pi)
    off = rng.uniform(0.4, 0.65) * inst.r * 2
    x, y = inst.x + off * math.cos(a), inst.y + off * math.sin(a)
    col = COLOURS[g.colour]
    cv.overlay(lambda dr: _draw_shape(dr, g.shape, cv.px(x), cv.px(y), cv.px(inst.r), col + (80,), OUTLINE + (255,),
                                      int(cv.ow * 1.5)))
    return Artifact("duplicate", (x, y), [(x, y)], inst.r, (off / inst.r - 0.8) / 0.5)


def _art_broken(cv: _Canvas, inst: Instance, g: Group, rng) -> Artifact:
    a, width = rng.uniform(0, 2 * math.pi), rng.uniform(0.9, 1.4)
    cx, cy, R = cv.px(inst.x), cv.px(inst.y), cv.px(inst.r) * 1.35
    pts = [(cx + rng.uniform(-0.1, 0.1) * R, cy + rng.uniform(-0.1, 0.1) * R)]
    for t in np.linspace(a - width / 2, a + width / 2, 7):
        rr = R * rng.uniform(0.8, 1.1)
        pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    mask = Image.new("L", cv.img.size, 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    cv.img = Image.composite(cv.bg, cv.img, mask)
    cv.draw = ImageDraw.Draw(cv.img)
    crack = [pts[0]] + [(cx + f * R * math.cos(a + math.pi + j), cy + f * R * math.sin(a + math.pi + j))
                        for f, j in ((0.25, 0.4), (0.4, -0.3), (0.55, 0.3))]
    cv.draw.line(crack, fill=OUTLINE, width=cv.ow + 1)
    cv.draw.line(pts[1:], fill=OUTLINE, width=cv.ow)
    ax, ay = inst.x + 0.55 * inst.r * math.cos(a), inst.y + 0.55 * inst.r * math.sin(a)
    return Artifact("broken", (ax, ay), [(ax, ay), (inst.x, inst.y)], 0.8 * inst.r, (width - 0.9) / 0.5)


def _art_melt(cv: _Canvas, inst: Instance, g: Group, rng) -> Artifact:
    n = int(rng.integers(3, 5))
    hw = max(0.15 * inst.r, 0.018)
    lengths = rng.uniform(0.06, 0.16, n)
    xs = inst.x + np.linspace(-0.6, 0.6, n) * inst.r + rng.uniform(-0.08, 0.08, n) * inst.r
    col = COLOURS[g.colour]
    for x, ln in zip(xs, lengths):
        box = [cv.px(x - hw), cv.px(inst.y + 0.2 * inst.r), cv.px(x + hw), cv.px(inst.y + inst.r + ln)]
        cv.draw.rounded_rectangle(box, radius=cv.px(hw), fill=col, outline=OUTLINE, width=cv.ow)
    cv.object(inst, g)  # the object on top: the drips hang from it
    mean = float(lengths.mean())
    anchor = (inst.x, inst.y + inst.r + 0.5 * mean)
    pts = [anchor] + [(float(x), inst.y + inst.r + 0.5 * ln) for x, ln in zip(xs, lengths)]
    return Artifact("melt", anchor, pts, max(0.7 * inst.r, mean), (mean - 0.06) / 0.1)


def _art_blotch(cv: _Canvas, rng, W: int) -> Artifact:
    x, y, rho = rng.uniform(0.12, 0.88), rng.uniform(0.12, 0.88), rng.uniform(0.08, 0.12)
    mask = Image.new("L", (W, W), 0)
    md = ImageDraw.Draw(mask)
    circles = [(x, y, rho * 0.8)] + [(x + rng.uniform(-0.4, 0.4) * rho, y + rng.uniform(-0.4, 0.4) * rho,
                                      rho * rng.uniform(0.5, 0.75)) for _ in range(3)]
    for cx, cy, rr in circles:
        md.ellipse([cv.px(cx - rr), cv.px(cy - rr), cv.px(cx + rr), cv.px(cy + rr)], fill=255)
    b = 4  # noise block, canvas pixels
    noise = rng.integers(0, 256, (W // b + 1, W // b + 1, 3), dtype=np.uint8)
    noise = np.repeat(np.repeat(noise, b, 0), b, 1)[:W, :W]
    cv.img = Image.composite(Image.fromarray(noise, "RGB"), cv.img, mask)
    cv.draw = ImageDraw.Draw(cv.img)
    return Artifact("blotch", (x, y), [(x, y)], rho, (rho - 0.08) / 0.04)


_OBJECT_ARTIFACTS = {"smear": _art_smear, "duplicate": _art_duplicate, "broken": _art_broken, "melt": _art_melt}


def _on_image(x: float, y: float, margin: float = 0.03) -> tuple[float, float]:
    return float(np.clip(x, margin, 1 - margin)), float(np.clip(y, margin, 1 - margin))


def _draw_artifacts(cv: _Canvas, scene: Scene, rng) -> list[Artifact]:
    n = int(rng.choice([0, 1, 2, 3], p=[0.5, 0.25, 0.15, 0.1]))
    kinds = [str(k) for k in rng.choice(ARTIFACT_KINDS, n)]
    kinds.sort(key=lambda k: k != "melt")  # drips first: melt redraws its object on top
    free = [i for i, p in enumerate(scene.instances) if p.drawn]
    out = []
    for kind in kinds:
        if kind != "blotch" and free:
            inst = scene.instances[free.pop(int(rng.integers(len(free))))]
            art = _OBJECT_ARTIFACTS[kind](cv, inst, scene.drawn[inst.group], rng)
        else:
            art = _art_blotch(cv, rng, cv.W)
        art.severity = ARTIFACT_SEVERITY[art.kind] * (0.8 + 0.4 * float(np.clip(art.severity, 0, 1)))
        # raters click on what they see: keep the points on the image (drips and smears may leave it)
        art.points = [_on_image(x, y) for x, y in art.points]
        art.anchor = _on_image(*art.anchor)
        out.append(art)
    return out


# ----------------------------------------------------------------------------------------------
# Maps and scores
def _rater_map(size: int, clicks_per_rater: list[list[tuple[float, float, float]]]) -> np.ndarray:
    """Mean over raters of the union of each rater's disks ``(x, y, radius)`` (fractions of the side)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    out = np.zeros((size, size), np.float32)
    for clicks in clicks_per_rater:
        m = np.zeros((size, size), np.float32)
        for x, y, R in clicks:
            d = np.sqrt((c[None, :] - x) ** 2 + (c[:, None] - y) ** 2) * size
            np.maximum(m, np.clip(R * size + 0.5 - d, 0, 1), out=m)
        out += m
    return out / max(1, len(clicks_per_rater))


def _click(rng, x: float, y: float, spread: float, R: float) -> tuple[float, float, float]:
    j = rng.normal(0, spread, 2)
    j *= min(1.0, 0.5 * R / max(float(np.hypot(*j)), 1e-12))  # at most half a radius away: the disk covers (x, y)
    return float(x + j[0]), float(y + j[1]), R


def _disk_radius(extent: float) -> float:
    return float(np.clip(0.75 * extent, 0.05, 0.1))


def _misalignment_map(scene: Scene, size: int, rng, raters: int = 3) -> np.ndarray:
    wrong = [p for p in scene.instances if p.group in scene.errors or (scene.place_error and p.group == 0)]
    clicks = [[_click(rng, p.x, p.y, 0.25 * p.r, _disk_radius(p.r)) for p in wrong] for _ in range(raters)]
    return _rater_map(size, clicks)


def _implausibility_map(arts: list[Artifact], size: int, rng, raters: int = 3) -> np.ndarray:
    clicks = []
    for _ in range(raters):
        cl = []
        for a in arts:
            R = _disk_radius(a.extent)
            cl.append(_click(rng, *a.anchor, 0.25 * a.extent, R))
            if len(a.points) > 1 and rng.random() < 0.5:
                cl.append(_click(rng, *a.points[int(rng.integers(1, len(a.points)))], 0.25 * a.extent, R))
        clicks.append(cl)
    return _rater_map(size, clicks)


def _true_scores(scene: Scene) -> dict[str, float]:
    sev = sum(a.severity for a in scene.artifacts)
    plaus = float(np.clip(0.96 - 0.2 * sev, 0.02, 0.98))
    k = len(scene.spec.groups)
    werr = sum(ERROR_WEIGHTS[e] for e in scene.errors.values()) + (ERROR_WEIGHTS["place"] if scene.place_error else 0)
    align = float(np.clip(0.96 - 0.42 * werr / (1 + 0.15 * (k - 1)), 0.02, 0.98))
    drawn = [p for p in scene.instances if p.drawn]
    w = np.array([p.r ** 2 for p in drawn])
    cx, cy = (np.array([p.x for p in drawn]) @ w / w.sum(), np.array([p.y for p in drawn]) @ w / w.sum())
    balance = 1 - min(1.0, math.hypot(cx - 0.5, cy - 0.5) / 0.35)
    clutter = min(1.0, (len(drawn) + len(scene.artifacts) - 1) / 7)
    harmony = max(0.0, 1 - 0.25 * (len({scene.drawn[p.group].colour for p in drawn}) - 1))
    aes = 0.12 + 0.30 * (1 - scene.dull) + 0.20 * balance + 0.15 * (1 - clutter) + 0.15 * harmony - 0.08 * min(1.0, sev)
    aes = float(np.clip(aes, 0.02, 0.98))
    overall = 0.4 * plaus + 0.35 * align + 0.25 * aes
    return {"plausibility": plaus, "alignment": align, "aesthetics": aes, "overall": overall}


TAG_KINDS = ("colour", "shape", "count", "size", "missing", "place")


def tag_kinds(spec: PromptSpec, errors: dict[int, set[str]], place: bool) -> list[str | None]:
    """Per word of ``spec``'s prompt, the error that makes it misaligned (:data:`TAG_KINDS`, the table in
    the module docstring: a wrong colour, shape, count or size tags that word of the group; a missing
    group its count, size, colour and noun; a wrong place the relation's words), or None for a word
    that is not tagged. ``errors``: per group, a set of error kinds (a counterfactual prompt's group
    can carry two)."""
    bad: dict[tuple[str, int], str] = {}
    for gi, kinds in errors.items():
        if "missing" in kinds:
            bad.update({(attr, gi): "missing" for attr in ("count", "size", "colour", "noun")})
            continue
        for kind in kinds:
            bad[({"shape": "noun"}.get(kind, kind), gi)] = kind
    if place:
        bad[("rel", -1)] = "place"
    return [bad.get(role) if isinstance(role, tuple) else None for role in spec.roles]


def _tags(scene: Scene) -> list[bool]:
    return [k is not None for k in tag_kinds(scene.spec, scene.error_sets, scene.place_error)]


# ----------------------------------------------------------------------------------------------
# Records
@dataclass
class SynthRecord(Example):
    """A generated record: an :class:`Example` plus the caption it was phrased as and its scene."""

    caption: str = ""
    scene: Scene | None = None


def scene_layout(spec: PromptSpec, rng: np.random.Generator, easy: bool = False) -> Scene:
    """The first part of :func:`render_scene`: errors, what is drawn and where (no pixels). With the
    same ``rng`` state it returns the scene :func:`render_scene` draws."""
    errors, place = _sample_errors(spec, rng, easy)
    drawn = [_drawn_group(g, errors.get(i), rng) for i, g in enumerate(spec.groups)]
    scene = Scene(spec, errors, place, drawn)
    scene.instances = _layout(scene, rng)
    return scene


def render_scene(spec: PromptSpec, rng: np.random.Generator, size: int = 128,
                 easy: bool = False) -> tuple[Scene, Image.Image, np.ndarray, np.ndarray]:
    """Draw one rendering of ``spec``: returns the scene (errors, instances, artifacts), the RGB
    image (size x size) and the implausibility and misalignment maps (float32, [0, 1]). ``easy``:
    errors of :data:`EASY_ERRORS` only."""
    scene = scene_layout(spec, rng, easy)
    W = 2 * size
    scene.dull = float(rng.uniform(0, 1))
    cv = _Canvas(_background(rng, W, scene.dull))
    for p in sorted(scene.instances, key=lambda p: -p.r):  # big first: a container under its content
        if p.drawn:
            cv.object(p, scene.drawn[p.group])
    scene.artifacts = _draw_artifacts(cv, scene, rng)
    img = np.asarray(cv.img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    img = img + rng.normal(0, 3 + 15 * scene.dull, (size, size, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return scene, image, _implausibility_map(scene.artifacts, size, rng), _misalignment_map(scene, size, rng)


def prompt_key(seed: int, split: str, index: int) -> int:
    """The index whose prompt record ``index`` uses: pairs (2b, 2b+1) share a prompt 30% of the time."""
    block = index // 2
    return 2 * block if _rng(seed, split, block, _STREAM_SHARE).random() < 0.3 else index


def is_easy(seed: int, split: str, index: int, easy_fraction: float) -> bool:
    """Whether record ``index`` of ``split`` is an easy (one-object) scene, for a split generated with
    ``easy_fraction`` of them (drawn from a stream of its own, so the other records do not change)."""
    return easy_fraction > 0 and _rng(seed, split, index, _STREAM_EASY).random() < easy_fraction


def record_spec(seed: int, split: str, index: int, easy_fraction: float = 0.0) -> tuple[PromptSpec, bool]:
    """Record ``index``'s prompt and whether it is an easy (one-object) scene."""
    if is_easy(seed, split, index, easy_fraction):
        return sample_prompt(_rng(seed, split, index, _STREAM_PROMPT), easy=True), True
    return sample_prompt(_rng(seed, split, prompt_key(seed, split, index), _STREAM_PROMPT)), False


def record_scene(seed: int, split: str, index: int, easy_fraction: float = 0.0) -> Scene:
    """The scene of record ``index`` (what :func:`make_record` draws: groups, errors, object places),
    without rendering it: a fraction of :func:`make_record`'s cost. Artifacts are not included."""
    spec, easy = record_spec(seed, split, index, easy_fraction)
    return scene_layout(spec, _rng(seed, split, index, _STREAM_RENDER), easy)


# ----------------------------------------------------------------------------------------------
# Scene targets: what is drawn where, per patch (a synth-only training signal, model.scene_head)
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("none",) + tuple(SHAPES),
    "colour": ("none",) + tuple(COLOURS),
    "size": ("none", "small", "medium", "big"),
}
SCENE_CLASSES = sum(len(v) for v in SCENE_ATTRIBUTES.values())


def scene_targets(scene: Scene, grid: int, cell: int = 8) -> np.ndarray:
    """Per-patch soft labels of what is drawn: ``(grid * grid, SCENE_CLASSES)`` float32, patches in
    row-major order, columns the classes of :data:`SCENE_ATTRIBUTES` one attribute after another
    (shape, colour, size; class 0 of each is "none": background). Each attribute's columns sum to 1:
    the share of the patch covered by each drawn object's shape / colour / size word ("medium" for
    no size word), with objects painted in :func:`render_scene`'s order (big first) so an object
    inside another wins where it is drawn. Rasterised at ``cell`` px per patch; artifacts and
    outlines are ignored (an object's outline counts as the object)."""
    W = grid * cell
    canvas = Image.new("L", (W, W), 0)
    draw = ImageDraw.Draw(canvas)
    drawn = [p for p in scene.instances if p.drawn]
    order = sorted(range(len(drawn)), key=lambda i: -drawn[i].r)
    for i in order:
        p = drawn[i]
        _draw_shape(draw, scene.drawn[p.group].shape, p.x * W, p.y * W, p.r * W, i + 1, i + 1, 1)
    ids = np.asarray(canvas, dtype=np.int64)  # (W, W): 0 background, i + 1 object i
    lookup = np.zeros((len(drawn) + 1, SCENE_CLASSES), np.float32)
    offsets = np.cumsum([0] + [len(v) for v in SCENE_ATTRIBUTES.values()])[:-1]
    lookup[0, offsets] = 1.0
    for i, p in enumerate(drawn):
        g = scene.drawn[p.group]
        for off, names, value in zip(offsets, SCENE_ATTRIBUTES.values(), (g.shape, g.colour, g.size or "medium")):
            lookup[i + 1, off + names.index(value)] = 1.0
    onehot = lookup[ids]  # (W, W, C)
    return onehot.reshape(grid, cell, grid, cell, -1).mean(axis=(1, 3)).reshape(grid * grid, -1)


class SynthScenes:
    """The scenes of a synth dataset's split, for :func:`scene_targets`: each record's scene is
    regenerated from ``dataset.json`` (seed, the split's ``easy_fraction``) and its uid
    (``synth-<split>-<index>``, variants ``<uid>~<k>`` share their record's scene), without rendering.
    :class:`ValueError` when ``root`` is not a synth dataset; :meth:`targets` is None for a uid that is
    not one of the split's generated records."""

    def __init__(self, root: str | os.PathLike, split: str):
        info = read_dataset_info(root)
        if info.get("source") != "synth":
            raise ValueError(f"{root} is not a synth dataset (dataset.json source: {info.get('source')!r}): "
                             "scene targets exist only for the generator's scenes")
        self.seed = int(info.get("seed", 0))
        self.split = split
        self.easy_fraction = float((info.get("easy_fraction") or {}).get(split, 0.0))
        self._prefix = f"synth-{split}-"
        self._cache: dict[tuple[int, int], np.ndarray] = {}  # (index, grid) -> targets: variants and epochs reuse them

    def index(self, uid: str) -> int | None:
        from ..swaps import group_key

        key = group_key(uid)
        rest = key[len(self._prefix):] if key.startswith(self._prefix) else ""
        return int(rest) if rest.isdigit() else None

    def targets(self, uid: str, grid: int) -> np.ndarray | None:
        i = self.index(uid)
        if i is None:
            return None
        if (i, grid) not in self._cache:
            self._cache[i, grid] = scene_targets(record_scene(self.seed, self.split, i, self.easy_fraction), grid)
        return self._cache[i, grid]


def make_record(seed: int, split: str, index: int, size: int = 128, easy_fraction: float = 0.0) -> SynthRecord:
    """Record ``index`` of ``split``: a pure function of the arguments. ``easy_fraction``: the share of
    one-object scenes (:func:`is_easy`; 0 for the plain generator)."""
    spec, easy = record_spec(seed, split, index, easy_fraction)
    return record_from_spec(spec, _rng(seed, split, index, _STREAM_RENDER), f"synth-{split}-{index:06d}", size,
                            easy=easy)


def record_from_spec(spec: PromptSpec, rng: np.random.Generator, uid: str, size: int = 128,
                     easy: bool = False) -> SynthRecord:
    """Render ``spec`` with ``rng`` and label it: scores (with rater noise), tags, maps."""
    scene, image, imp, mis = render_scene(spec, rng, size, easy)
    true = _true_scores(scene)
    scores = {k: round(float(np.clip(true[k] + rng.normal(0, SCORE_NOISE), 0, 1)), 4) for k in SCORE_NAMES}
    words = spec.words
    assert split_words(spec.caption) == words, (spec.caption, words)
    return SynthRecord(uid=uid, prompt=" ".join(words), tagged_prompt=tag_words(words, _tags(scene)), scores=scores,
                       image=image, implausibility_map=imp, misalignment_map=mis, caption=spec.caption, scene=scene)


def _encoded_record(task: tuple[int, str, int, int, float]) -> tuple:
    rec = make_record(*task)
    buf = io.BytesIO()
    rec.image.save(buf, format="PNG")
    return (rec.uid, rec.prompt, rec.tagged_prompt, rec.scores, buf.getvalue(),
            map_to_png_bytes(rec.implausibility_map), map_to_png_bytes(rec.misalignment_map),
            bool(rec.implausibility_map.max() > 0), bool(rec.misalignment_map.max() > 0))


# ----------------------------------------------------------------------------------------------
# Generation
def _prepare_out(out: Path, splits: Sequence[str]) -> None:
    if out.exists() and any(out.iterdir()):
        if read_dataset_info(out).get("source") != "synth":
            raise FileExistsError(f"{out} is not empty and is not a synth dataset; refusing to write into it")
        for s in splits:
            if (out / s).is_dir():
                shutil.rmtree(out / s)
    out.mkdir(parents=True, exist_ok=True)


def _stats(rows: list[tuple]) -> dict:
    scores = np.array([[r[3][k] for k in SCORE_NAMES] for r in rows]) if rows else np.zeros((0, 4))
    return {
        "records": len(rows),
        "empty_implausibility": float(np.mean([not r[7] for r in rows])) if rows else 0.0,
        "empty_misalignment": float(np.mean([not r[8] for r in rows])) if rows else 0.0,
        "score_mean": dict(zip(SCORE_NAMES, scores.mean(0).round(4).tolist())) if rows else {},
        "score_std": dict(zip(SCORE_NAMES, scores.std(0).round(4).tolist())) if rows else {},
    }


@dataclass
class SynthConfig:
    """What :func:`generate` writes by default: the embedded training job's dataset. The trainer's
    ``data.synth`` section and ``rahf data synth`` take their defaults from here."""

    train: int = 3000  # records per split
    dev: int = 200
    test: int = 300
    size: int = 128  # image side in pixels (heatmaps are the same size)
    seed: int = 0
    # > 1: the train split holds each scene with this many prompts (its own and one-word-swap variants
    # with exact labels, rahf.data.synth_variants); dev and test stay plain
    prompts_per_image: int = 1
    # how the variants are chosen (rahf.data.synth_variants.record_variants): "random" swaps (most add an
    # error), or "balanced" (a record drawn with an error first gets a swap that fixes it)
    variant_pick: str = "random"
    # the share of the train split's scenes that show one object ("a red circle", drawn in another
    # colour or shape half of the time): the simplest image-prompt comparison, mixed into training
    # (dev and test stay plain)
    easy_fraction: float = 0.0


SYNTH_DEFAULTS = SynthConfig()


def generate(out: str | os.PathLike, train: int = SYNTH_DEFAULTS.train, dev: int = SYNTH_DEFAULTS.dev,
             test: int = SYNTH_DEFAULTS.test, size: int = SYNTH_DEFAULTS.size, seed: int = SYNTH_DEFAULTS.seed,
             workers: int | None = None, easy_fraction: float = SYNTH_DEFAULTS.easy_fraction) -> dict:
    """Write a synth dataset under ``out`` (splits with a count of 0 are skipped; defaults:
    :data:`SYNTH_DEFAULTS`).

    Returns ``{"out", "splits": counts, "seconds", "rate" (records/s), "stats": per split}``.
    The bytes written depend only on (counts, size, seed, easy_fraction), not on ``workers``.
    ``easy_fraction`` applies to the train split only (see :func:`is_easy`).
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    if seed < 0:
        raise ValueError("seed must be non-negative")
    counts = {s: int(n) for s, n in (("train", train), ("dev", dev), ("test", test)) if n and n > 0}
    out = Path(out)
    _prepare_out(out, list(counts))
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    t0 = time.perf_counter()
    pool = mp.get_context("fork" if sys.platform.startswith("linux") else None).Pool(workers) if workers > 1 else None
    stats = {}
    try:
        for split, n in counts.items():
            tasks = [(seed, split, i, size, easy_fraction if split == "train" else 0.0) for i in range(n)]
            rows = pool.imap(_encoded_record, tasks, chunksize=8) if pool else map(_encoded_record, tasks)
            kept = []
            with SplitWriter(out, split) as w:
                for row in rows:
                    w.add(row[0], row[1], row[2], row[3], (row[4], "png"), row[5], row[6])
                    kept.append(row)
            stats[split] = _stats(kept)
    finally:
        if pool:
            pool.close()
            pool.join()
    extra = {"easy_fraction": {"train": easy_fraction}} if easy_fraction and "train" in counts else {}
    write_dataset_info(out, source="synth", seed=seed, size=size, splits=counts, **extra)
    seconds = time.perf_counter() - t0
    total = sum(counts.values())
    return {"out": str(out), "splits": counts, "seconds": seconds, "rate": total / max(seconds, 1e-9), "stats": stats}
