"""Synth labels against the pixels: what the tags and maps claim is measured in the rendered image.

The checks read only a record's prompt, tagged prompt, maps and image — never the generator's own
scene — and measure the drawn objects independently:

* objects are the connected components (``scipy.ndimage.label``) of each palette colour. The image
  gets grey noise (the same offset on R, G and B, then clipped), so a pixel "is" a palette colour when
  one grey offset brings the colour within a small tolerance of it on every channel;
* a component's shape is read from its fill of the bounding box and its solidity (area over convex
  hull area), holes filled (a container with an object inside); its radius from its area;
* positions are component centroids.

Then, per prompt group (count, size, colour, noun) the tagged words say what is wrong, and the pixels
must agree: an untagged group is drawn as asked; a tagged colour/noun/count/size word means exactly
that attribute differs in the picture; a missing group (all its words tagged) has no object, and the
map marks empty background; a tagged relation is violated by the groups' centroids, an untagged one
holds. The misalignment map is positive on every wrongly drawn object and nowhere else; an untagged
prompt has an all-zero map.

Errors are forced one at a time (the generator's choice of errors is replaced; everything else —
drawing, tags, maps — is the generator's), on prompts whose groups differ in colour and in shape, so
that a group's objects can be told apart by colour or by shape. Artifacts are checked against the
same scene rendered without them: the implausibility map must mark every region where the pixels
changed, and nothing else.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image
from scipy.spatial import ConvexHull

from rahf.data import synth
from rahf.lexicon import COUNT_WORDS, PLURALS, RELATIONS, SHAPES, SIZE_WORDS
from rahf.schema import parse_tagged

SIZE = 128
PALETTE = dict(synth.COLOURS)  # the colour words' RGB values: what "red" means in a synth picture
NOISE = 70  # the largest grey offset considered (the generator's noise std is at most 18)
TOL = 24  # per-channel tolerance to a palette colour after the grey offset
CROSS = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.uint8)
MIN_AREA = 30  # components smaller than this are edge slivers, not objects
COUNTS = {w: n for n, ws in COUNT_WORDS.items() for w in ws} | {"an": 1}
NOUNS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
# radius (fraction of the side) of each size word, from the generator's size table, with the 3% jitter
# of each object and the measurement's error (±0.005) added
RADIUS = {w: (lo * 0.97 - 0.006, hi * 1.03 + 0.006) for w, (lo, hi) in synth.SIZES.items()}
# measuring a radius from a component's area: r·SIZE = a·sqrt(area) + b, with a = 1/sqrt(area of the unit
# shape) (star 1.763, square 1.64², cross 2.36, triangle 1.718, circle π) and b the outline's inset
# (about 1.45 px times perimeter / (2 area) of the unit shape)
RADIUS_FIT = {"star": (0.756, 3.33), "square": (0.610, 1.82), "cross": (0.648, 2.58), "triangle": (0.753, 2.76),
              "circle": (0.565, 1.32)}


# ----------------------------------------------------------------------------------------------- measuring
def palette_masks(image) -> dict[str, np.ndarray]:
    """Per colour word: the pixels equal to clip(colour + n) within TOL on every channel, for one grey
    offset |n| <= NOISE (per channel the offsets that fit form an interval; the pixel fits when the
    three intervals meet)."""
    v = np.asarray(image, np.float64)
    lo, hi = v - TOL, v + TOL
    out = {}
    for name, rgb in PALETTE.items():
        c = np.array(rgb, np.float64)
        a = np.where(lo <= 0, -np.inf, np.where(lo > 255, np.inf, lo - c)).max(-1)
        b = np.where(hi >= 255, np.inf, np.where(hi < 0, -np.inf, hi - c)).min(-1)
        fits = np.maximum(a, -NOISE) <= np.minimum(b, NOISE)
        # drop stray pixels (an outline pixel that the noise brought near the colour): keep those with
        # at least two of their four neighbours in the mask
        out[name] = fits & (ndi.convolve(fits.astype(np.uint8), CROSS, mode="constant") >= 2)
    return out


@dataclass(eq=False)  # compared by identity
class Blob:
    colour: str
    mask: np.ndarray = field(repr=False)  # (SIZE, SIZE) bool, holes filled
    area: int = 0
    x: float = 0.0  # centroid, fraction of the side
    y: float = 0.0
    shape: str | None = None  # None: not measurable (the object touches another one)
    r: float | None = None  # radius estimated from the area (fraction of the side); None as for shape
    touching: bool = False


def classify(fill: float, solidity: float, flip: float) -> str:
    """The shape from the fill of the bounding box, the solidity (area / convex hull area) and the
    overlap of the shape with itself turned upside down (IoU). Ranges measured on 400 clean renders:
    star .39-.48 / .56-.64 / .43-.50, triangle .52-.62 / .90-.94 / .35-.43, cross .47-.54 / .64-.70 /
    .87-1, circle .77-.83 / .95-.97 / .94-1, square .93-1 / .97-1 / .93-1."""
    if flip < 0.7:  # a point at the top
        return "star" if solidity < 0.77 else "triangle"
    if solidity < 0.82:
        return "cross"
    return "circle" if fill < 0.88 else "square"


def _measure(colour: str, mask: np.ndarray, touching: bool = False) -> Blob:
    yy, xx = np.nonzero(mask)
    b = Blob(colour, mask, int(mask.sum()), (xx.mean() + 0.5) / mask.shape[1], (yy.mean() + 0.5) / mask.shape[0],
             touching=touching)
    if not touching:
        crop = mask[yy.min():yy.max() + 1, xx.min():xx.max() + 1]
        rows = np.unique(yy)
        lo, hi = ndi.minimum(xx, yy, rows), ndi.maximum(xx, yy, rows)
        corners = np.concatenate([np.stack([lo, rows], 1), np.stack([lo, rows + 1], 1),
                                  np.stack([hi + 1, rows], 1), np.stack([hi + 1, rows + 1], 1)])
        flip = (crop & crop[::-1]).sum() / (crop | crop[::-1]).sum()
        b.shape = classify(b.area / crop.size, b.area / ConvexHull(corners).volume, flip)
        a, c = RADIUS_FIT[b.shape]
        b.r = (a * math.sqrt(b.area) + c) / mask.shape[1]
    return b


def _grow(mask: np.ndarray, px: int) -> np.ndarray:
    return ndi.binary_dilation(mask, iterations=px)


def blobs(image) -> list[Blob]:
    """The objects in ``image``: the object-sized components of every palette colour, holes filled.

    An object drawn over another one (a star inside a square) is surrounded by the lower one's colour
    (most of a ring just outside its outline); the lower one is then the union of its pieces (the upper
    one's points can cut its fill) with the upper one's place. Objects that touch another one in any
    other way (they overlap) keep their colour, count and position, but their shape and size are not
    measured."""
    pieces = []
    for name, m in palette_masks(image).items():
        lab, n = ndi.label(m)
        pieces += [(name, comp) for comp in (ndi.binary_fill_holes(lab == j) for j in range(1, n + 1))
                   if comp.sum() >= MIN_AREA]
    inner_of: dict[int, int] = {}  # piece -> the piece it lies on
    merged: dict[int, np.ndarray] = {}
    for i, (name, s) in enumerate(pieces):
        ring = _grow(s, 4) & ~_grow(s, 2)
        for c in PALETTE:
            under = [j for j, (nm, p) in enumerate(pieces) if nm == c and c != name and (p & ring).any()]
            if under and (ring & np.any([pieces[j][1] for j in under], 0)).sum() >= 0.6 * ring.sum():
                base = under[0]
                merged[base] = ndi.binary_fill_holes(np.any([pieces[j][1] for j in under], 0) | _grow(s, 3))
                for j in under[1:]:
                    merged[j] = None  # merged into base
                inner_of[i] = base
    objects = []  # (colour, mask, index)
    for j, (name, p) in enumerate(pieces):
        if j in merged and merged[j] is None:
            continue
        objects.append((name, merged.get(j, p), j))
    out = []
    for name, mask, j in objects:
        near = [k for _, other, k in objects if k != j and (_grow(mask, 4) & other).any()]
        touching = any(inner_of.get(j) != k and inner_of.get(k) != j for k in near)
        out.append(_measure(name, mask, touching))
    return out


def value_near(m: np.ndarray, x: float, y: float, px: int = 1) -> float:
    """The map's largest value within ``px`` pixels of (x, y)."""
    n = m.shape[0]
    i, j = min(n - 1, int(y * n)), min(n - 1, int(x * n))
    return float(m[max(0, i - px):i + px + 1, max(0, j - px):j + px + 1].max())


# ----------------------------------------------------------------------------------------------- the prompt
@dataclass
class PromptGroup:
    count: int
    size: str | None
    colour: str
    shape: str
    words: dict[str, int]  # role (count/size/colour/noun) -> word index


def parse_prompt(words: list[str]) -> tuple[list[PromptGroup], tuple[str, list[int]] | None]:
    """Groups ("two big red circles") and the relation (name, word indices) of a synth prompt."""
    groups, relation, i = [], None, 0
    two_word = {tuple(r.split()): r for r in RELATIONS}
    while i < len(words):
        w = words[i]
        if w in COUNTS and i + 2 < len(words) and (words[i + 1] in SIZE_WORDS or words[i + 1] in PALETTE):
            idx, j = {"count": i}, i + 1
            size = None
            if words[j] in SIZE_WORDS:
                size, idx["size"], j = words[j], j, j + 1
            idx["colour"], idx["noun"] = j, j + 1
            groups.append(PromptGroup(COUNTS[w], size, words[j], NOUNS[words[j + 1]], idx))
            i = j + 2
            continue
        if tuple(words[i:i + 2]) in two_word:
            relation, i = (two_word[tuple(words[i:i + 2])], [i, i + 1]), i + 2
            continue
        if w in RELATIONS:
            relation = (w, [i])
        i += 1
    return groups, relation


def relation_holds(name: str, subject: list[Blob], reference: list[Blob]) -> bool:
    """Whether the drawn groups satisfy the relation ``subject <name> reference``."""
    if name == "left of":
        return max(b.x for b in subject) < min(b.x for b in reference)
    if name == "right of":
        return min(b.x for b in subject) > max(b.x for b in reference)
    if name == "above":
        return max(b.y for b in subject) < min(b.y for b in reference)
    if name == "below":
        return min(b.y for b in subject) > max(b.y for b in reference)
    (s,), (r,) = subject, reference  # one object each
    if name == "next to":  # side by side in a row, a small gap between the outlines (at most 0.07 of the side)
        gap = math.hypot(s.x - r.x, s.y - r.y) - synth.BOUND * (s.r + r.r)
        return abs(s.y - r.y) < 0.07 and gap < 0.11
    assert name == "inside"
    return bool(r.mask[min(SIZE - 1, int(s.y * SIZE)), min(SIZE - 1, int(s.x * SIZE))]) and s.area < r.area


KINDS = {frozenset(): "none", frozenset({"colour"}): "colour", frozenset({"noun"}): "shape",
         frozenset({"count"}): "count", frozenset({"size"}): "size"}


def _claims(g: PromptGroup, kind: str, b: Blob) -> bool:
    """Whether object ``b`` can be one of group ``g``'s, drawn as ``kind`` says."""
    shape_is = b.shape is None or b.shape == g.shape
    if kind == "colour":
        return b.colour != g.colour and shape_is
    if kind == "shape":
        return b.colour == g.colour and (b.shape is None or b.shape != g.shape)
    return kind != "missing" and b.colour == g.colour and shape_is


def check_alignment(rec) -> dict[str, int] | None:
    """Check a record's tags and misalignment map against its image (see the module docstring);
    returns how many groups of each claimed kind were checked, or None when the picture cannot
    be read unambiguously (an object that could be either of two groups')."""
    words, flags = parse_tagged(rec.tagged_prompt)
    groups, relation = parse_prompt(words)
    assert groups, rec.prompt
    found = blobs(rec.image)
    m = rec.misalignment_map
    group_kinds = []
    for gi, g in enumerate(groups):
        tagged = {role for role, k in g.words.items() if flags[k]}
        if tagged and tagged == set(g.words):
            group_kinds.append("missing")
        else:
            assert frozenset(tagged) in KINDS, f"{rec.uid} group {gi} ({g}): tagged {sorted(tagged)}: not one kind"
            group_kinds.append(KINDS[frozenset(tagged)])
    owners = [[gi for gi, g in enumerate(groups) if _claims(g, group_kinds[gi], b)] for b in found]
    if any(len(o) > 1 for o in owners):
        return None
    unexplained = [b for b, o in zip(found, owners) if not o]
    assert not unexplained, (rec.uid, rec.tagged_prompt, "objects nobody asked for", unexplained)
    members = [[b for b, o in zip(found, owners) if o == [gi]] for gi in range(len(groups))]
    kinds: dict[str, int] = {}
    wrong: list[Blob] = []  # objects the map must mark
    right: list[Blob] = []  # objects drawn as asked (the map must leave them alone)
    missing = 0
    for gi, (g, kind, mine) in enumerate(zip(groups, group_kinds, members)):
        what = (rec.uid, rec.tagged_prompt, gi, kind, mine)
        measured = [b for b in mine if b.shape is not None]
        if kind == "missing":  # nothing of the kind is drawn
            missing += g.count
        elif kind == "count":
            assert mine and len(mine) != g.count, what  # the picture shows another number
        else:  # colour, shape, size, none: the number asked
            assert len(mine) == g.count, what
        if kind in ("shape", "size") and not measured:
            return None  # every object of the group overlaps another one: shape and size cannot be read
        lo, hi = RADIUS[g.size]
        if kind in ("none", "count", "colour", "shape"):
            assert all(lo <= b.r <= hi for b in measured), what  # drawn at the size its word (or no word) asks
        if kind == "size":
            lo, hi = RADIUS["big" if g.size == "small" else "small"]
            assert measured and all(lo <= b.r <= hi for b in measured), what
        kinds[kind] = kinds.get(kind, 0) + 1
        (right if kind == "none" else wrong).extend(mine)
    if relation is not None:
        name, idx = relation
        rel_tagged = [flags[k] for k in idx]
        assert all(rel_tagged) or not any(rel_tagged), rec.tagged_prompt  # the relation is tagged as a whole
        if members[0] and members[1]:
            holds = relation_holds(name, members[0], members[1])
            assert holds != rel_tagged[0], (rec.uid, rec.tagged_prompt, members[0], members[1])
            if rel_tagged[0]:
                kinds["place"] = kinds.get("place", 0) + 1
                wrong.extend(members[0])  # the map marks the relation's subject
                right = [b for b in right if b not in members[0]]
    # a missing object that belongs inside a container is marked over the container
    beneath: list[Blob] = members[1] if relation and relation[0] == "inside" and group_kinds[0] == "missing" else []
    # the raters' disks around a wrong object reach at most 0.15 from its centre (a container around a
    # wrong object is under them)
    right = [b for b in right if b not in beneath and all(math.hypot(b.x - w.x, b.y - w.y) > 0.16 for w in wrong)]
    # the misalignment map
    if not any(flags):
        assert m.max() == 0, rec.uid
        return kinds
    for b in wrong:
        assert value_near(m, b.x, b.y) > 0.5, (rec.uid, "wrong object not marked", b)
    for b in right:
        assert value_near(m, b.x, b.y, px=0) < 0.5, (rec.uid, "object drawn as asked is marked", b)
    # every marked region holds a wrong object, or is empty background where a missing object belongs
    regions, n = ndi.label(m > 0)
    any_palette = np.any(list(palette_masks(rec.image).values()), axis=0) & ~np.any([b.mask for b in beneath] or
                                                                                    [np.zeros_like(m, bool)], axis=0)
    empty = 0
    for j in range(1, n + 1):
        region = regions == j
        if any(region[min(SIZE - 1, int(b.y * SIZE)), min(SIZE - 1, int(b.x * SIZE))] for b in wrong):
            continue
        core = region & (m >= 0.99)  # where all three raters agree
        assert missing and core.any(), (rec.uid, "a marked region with no wrong object")
        assert any_palette[core].mean() < 0.05, (rec.uid, "a missing object's region shows an object")
        empty += 1
    assert (empty > 0) == (missing > 0) and empty <= missing, (rec.uid, empty, missing)
    return kinds


# ----------------------------------------------------------------------------------------------- records
@contextlib.contextmanager
def forced(errors: dict[int, str], place: bool, artifacts: bool = False):
    """Render with the given errors (and, unless ``artifacts``, none of the random artifacts)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "_sample_errors", lambda spec, rng, easy=False: (dict(errors), place))
        if not artifacts:
            mp.setattr(synth, "_draw_artifacts", lambda cv, scene, rng: [])
        yield


def distinct(spec) -> bool:
    return (len({g.colour for g in spec.groups}) == len(spec.groups)
            and len({g.shape for g in spec.groups}) == len(spec.groups))


def specs_for(kind: str, n: int, relation: str | None = None):
    """The first ``n`` prompts (a fixed sequence) whose groups differ in colour and shape and where
    ``kind`` can happen, with the group it happens to."""
    out = []
    for i in range(2000):
        spec = synth.sample_prompt(np.random.default_rng([2024, i]))
        if not distinct(spec) or (relation and spec.relation != relation):
            continue
        if kind == "place":
            if spec.relation:
                out.append((spec, -1, i))
        elif kind == "none":
            out.append((spec, None, i))
        else:
            gis = [gi for gi in range(len(spec.groups)) if kind in synth._allowed_errors(spec, gi)]
            if gis:
                out.append((spec, gis[i % len(gis)], i))
        if len(out) == n:
            return out
    raise AssertionError(f"no prompt allows {kind}")


def render(spec, gi, seed, kind):
    errors = {} if kind in ("none", "place") else {gi: kind}
    with forced(errors, kind == "place"):
        return synth.record_from_spec(spec, np.random.default_rng([77, seed]), f"{kind}-{seed}", SIZE)


@pytest.mark.parametrize("kind", ["none", "colour", "shape", "count", "size", "missing"])
def test_group_errors_agree_with_the_pixels(kind):
    measured = 0
    for spec, gi, seed in specs_for(kind, 10):
        rec = render(spec, gi, seed, kind)
        assert rec.scene.errors == ({} if kind == "none" else {gi: kind})  # the forcing took
        kinds = check_alignment(rec)
        if kinds is None:
            continue  # an object that could belong to two groups
        assert kinds.get(kind, 0) == (1 if kind != "none" else len(spec.groups)), (rec.tagged_prompt, kinds)
        measured += 1
        if measured == 4:
            return
    raise AssertionError(f"only {measured} of 10 records could be measured")


@pytest.mark.parametrize("relation", RELATIONS)
def test_place_errors_agree_with_the_pixels(relation):
    for place in (False, True):
        measured = 0
        for spec, _, seed in specs_for("place", 5, relation):
            rec = render(spec, -1, seed, "place" if place else "none")
            kinds = check_alignment(rec)
            if kinds is None:
                continue
            assert kinds.get("place", 0) == place, (rec.tagged_prompt, kinds)
            measured += 1
            if measured == 2:
                break
        assert measured == 2, (relation, place)


def test_natural_records_agree_with_the_pixels():
    """Unforced records (errors as the generator samples them, up to two per record) of a fixed split,
    without artifacts (they deform objects)."""
    kinds: dict[str, int] = {}
    measured = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "_draw_artifacts", lambda cv, scene, rng: [])
        for i in range(60):
            rec = synth.make_record(5, "train", i, SIZE)
            groups, _ = parse_prompt(parse_tagged(rec.tagged_prompt)[0])
            if len({g.colour for g in groups}) < len(groups) or len({g.shape for g in groups}) < len(groups):
                continue  # objects of two groups could not be told apart
            found = check_alignment(rec)
            for k, v in (found or {}).items():
                kinds[k] = kinds.get(k, 0) + v
            measured += found is not None
    assert measured >= 25 and len(kinds) >= 4, (measured, kinds)


# ----------------------------------------------------------------------------------------------- artifacts
@contextlib.contextmanager
def canvases(kind: str | None = None):
    """Keep the canvas just before and just after the artifacts are drawn (rendering is unchanged);
    with ``kind``, every artifact drawn is of that kind."""
    shots: list[tuple] = []
    real = synth._draw_artifacts

    def spy(cv, scene, rng):
        before = np.asarray(cv.img, np.int16).copy()
        arts = real(cv, scene, rng)
        shots.append((before, np.asarray(cv.img, np.int16).copy()))
        return arts

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "_draw_artifacts", spy)
        if kind is not None:
            mp.setattr(synth, "ARTIFACT_KINDS", (kind,))
        yield shots


def changed_pixels(before: np.ndarray, after: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: image pixels whose canvas area changed by more than TOL on some channel."""
    d = np.abs(after - before).max(-1) > TOL
    f = d.shape[0] // size
    d = d.reshape(size, f, size, f).any(axis=(1, 3))
    lab, n = ndi.label(d)
    keep = np.isin(lab, [j for j in range(1, n + 1) if (lab == j).sum() >= 4])  # not a lone anti-aliased pixel
    return keep


def canvas_image(canvas: np.ndarray) -> Image.Image:
    """The canvas downsampled to the image size as the generator does (box filter), before the noise."""
    return Image.fromarray(canvas.astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BOX)


def check_artifacts(rec, before: np.ndarray, after: np.ndarray) -> None:
    """The implausibility map against the pixels the artifacts changed."""
    m = rec.implausibility_map
    # the picture is the canvas after the artifacts, downsampled, plus grey noise
    img = np.asarray(rec.image, np.float64)
    canvas = np.asarray(canvas_image(after), np.float64)
    resid = img - canvas
    unclipped = ((img > 0) & (img < 255)).all(-1)
    assert (resid.max(-1) - resid.min(-1))[unclipped].max() <= 2, rec.uid
    changed = changed_pixels(before, after, SIZE)
    if not changed.any():
        assert m.max() == 0, (rec.uid, "marked, but no pixel changed")
        return
    assert m.max() > 0, (rec.uid, "pixels changed, but nothing is marked")
    marked = m > 0
    # the changes on and around one object are one region (a smear also fills the concave corners of its
    # object on the far side, across the object's own unchanged fill)
    objects, k = ndi.label(np.any(list(palette_masks(canvas_image(before)).values()), axis=0))
    touched = np.isin(objects, np.unique(objects[_grow(changed, 3)])) & (objects > 0)
    regions, n = ndi.label(_grow(changed, 3) | touched)
    for j in range(1, n + 1):  # every changed region is marked ...
        region = regions == j
        if (region & changed).sum() >= 20:
            assert (region & marked).any(), (rec.uid, "a changed region is not marked", int(region.sum()))
    near_change = _grow(changed, 3)
    regions, n = ndi.label(marked)
    for j in range(1, n + 1):  # ... and every marked region covers changed pixels
        assert (near_change & (regions == j)).any(), (rec.uid, "a marked region where no pixel changed")
    # where all three raters agree, the picture changed nearby
    assert near_change[m >= 0.99].mean() > 0.5, rec.uid


@pytest.mark.parametrize("kind", synth.ARTIFACT_KINDS)
def test_each_artifact_kind_is_marked_where_the_pixels_changed(kind):
    seen = 0
    for i in range(40):
        with canvases(kind) as shots:
            rec = synth.make_record(3, "train", i, SIZE)
        kinds = {a.kind for a in rec.scene.artifacts}
        if kind not in kinds:
            continue  # no artifact on this record (or no object left to put it on)
        check_artifacts(rec, *shots[-1])
        seen += 1
        if seen == 3:
            return
    raise AssertionError(f"only {seen} records with a {kind} artifact")


def test_records_without_artifacts_are_unmarked_and_unchanged():
    clean = with_artifacts = 0
    for i in range(16):
        with canvases() as shots:
            rec = synth.make_record(4, "dev", i, SIZE)
        before, after = shots[-1]
        check_artifacts(rec, before, after)
        if rec.scene.artifacts:
            with_artifacts += 1
        else:
            assert np.array_equal(before, after) and rec.implausibility_map.max() == 0, rec.uid
            clean += 1
    assert clean >= 3 and with_artifacts >= 3, (clean, with_artifacts)
