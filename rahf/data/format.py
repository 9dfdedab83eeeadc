"""The package's on-disk dataset format, shared by the synth generator and the RichHF-18K converter.

Layout of one dataset directory ``ROOT``::

    ROOT/dataset.json                    {"format": "rahf-dataset", "version": 1, "source": ..., "splits": {...}}
    ROOT/<split>/manifest.jsonl          one JSON object per line (one per record), UTF-8
    ROOT/<split>/images/<uid>.<ext>      the image, original bytes (png, jpg, webp, ...)
    ROOT/<split>/implausibility/<uid>.png  8-bit grayscale PNG, pixel = round(255 * value)
    ROOT/<split>/misalignment/<uid>.png    same for the misalignment heatmap

A manifest line::

    {"uid": "000123", "prompt": "a yellow cat on a red mat",
     "tagged_prompt": "a yellow_0 cat on a red mat",
     "scores": {"plausibility": 0.8, "alignment": 0.4, "aesthetics": 0.6, "overall": 0.5},
     "image": "images/000123.png",
     "implausibility_map": "implausibility/000123.png",
     "misalignment_map": "misalignment/000123.png"}

Paths are relative to the split directory. ``prompt`` is the clean words joined by single spaces
(see :func:`split_words`); ``tagged_prompt`` has ``_0`` appended to each misaligned word.
All four scores are in [0, 1], higher is better.

What a record must satisfy (checked when a split is opened: the manifest fields; when a record is
loaded: the files). A violation raises :class:`DataError` naming the record and the problem, or,
with ``on_bad_record="skip"``, drops the record and lists it (``RAHFDatasetSplit.bad`` for
manifest-level problems; the torch dataset's skip markers for file-level ones):

* the line is UTF-8 JSON object with every field; uid non-empty and unique in the split;
* prompt non-empty and at most :data:`MAX_PROMPT_CHARS` characters; tagged_prompt's words = prompt's;
* four finite scores in [0, 1];
* the image decodes, is at least :data:`MIN_IMAGE_SIDE` px on each side and at most
  ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (bigger: a "decompression bomb", refused before decoding).
  Any mode PIL can convert is accepted and converted to RGB (RGBA: alpha dropped; CMYK, grayscale,
  palette: converted);
* both heatmaps decode, are 2-D single-channel 8-bit ('L') images of the same size, and, when
  ``dataset.json`` declares an integer ``heatmap_size``, are that size. (The model's own heatmap size
  only decides how maps are resized for training; any map size is fine for that.)
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from ..schema import (BAD_RECORD_POLICIES, MAP_NAMES, MAX_PROMPT_CHARS, MIN_IMAGE_SIDE, SCORE_NAMES, SPLITS, TAG,  # noqa: F401
                      DataError, clean_prompt, load_image, load_map, parse_tagged, split_words, tag_words)

FORMAT_NAME = "rahf-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.jsonl"


def map_to_png_bytes(heatmap: np.ndarray) -> bytes:
    """Encode a float map in [0, 1] (H, W) as an 8-bit grayscale PNG (value * 255, rounded)."""
    arr = np.asarray(heatmap, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("heatmap has NaN or inf values")
    u8 = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Example:
    """One loaded record."""

    uid: str
    prompt: str
    tagged_prompt: str
    scores: dict[str, float]
    image: Image.Image
    implausibility_map: np.ndarray
    misalignment_map: np.ndarray

    @property
    def words(self) -> list[str]:
        return self.prompt.split()

    @property
    def misaligned(self) -> list[bool]:
        return parse_tagged(self.tagged_prompt)[1]


def check_entry(entry: Mapping, where: str = "manifest") -> None:
    """Check one manifest entry's fields (types, finite scores in [0, 1], tags matching the prompt)."""
    uid = entry.get("uid") if isinstance(entry, Mapping) else None
    if not isinstance(entry, Mapping):
        raise DataError(None, "manifest line is not a JSON object", where)
    for key in ("uid", "prompt", "tagged_prompt", "scores", "image", "implausibility_map", "misalignment_map"):
        if key not in entry:
            raise DataError(uid, f"missing field {key!r}", where)
    if not isinstance(uid, str) or not uid:
        raise DataError(None, f"bad uid {uid!r}", where)
    for key in ("prompt", "tagged_prompt", "image", "implausibility_map", "misalignment_map"):
        if not isinstance(entry[key], str):
            raise DataError(uid, f"field {key!r} must be a string", where)
    if not entry["prompt"].strip():
        raise DataError(uid, "empty prompt", where)
    if len(entry["prompt"]) > MAX_PROMPT_CHARS:
        raise DataError(uid, f"prompt has {len(entry['prompt']):,} characters, more than the limit of "
                             f"{MAX_PROMPT_CHARS:,}", where)
    words, _ = parse_tagged(entry["tagged_prompt"])
    if words != entry["prompt"].split():
        raise DataError(uid, "tagged_prompt words do not match prompt words", where)
    scores = entry["scores"]
    if not isinstance(scores, Mapping):
        raise DataError(uid, "scores must be an object", where)
    for name in SCORE_NAMES:
        if name not in scores:
            raise DataError(uid, f"missing score {name!r}", where)
        v = scores[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(uid, f"score {name!r} is not a finite number: {v!r}", where)
        if not 0.0 <= v <= 1.0:
            raise DataError(uid, f"score {name!r} = {v} is outside [0, 1]", where)


def iter_manifest(split_dir: str | os.PathLike, bad: list | None = None) -> Iterator[tuple[int, object]]:
    """Yield ``(line number, parsed JSON value)`` for each non-blank line of ``manifest.jsonl``.

    A line that is not UTF-8 or not JSON raises :class:`DataError` naming the file and line, or, if
    ``bad`` is a list, is appended to it as a :class:`DataError` and left out."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise DataError(None, "manifest.jsonl not found", str(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                entry = json.loads(line)
            except UnicodeDecodeError as e:
                err = DataError(None, f"line is not valid UTF-8 ({e.reason} at byte {e.start})", where)
            except json.JSONDecodeError as e:
                err = DataError(None, f"line is not valid JSON ({e.msg}, column {e.colno})", where)
            else:
                yield lineno, entry
                continue
            if bad is None:
                raise err from None
            bad.append(err)


def read_manifest(split_dir: str | os.PathLike, bad: list | None = None) -> list[dict]:
    """Parse ``manifest.jsonl`` (see :func:`iter_manifest`); each object gets its line number as ``_line``."""
    entries = []
    for lineno, entry in iter_manifest(split_dir, bad):
        if isinstance(entry, dict):
            entry["_line"] = lineno
        entries.append(entry)
    return entries


class RAHFDatasetSplit(Sequence):
    """A split of a dataset on disk; ``ds[i]`` loads and returns an :class:`Example`.

    ``on_bad_record="error"``: the first bad manifest line raises :class:`DataError` (naming the file,
    line and problem). ``"skip"``: bad lines (not UTF-8, not JSON, failing :func:`check_entry`, a
    repeated uid: the later line) are left out and listed in ``self.bad`` (DataErrors); ``self.total``
    counts every record line, kept or not. Loading a record (``ds[i]``) raises DataError on bad files
    either way; :class:`rahf.data.torch_data.RAHFTorchDataset` turns that into a skip marker."""

    def __init__(self, root: str | os.PathLike, split: str, check: bool = True, on_bad_record: str = "error"):
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
        self.root = Path(root)
        self.split = split
        self.dir = self.root / split
        self.on_bad_record = on_bad_record
        if not self.dir.is_dir():
            raise FileNotFoundError(f"no split {split!r} under {self.root} (expected directory {self.dir})")
        skip = on_bad_record == "skip"
        self.bad: list[DataError] = []
        self.entries = read_manifest(self.dir, self.bad if skip else None)
        if check:
            seen: dict[str, object] = {}
            kept = []
            for e in self.entries:
                line = e.get("_line", "?") if isinstance(e, dict) else "?"
                where = f"{self.dir / MANIFEST}:{line}"
                try:
                    check_entry(e, where)
                    if e["uid"] in seen:
                        raise DataError(e["uid"], f"duplicate uid (first on line {seen[e['uid']]})", where)
                except DataError as err:
                    if not skip:
                        raise
                    self.bad.append(err)
                    continue
                seen[e["uid"]] = line
                kept.append(e)
            self.entries = kept
        self.total = len(self.entries) + len(self.bad)
        try:
            hs = read_dataset_info(self.root).get("heatmap_size")
        except (OSError, ValueError, AttributeError):  # an unreadable dataset.json declares nothing
            hs = None
        self.heatmap_size = hs if isinstance(hs, int) and not isinstance(hs, bool) else None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def uids(self) -> list[str]:
        return [e["uid"] for e in self.entries]

    def path(self, i: int, key: str) -> Path:
        return self.dir / self.entries[i][key]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        e = self.entries[i]
        uid = e["uid"]
        paths = {}
        for key in ("image", "implausibility_map", "misalignment_map"):
            rel = Path(e[key])
            if rel.is_absolute() or ".." in rel.parts:
                raise DataError(uid, f"path {e[key]!r} leaves the split directory")
            paths[key] = self.dir / rel
        amap = load_map(paths["implausibility_map"], uid)
        mmap = load_map(paths["misalignment_map"], uid)
        if amap.shape != mmap.shape:
            raise DataError(uid, f"heatmaps differ in size: implausibility {amap.shape[1]}×{amap.shape[0]}, "
                                 f"misalignment {mmap.shape[1]}×{mmap.shape[0]}")
        if self.heatmap_size is not None and amap.shape != (self.heatmap_size, self.heatmap_size):
            raise DataError(uid, f"heatmaps are {amap.shape[1]}×{amap.shape[0]}; dataset.json declares "
                                 f"heatmap_size {self.heatmap_size}")
        return Example(
            uid=uid,
            prompt=e["prompt"],
            tagged_prompt=e["tagged_prompt"],
            scores={k: float(e["scores"][k]) for k in SCORE_NAMES},
            image=load_image(paths["image"], uid, min_side=MIN_IMAGE_SIDE),
            implausibility_map=amap,
            misalignment_map=mmap,
        )

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]


def open_dataset(root: str | os.PathLike, split: str = "train", check: bool = True,
                 on_bad_record: str = "error") -> RAHFDatasetSplit:
    """Open one split of a dataset in the package's format (see module docstring and
    :class:`RAHFDatasetSplit` for ``on_bad_record``)."""
    return RAHFDatasetSplit(root, split, check=check, on_bad_record=on_bad_record)


def read_dataset_info(root: str | os.PathLike) -> dict:
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def write_dataset_info(root: str | os.PathLike, **info) -> None:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **info}
    tmp = root / "dataset.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / "dataset.json")


@dataclass
class SplitWriter:
    """Writes one split: files first, then the manifest line. Use as a context manager.

    ``add`` takes the image as a PIL image (saved as PNG) or as ``(bytes, ext)`` (original bytes kept),
    and heatmaps as float arrays in [0, 1] or as already-encoded 8-bit PNG bytes.
    The manifest is written to a temporary file and renamed into place on ``close``.
    """

    root: str | os.PathLike
    split: str
    append: bool = False
    _f: object = field(default=None, init=False, repr=False)
    count: int = field(default=0, init=False)

    def __post_init__(self):
        self.dir = Path(self.root) / self.split
        for sub in ("images",) + MAP_NAMES:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._tmp = self.dir / (MANIFEST + ".tmp")
        self._f = open(self._tmp, "w", encoding="utf-8")
        if self.append and (self.dir / MANIFEST).is_file():
            for e in read_manifest(self.dir):
                e.pop("_line", None)
                self._f.write(json.dumps(e, ensure_ascii=False) + "\n")
                self.count += 1

    def add(self, uid: str, prompt: str, tagged_prompt: str, scores: Mapping[str, float], image,
            implausibility_map, misalignment_map) -> dict:
        if isinstance(image, Image.Image):
            img_rel = f"images/{uid}.png"
            image.save(self.dir / img_rel, format="PNG")
        else:
            data, ext = image
            img_rel = f"images/{uid}.{ext.lstrip('.').lower()}"
            (self.dir / img_rel).write_bytes(data)
        rels = {}
        for name, m in zip(MAP_NAMES, (implausibility_map, misalignment_map)):
            rel = f"{name}/{uid}.png"
            (self.dir / rel).write_bytes(m if isinstance(m, (bytes, bytearray)) else map_to_png_bytes(m))
            rels[name] = rel
        entry = {
            "uid": uid,
            "prompt": prompt,
            "tagged_prompt": tagged_prompt,
            "scores": {k: float(scores[k]) for k in SCORE_NAMES},
            "image": img_rel,
            "implausibility_map": rels["implausibility"],
            "misalignment_map": rels["misalignment"],
        }
        self._f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1
        return entry

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            os.replace(self._tmp, self.dir / MANIFEST)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        elif self._f is not None:
            self._f.close()
            self._f = None
