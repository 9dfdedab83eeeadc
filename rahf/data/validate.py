"""Check a dataset directory in the package's format (see :mod:`rahf.data.format`), record by record.

:func:`validate_dataset` never stops at the first problem: every manifest line of every split is
checked and every problem is reported, as ``(split, uid or "manifest.jsonl:LINE", message, line)``.
It applies the dataset loader's own rules, through the same functions: the manifest line parses
(:func:`~rahf.data.format.iter_manifest`), :func:`~rahf.data.format.check_entry` (fields, finite
scores in [0, 1], tags matching the prompt), uids are unique, and
:func:`~rahf.data.format.load_record_files` (paths inside the split directory, the image by
:func:`~rahf.schema.load_image`, each heatmap by :func:`~rahf.schema.load_map`, both heatmaps of one
size and of ``dataset.json``'s ``heatmap_size`` when declared). So a dataset that passes loads, and a
record that fails to load is listed here.

:func:`token_lengths` measures what the records cost a model's tokenizer: the length distribution of
the encoder's prompts and of the decoder's targets (tagged prompts, ``_0`` included) per split, and
how many are over the model's token limits (the collator cuts those: :mod:`rahf.data.tokens`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .format import (FILE_FIELDS, MANIFEST, SPLITS, DataError, check_entry, declared_heatmap_size, encoder_prompt,
                     iter_manifest, load_record_files)
from .tokens import length_summary, token_counts


@dataclass
class Problem:
    split: str
    uid: str  # the record's uid, or "manifest.jsonl:LINE" when the line has none
    message: str
    line: Optional[int] = None  # the record's line in manifest.jsonl (None: a split- or dataset-level problem)

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

    def add(self, split: str, uid: str, message: str, line: Optional[int] = None) -> None:
        self.problems.append(Problem(split, uid, message, line))

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"{verdict}: checked {self.records} records in {len(self.splits)} split(s) "
                f"({', '.join(self.splits) or 'none'}) of {self.root}: {len(self.problems)} problem(s)")


def _line(err: DataError) -> int:
    return int(err.where.rsplit(":", 1)[-1])


def _validate_split(root: Path, split: str, report: Report, heatmap_size: int | None) -> None:
    split_dir = root / split
    if not (split_dir / MANIFEST).is_file():
        report.add(split, MANIFEST, "manifest.jsonl not found")
        return
    bad_lines: list[DataError] = []
    seen: dict[str, int] = {}
    for lineno, entry in iter_manifest(split_dir, bad_lines):
        report.records += 1
        raw_uid = entry.get("uid") if isinstance(entry, dict) else None
        uid = raw_uid if isinstance(raw_uid, str) and raw_uid else f"{MANIFEST}:{lineno}"
        try:
            check_entry(entry, f"{MANIFEST}:{lineno}")
        except DataError as e:
            report.add(split, uid, f"{e.problem} (line {lineno})", lineno)
        if not isinstance(entry, dict):
            continue
        if uid in seen:
            report.add(split, uid, f"duplicate uid (lines {seen[uid]} and {lineno})", lineno)
        else:
            seen[uid] = lineno
        if all(isinstance(entry.get(k), str) for k in FILE_FIELDS):  # otherwise check_entry said so
            problems: list[DataError] = []
            load_record_files(split_dir, entry, heatmap_size, problems)
            for e in problems:
                report.add(split, uid, e.problem, lineno)
    for err in bad_lines:  # lines that are not UTF-8 JSON (not counted as records)
        report.add(split, f"{MANIFEST}:{_line(err)}", err.problem, _line(err))


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
    try:
        heatmap_size = declared_heatmap_size(root)
    except DataError as e:
        report.add("-", "dataset.json", e.problem)
        heatmap_size = None
    report.splits = list(splits) if splits else present_splits(root)
    if not report.splits:
        report.add("-", str(root), "no split directories (train/, dev/, test/) found")
    for split in report.splits:
        if not (root / split).is_dir():
            report.add(split, str(root / split), "split directory not found")
            continue
        _validate_split(root, split, report, heatmap_size)
    return report


def entry_token_lengths(entries, tokenizer, max_prompt_tokens: Optional[int] = None,
                        max_target_tokens: Optional[int] = None, encoder: str = "clean") -> dict:
    """``{"prompt": summary, "target": summary}`` (:func:`rahf.data.tokens.length_summary`) of manifest
    entries (dicts with ``prompt``, ``tagged_prompt`` and optionally ``prompt_raw``; others are left
    out): ``prompt`` is what the encoder reads (``encoder``: ``clean`` or ``original``, see
    :func:`rahf.data.format.encoder_prompt`), ``target`` the tagged prompt; ``over_limit`` counts
    those longer than the limits."""
    ok = [e for e in entries if isinstance(e, dict) and isinstance(e.get("prompt"), str)
          and isinstance(e.get("tagged_prompt"), str)]
    prompts = [encoder_prompt(e["prompt"], e.get("prompt_raw") if isinstance(e.get("prompt_raw"), str) else None,
                              encoder) for e in ok]
    return {"prompt": length_summary(token_counts(tokenizer, prompts), max_prompt_tokens),
            "target": length_summary(token_counts(tokenizer, [e["tagged_prompt"] for e in ok]), max_target_tokens)}


def token_lengths(root: str | os.PathLike, tokenizer, splits: list[str] | None = None, *,
                  max_prompt_tokens: Optional[int] = None, max_target_tokens: Optional[int] = None,
                  encoder: str = "clean") -> dict[str, dict]:
    """Per split (default: every split present): :func:`entry_token_lengths` of its manifest's records
    (lines that do not parse are left out; :func:`validate_dataset` lists them)."""
    root = Path(root)
    out = {}
    for split in splits or present_splits(root):
        if not (root / split / MANIFEST).is_file():
            continue
        entries = [e for _, e in iter_manifest(root / split, [])]
        out[split] = entry_token_lengths(entries, tokenizer, max_prompt_tokens, max_target_tokens, encoder)
    return out
