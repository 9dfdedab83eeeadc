"""Check a dataset directory in the package's format (see :mod:`rahf.data.format`), record by record.

:func:`validate_dataset` never stops at the first problem: every manifest line of every split is
checked and every problem is reported, as ``(split, uid or "manifest.jsonl:LINE", message)``.
Checks: the line is UTF-8 JSON; :func:`~rahf.data.format.check_entry` (fields, finite scores in
[0, 1], tags matching the prompt); duplicate uids; file paths stay inside the split directory;
the image exists, decodes and is at least 8 px on each side; both heatmaps exist, decode, are
8-bit single-channel ('L') PNGs, and have the size most maps of the split have.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .format import MANIFEST, MAP_NAMES, SPLITS, DataError, check_entry, iter_manifest

MIN_IMAGE_SIDE = 8


@dataclass
class Problem:
    split: str
    uid: str  # the record's uid, or "manifest.jsonl:LINE" when the line has none
    message: str

    def __str__(self) -> str:
        return f"{self.split} {self.uid}: {self.message}"


@dataclass
class Report:
    root: str
    splits: list[str] = field(default_factory=list)
    records: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, split: str, uid: str, message: str) -> None:
        self.problems.append(Problem(split, uid, message))

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"{verdict}: checked {self.records} records in {len(self.splits)} split(s) "
                f"({', '.join(self.splits) or 'none'}) of {self.root}: {len(self.problems)} problem(s)")


def _manifest_lines(path: Path, split: str, report: Report):
    """Yield ``(lineno, entry)`` for each non-blank line that parses; report the others."""
    bad: list[DataError] = []
    yield from iter_manifest(path.parent, bad)
    for err in bad:
        report.add(split, f"{MANIFEST}:{err.where.rsplit(':', 1)[-1]}", err.problem)


def _resolve(split_dir: Path, rel: object) -> tuple[Path | None, str | None]:
    if not isinstance(rel, str) or not rel:
        return None, f"path {rel!r} is not a non-empty string"
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return None, f"path {rel!r} leaves the split directory"
    return split_dir / p, None


def _check_image(path: Path) -> str | None:
    if not path.is_file():
        return f"image file missing: {path.name}"
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except Exception as e:  # PIL raises many kinds
        return f"image {path.name} does not decode: {e}"
    if min(w, h) < MIN_IMAGE_SIDE:
        return f"image {path.name} is too small ({w}x{h}; each side must be >= {MIN_IMAGE_SIDE} px)"
    return None


def _check_map(path: Path, name: str) -> tuple[str | None, tuple[int, int] | None]:
    if not path.is_file():
        return f"{name} map file missing: {path.name}", None
    try:
        with Image.open(path) as im:
            im.load()
            mode, fmt, size = im.mode, im.format, im.size
    except Exception as e:
        return f"{name} map {path.name} does not decode: {e}", None
    if fmt != "PNG":
        return f"{name} map {path.name} is {fmt}, expected PNG", size
    if mode != "L":
        return f"{name} map {path.name} has mode {mode!r}, expected 8-bit single-channel 'L'", size
    return None, size


def _check_record(split_dir: Path, split: str, uid: str, entry: dict, report: Report, sizes: dict) -> None:
    path, err = _resolve(split_dir, entry.get("image"))
    err = err or _check_image(path)
    if err:
        report.add(split, uid, err)
    for name in MAP_NAMES:
        path, err = _resolve(split_dir, entry.get(f"{name}_map"))
        size = None
        if err is None:
            err, size = _check_map(path, name)
        if err:
            report.add(split, uid, err)
        if size is not None:
            sizes[(uid, name)] = size


def _validate_split(root: Path, split: str, report: Report) -> None:
    split_dir = root / split
    manifest = split_dir / MANIFEST
    if not manifest.is_file():
        report.add(split, MANIFEST, "manifest.jsonl not found")
        return
    seen: dict[str, int] = {}
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    for lineno, entry in _manifest_lines(manifest, split, report):
        report.records += 1
        raw_uid = entry.get("uid") if isinstance(entry, dict) else None
        uid = raw_uid if isinstance(raw_uid, str) and raw_uid else f"{MANIFEST}:{lineno}"
        try:
            check_entry(entry, f"{MANIFEST}:{lineno}")
        except DataError as e:
            report.add(split, uid, f"{e.problem} (line {lineno})")
        if not isinstance(entry, dict):
            continue
        if uid in seen:
            report.add(split, uid, f"duplicate uid (lines {seen[uid]} and {lineno})")
        else:
            seen[uid] = lineno
        _check_record(split_dir, split, uid, entry, report, sizes)
    if sizes:
        common, _ = Counter(sizes.values()).most_common(1)[0]
        for (uid, name), size in sizes.items():
            if size != common:
                report.add(split, uid, f"{name} map is {size[0]}x{size[1]}; most maps of the split are "
                                       f"{common[0]}x{common[1]}")


def present_splits(root: str | os.PathLike) -> list[str]:
    """The splits under ``root``: train/dev/test first, then any other directory with a manifest."""
    root = Path(root)
    found = [s for s in SPLITS if (root / s).is_dir()]
    if root.is_dir():
        found += sorted(p.name for p in root.iterdir() if p.name not in SPLITS and (p / MANIFEST).is_file())
    return found


def validate_dataset(root: str | os.PathLike, splits: list[str] | None = None) -> Report:
    """Check every record of ``splits`` (default: every split present) and return a :class:`Report`."""
    root = Path(root)
    report = Report(str(root))
    if not root.is_dir():
        report.add("-", str(root), "dataset directory not found")
        return report
    info = root / "dataset.json"
    if info.is_file():
        try:
            json.loads(info.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            report.add("-", "dataset.json", f"does not parse: {e}")
    report.splits = list(splits) if splits else present_splits(root)
    if not report.splits:
        report.add("-", str(root), "no split directories (train/, dev/, test/) found")
    for split in report.splits:
        if not (root / split).is_dir():
            report.add(split, str(root / split), "split directory not found")
            continue
        _validate_split(root, split, report)
    return report
