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
(see :func:`split_words`); ``tagged_prompt`` has ``_0`` appended to each misaligned word. An
optional ``prompt_raw`` keeps the caption as written (punctuation, spacing) when it differs from
``prompt``, e.g. ``"A yellow cat, on a red mat!"``: the model's text encoder can read it
(``model.text.encoder_prompt: original``) while the labels stay aligned to ``prompt``'s words.
All four scores are in [0, 1], higher is better. ``dataset.json`` may declare ``heatmap_size`` (a
positive integer: every heatmap of the dataset is that many pixels square).

What a record must satisfy. The dataset loader (:class:`RAHFDatasetSplit`) and the validator
(:mod:`rahf.data.validate`) apply the same functions: :func:`check_entry` to the manifest line (when a
split is opened), :func:`load_record_files` to the files (when a record is loaded), which applies
:func:`rahf.schema.load_image`, :func:`rahf.schema.load_map` and :func:`check_heatmaps`. So a dataset
the validator passes loads, and a record that fails to load is one the validator lists. A violation
raises :class:`DataError` naming the record and the problem, or, with ``on_bad_record="skip"``, drops
the record and lists it (``RAHFDatasetSplit.bad`` for manifest-level problems; the torch dataset's skip
markers for file-level ones):

* the line is a UTF-8 JSON object with every field (:data:`FIELDS`); uid non-empty and unique in the
  split;
* prompt non-empty and at most :data:`MAX_PROMPT_CHARS` characters; tagged_prompt's words = prompt's;
  ``prompt_raw``, when present, a string of at most :data:`MAX_PROMPT_CHARS` characters whose clean
  form (:func:`clean_prompt`) is ``prompt``;
* four finite scores in [0, 1];
* file paths are non-empty, relative and stay inside the split directory;
* the image decodes, is at least :data:`MIN_IMAGE_SIDE` px on each side and at most
  ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (bigger: a "decompression bomb", refused before decoding).
  Any format and any mode PIL can convert is accepted and converted to RGB (RGBA: alpha dropped;
  CMYK, grayscale, palette: converted);
* each heatmap is an **8-bit grayscale PNG**: PNG format (a grayscale JPEG, TIFF or BMP is an error:
  maps must be lossless), 2-D single-channel 8-bit mode 'L' (RGB, 16-bit, palette, 1-bit maps are
  errors), not a decompression bomb; value = pixel / 255;
* both heatmaps of a record have the same size and, when ``dataset.json`` declares ``heatmap_size``,
  are that size (a ``dataset.json`` that does not parse, or declares anything but a positive integer,
  is an error when the split is opened). Otherwise any map size is fine: the model's own heatmap size
  only decides how maps are resized for training.
"""

from __future__ import annotations

import io
import json
import math
import os
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
FILE_FIELDS: tuple[str, ...] = ("image",) + tuple(f"{m}_map" for m in MAP_NAMES)
"""Manifest fields naming a record's files, relative to the split directory."""
FIELDS: tuple[str, ...] = ("uid", "prompt", "tagged_prompt", "scores") + FILE_FIELDS
"""Every required field of a manifest line."""
OPTIONAL_FIELDS: tuple[str, ...] = ("prompt_raw",)
"""Fields a manifest line may have: ``prompt_raw``, the caption as written (see the module docstring)."""
ENCODER_PROMPTS: tuple[str, ...] = ("clean", "original")
"""What the text encoder reads: the clean ``prompt``, or the ``original`` caption (``prompt_raw`` where
a record has one, else ``prompt``)."""


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
    prompt_raw: str | None = None  # the caption as written, when the manifest keeps it

    def encoder_prompt(self, mode: str = "clean") -> str:
        """The text the encoder reads (see :data:`ENCODER_PROMPTS`)."""
        return encoder_prompt(self.prompt, self.prompt_raw, mode)

    @property
    def words(self) -> list[str]:
        return self.prompt.split()

    @property
    def misaligned(self) -> list[bool]:
        return parse_tagged(self.tagged_prompt)[1]


def encoder_prompt(prompt: str, prompt_raw: str | None, mode: str = "clean") -> str:
    """``prompt_raw`` for ``mode="original"`` when there is one, else ``prompt`` (:data:`ENCODER_PROMPTS`)."""
    if mode not in ENCODER_PROMPTS:
        raise ValueError(f"encoder prompt must be one of {ENCODER_PROMPTS}, got {mode!r}")
    return prompt_raw if mode == "original" and prompt_raw else prompt


def check_entry(entry: Mapping, where: str = "manifest") -> None:
    """Check one manifest entry's fields (types, finite scores in [0, 1], tags matching the prompt)."""
    uid = entry.get("uid") if isinstance(entry, Mapping) else None
    if not isinstance(entry, Mapping):
        raise DataError(None, "manifest line is not a JSON object", where)
    for key in FIELDS:
        if key not in entry:
            raise DataError(uid, f"missing field {key!r}", where)
    if not isinstance(uid, str) or not uid:
        raise DataError(None, f"bad uid {uid!r}", where)
    for key in ("prompt", "tagged_prompt") + FILE_FIELDS:
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
    raw = entry.get("prompt_raw")
    if raw is not None:
        if not isinstance(raw, str):
            raise DataError(uid, "field 'prompt_raw' must be a string", where)
        if len(raw) > MAX_PROMPT_CHARS:
            raise DataError(uid, f"prompt_raw has {len(raw):,} characters, more than the limit of "
                                 f"{MAX_PROMPT_CHARS:,}", where)
        if clean_prompt(raw) != entry["prompt"]:
            raise DataError(uid, "prompt_raw's words do not match prompt (prompt must be clean_prompt(prompt_raw))",
                            where)
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


def record_path(split_dir: str | os.PathLike, entry: Mapping, key: str) -> Path:
    """The file a record's ``entry[key]`` names (one of :data:`FILE_FIELDS`); :class:`DataError` if the
    path is empty, absolute or leaves the split directory."""
    rel = entry.get(key)
    if not isinstance(rel, str) or not rel:
        raise DataError(entry.get("uid"), f"field {key!r} is not a non-empty path: {rel!r}")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(entry.get("uid"), f"path {rel!r} leaves the split directory")
    return Path(split_dir) / p


def check_heatmaps(uid: str | None, maps: Mapping[str, np.ndarray], heatmap_size: int | None = None) -> None:
    """A record's heatmaps (name -> (H, W) array) all have one size, and that size is
    ``heatmap_size`` × ``heatmap_size`` when it is given (dataset.json's declaration)."""
    sizes = {name: (m.shape[1], m.shape[0]) for name, m in maps.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(uid, "heatmaps differ in size: " + ", ".join(f"{n} {w}×{h}" for n, (w, h) in sizes.items()))
    if heatmap_size is not None:
        for w, h in sizes.values():
            if (w, h) != (heatmap_size, heatmap_size):
                raise DataError(uid, f"heatmaps are {w}×{h}; dataset.json declares heatmap_size {heatmap_size}")


def load_record_files(split_dir: str | os.PathLike, entry: Mapping, heatmap_size: int | None = None,
                      problems: list | None = None) -> tuple[Image.Image | None, dict[str, np.ndarray | None]]:
    """Load a record's image and heatmaps by the package's rules: :func:`record_path`, then
    :func:`~rahf.schema.load_image`, :func:`~rahf.schema.load_map` for each map and
    :func:`check_heatmaps` (see the module docstring). Returns ``(RGB image, {map name: array})``.

    ``problems=None``: the first problem raises :class:`DataError` (the loader). A list: every problem
    is appended to it as a DataError and the parts that failed are ``None`` (the validator)."""
    uid = entry.get("uid")

    def attempt(fn, *args):
        try:
            return fn(*args)
        except DataError as e:
            if problems is None:
                raise
            problems.append(e)
            return None

    image = attempt(lambda: load_image(record_path(split_dir, entry, "image"), uid))
    maps = {m: attempt(lambda m=m: load_map(record_path(split_dir, entry, f"{m}_map"), uid)) for m in MAP_NAMES}
    if all(v is not None for v in maps.values()):
        attempt(check_heatmaps, uid, maps, heatmap_size)
    return image, maps


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
        self.heatmap_size = declared_heatmap_size(self.root)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def uids(self) -> list[str]:
        return [e["uid"] for e in self.entries]

    def path(self, i: int, key: str) -> Path:
        """The file record ``i``'s field ``key`` names (see :func:`record_path`)."""
        return record_path(self.dir, self.entries[i], key)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        e = self.entries[i]
        image, maps = load_record_files(self.dir, e, self.heatmap_size)
        return Example(
            uid=e["uid"],
            prompt=e["prompt"],
            tagged_prompt=e["tagged_prompt"],
            scores={k: float(e["scores"][k]) for k in SCORE_NAMES},
            image=image,
            implausibility_map=maps["implausibility"],
            misalignment_map=maps["misalignment"],
            prompt_raw=e.get("prompt_raw"),
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
    """``ROOT/dataset.json`` as a dict (``{}`` when absent); raises ``ValueError`` if it does not parse."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def declared_heatmap_size(root: str | os.PathLike) -> int | None:
    """The ``heatmap_size`` ``ROOT/dataset.json`` declares (``None``: no file, no key, or null).

    :class:`DataError` naming dataset.json when the file does not parse, is not a JSON object, or
    declares anything but a positive integer."""
    where = str(Path(root) / "dataset.json")
    try:
        info = read_dataset_info(root)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(None, f"does not parse: {e}", where) from None
    if not isinstance(info, dict):
        raise DataError(None, "is not a JSON object", where)
    hs = info.get("heatmap_size")
    if hs is None:
        return None
    if isinstance(hs, bool) or not isinstance(hs, int) or hs < 1:
        raise DataError(None, f"heatmap_size must be a positive integer, got {hs!r}", where)
    return hs


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
            implausibility_map, misalignment_map, prompt_raw: str | None = None) -> dict:
        """Write one record; ``prompt_raw`` (the caption as written) is kept only when it differs from
        ``prompt``."""
        if isinstance(image, Image.Image):
            img_rel = f"images/{uid}.png"
            image.save(self.dir / img_rel, format="PNG")
        else:
            data, ext = image
            img_rel = f"images/{uid}.{ext.lstrip('.').lower()}"
            (self.dir / img_rel).write_bytes(data)
        entry = {
            "uid": uid,
            "prompt": prompt,
            **({"prompt_raw": prompt_raw} if prompt_raw is not None and prompt_raw != prompt else {}),
            "tagged_prompt": tagged_prompt,
            "scores": {k: float(scores[k]) for k in SCORE_NAMES},
            "image": img_rel,
        }
        for name, m in zip(MAP_NAMES, (implausibility_map, misalignment_map)):
            rel = f"{name}/{uid}.png"
            (self.dir / rel).write_bytes(m if isinstance(m, (bytes, bytearray)) else map_to_png_bytes(m))
            entry[f"{name}_map"] = rel
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
