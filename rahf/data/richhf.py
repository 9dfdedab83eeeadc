"""Convert RichHF-18K (TFRecords of labels + Pick-a-Pic images) to the package's dataset format.

``rahf data convert-richhf --tfrecords DIR --images SOURCE --out OUT``

* ``DIR`` holds ``train.tfrecord``, ``dev.tfrecord``, ``test.tfrecord`` .
* ``SOURCE`` is either a directory of Pick-a-Pic v1 parquet shards (``train-00000-of-00645.parquet``
  ..., searched recursively, columns ``caption``, ``image_0_uid``, ``image_1_uid``, ``jpg_0``,
  ``jpg_1``), or a folder of image files named ``<uid>.<jpg|jpeg|png|webp>`` (searched recursively)
  plus a captions file: ``captions.jsonl`` (lines ``{"uid": ..., "caption": ...}``) or
  ``captions.csv`` / ``captions.tsv`` (header row with columns ``uid`` and ``caption``), in the
  folder or given with ``--captions FILE``.

Work happens in stages, so that memory stays small whatever the size of SOURCE:

1. read the TFRecords (both CRCs checked; a corrupt file is an error), check features, scores and
   heatmaps of every record, keep only small per-record facts and the record's byte offset;
2. parquet only: scan the shards' uid columns row group by row group (the caption column is read
   only for row groups holding a wanted uid) to find each wanted uid and its caption; train/dev
   uids are looked for first in ``train-*`` shards, test uids in ``test-*`` shards, then anywhere
   (uids found elsewhere are listed in the report);
3. check each prompt's label count against its words;
4. fetch the images: parquet ``jpg_<slot>`` columns are streamed in small batches, only for row
   groups that hold a wanted uid; each image is decode-checked and written with its original bytes
   and its real extension (format sniffed with PIL) to ``OUT/<split>/images/``;
5. write each split (records in TFRecord order) with :class:`rahf.data.format.SplitWriter`,
   re-reading each record's heatmaps by offset; write ``dataset.json`` and
   ``conversion_report.json``, and remove files of earlier runs that no manifest references.

Each record keeps its caption as written (``prompt_raw``, when it differs from the clean ``prompt``)
for a text encoder that reads the original prompt (``model.text.encoder_prompt: original``). Given a
tokenizer, the report also holds each split's token lengths of prompts and targets (tagged prompts)
and how many exceed the model's token limits (:func:`rahf.data.validate.entry_token_lengths`).

``OUT/.richhf_cache.jsonl`` remembers images already written (size and CRC-32C) and, for parquet
sources, where each uid was found; a re-run skips that work and produces the same manifests and
the same report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .._extras import require
from ..schema import (MAP_NAMES, MAX_PROMPT_CHARS, SCORE_NAMES, SPLITS, DataError, error_text, load_image, split_words,
                      tag_words)
from .format import SplitWriter, write_dataset_info
from .tokens import format_summary
from .tfrecord import DecodeError, crc32c, decode_example, iter_tfrecord, read_record_at

__all__ = ["convert_richhf", "ConversionError", "SCORE_FEATURES", "MAP_FEATURES", "SKIP_REASONS"]

# TFRecord feature -> package score name .
SCORE_FEATURES: dict[str, str] = {
    "artifact_score": "plausibility",
    "misalignment_score": "alignment",
    "aesthetics_score": "aesthetics",
    "overall_score": "overall",
}
# TFRecord feature -> package heatmap name.
MAP_FEATURES: dict[str, str] = {"artifact_map": "implausibility", "misalignment_map": "misalignment"}
LABEL_FEATURE = "prompt_misalignment_label"
REQUIRED_FEATURES: tuple[str, ...] = ("filename", *SCORE_FEATURES, *MAP_FEATURES, LABEL_FEATURE)

# Skip reasons, in the order they are checked (a record is counted under its first failing reason).
SKIP_REASONS: dict[str, str] = {
    "undecodable_record": "the record is not a valid tf.train.Example",
    "missing_feature": "a required feature is absent or empty",
    "bad_feature": "a feature has the wrong type or number of values, or a bad filename",
    "duplicate_uid": "the uid already appeared earlier in the same split",
    "nonfinite_score": "a score is NaN or infinite",
    "score_out_of_range": "a score is outside [0, 1] (see --clip-scores)",
    "corrupt_heatmap": "a heatmap does not decode",
    "missing_image": "the image is not in SOURCE",
    "missing_caption": "folder source: the uid has no caption in the captions file",
    "empty_prompt": "the caption has no words",
    "long_prompt": f"the caption is longer than {MAX_PROMPT_CHARS} characters",
    "bad_label": "prompt_misalignment_label has tokens other than 0 and 1",
    "label_count_mismatch": "the number of labels differs from the number of prompt words",
    "corrupt_image": "the image does not decode",
}

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PIL_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
PARQUET_UID_COLUMNS = ("image_0_uid", "image_1_uid")
PARQUET_COLUMNS = ("caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1")
CACHE_NAME = ".richhf_cache.jsonl"
REPORT_NAME = "conversion_report.json"
CACHE_VERSION = 1
_CHUNK = 64  # records per parallel batch
_BIG_CHUNK = 600_000_000  # bytes: warn about parquet column chunks larger than this


class ConversionError(DataError):
    """A conversion that cannot go on (``--strict`` and a skipped record, or a bad SOURCE)."""


# --------------------------------------------------------------------------------------------
# Worker functions (module level so that a process pool can run them)
# --------------------------------------------------------------------------------------------




def heatmap_png(data: bytes, size: int | None = None) -> bytes:
    """Turn an encoded heatmap into an 8-bit grayscale PNG, optionally resized to ``size``×``size``.

    An 8-bit grayscale PNG at the wanted size is returned as is (same bytes). Other modes are
    converted to 8-bit gray (16-bit: value/65535·255); resizing interpolates the float values
    (PIL's bilinear filter, which averages over the source footprint when shrinking) and rounds.
    Raises ``ValueError`` if the data does not decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = arr / (65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0)
                gray = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), mode="L")
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
            elif im.mode == "L":
                gray = im.copy()
            else:
                gray = im.convert("L")
    except Exception as e:  # PIL raises many kinds
        raise ValueError(f"heatmap does not decode: {error_text(e)}") from None
    if size and gray.size != (size, size):
        f = Image.fromarray(np.asarray(gray, dtype=np.float32), mode="F").resize((size, size), Image.BILINEAR)
        gray = Image.fromarray(np.clip(np.rint(np.asarray(f, dtype=np.float64)), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "L" and fmt == "PNG":
        return bytes(data)
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    return buf.getvalue()


def _heatmaps_job(job: tuple[bytes, bytes, int | None]) -> tuple[bool, object]:
    a, m, size = job
    try:
        return True, (heatmap_png(a, size), heatmap_png(m, size))
    except ValueError as e:
        return False, str(e)


def _heatmaps_check_job(job: tuple[bytes, bytes, int | None]) -> str | None:
    ok, res = _heatmaps_job(job)
    return None if ok else str(res)


def sniff_image(data: bytes) -> tuple[str, int, int]:
    """Check an encoded image by the loader's own rules (:func:`rahf.schema.load_image`: decodes fully,
    no decompression bomb, minimum side) and return ``(extension, width, height)``. Raises ``ValueError``."""
    try:
        w, h = load_image(data).size
        with Image.open(io.BytesIO(data)) as im:  # header only: the container format
            fmt = im.format
    except DataError as e:
        raise ValueError(e.problem) from None
    except Exception as e:
        raise ValueError(f"image does not decode: {error_text(e)}") from None
    return _PIL_EXT.get(fmt or "", (fmt or "bin").lower()), w, h


def _image_job(data: bytes) -> tuple[bool, object]:
    try:
        return True, sniff_image(data)
    except ValueError as e:
        return False, str(e)


class _Pool:
    """``map`` in order, in this process (workers <= 1) or in a process pool."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers or 1))
        self._ex = ProcessPoolExecutor(self.workers) if self.workers > 1 else None

    def map(self, fn: Callable, items: Sequence) -> list:
        if self._ex is None or len(items) <= 1:
            return [fn(x) for x in items]
        return list(self._ex.map(fn, items, chunksize=max(1, len(items) // (4 * self.workers))))

    def close(self):
        if self._ex is not None:
            self._ex.shutdown()
            self._ex = None


def _chunks(seq: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class _Rec:
    split: str
    index: int
    offset: int
    uid: str
    scores: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)
    skip: tuple | None = None  # (reason, detail)
    prompt: str = ""
    prompt_raw: str = ""  # the caption as written
    tagged: str = ""
    ext: str = ""


@dataclass
class _Split:
    name: str
    path: Path
    records: list = field(default_factory=list)
    score_values: dict = field(default_factory=lambda: {k: [] for k in SCORE_NAMES})
    score_missing: dict = field(default_factory=lambda: {k: 0 for k in SCORE_NAMES})
    score_nonfinite: dict = field(default_factory=lambda: {k: 0 for k in SCORE_NAMES})
    clipped: list = field(default_factory=list)
    elsewhere: dict = field(default_factory=dict)

    def live(self) -> list:
        return [r for r in self.records if r.skip is None]


def _one(kind_values, want_kind: tuple[str, ...]):
    kind, values = kind_values
    if kind is None or not values:
        return "missing", None
    if kind not in want_kind or len(values) != 1:
        return "bad", f"{kind} with {len(values)} values"
    return "ok", values[0]


def _check_record(split: _Split, index: int, offset: int, data: bytes, clip: bool, seen: set) -> tuple[_Rec, tuple | None]:
    """Check one record's features and scores; return it and its heatmap bytes (or None if skipped)."""
    rec = _Rec(split.name, index, offset, uid=f"<record {index} at byte {offset}>")
    try:
        ex = decode_example(data, typed=True)
    except DecodeError as e:
        rec.skip = ("undecodable_record", f"not a tf.train.Example: {e}")
        return rec, None
    status, fname = _one(ex.get("filename", (None, [])), ("bytes_list",))
    if status == "ok":
        try:
            base = fname.decode("utf-8").replace("\\", "/").rsplit("/", 1)[-1]
        except UnicodeDecodeError:
            base = ""
        uid = base.split(".", 1)[0].strip()
        if uid and uid not in (".", "..") and not uid.startswith("<"):
            rec.uid = uid
        else:
            rec.skip = ("bad_feature", f"filename {fname!r} gives no usable uid")
    elif status == "missing":
        rec.skip = ("missing_feature", "feature 'filename' is missing")
    else:
        rec.skip = ("bad_feature", f"feature 'filename' is {fname}")
    # Scores are read (and their ranges observed) even when the record is skipped for another reason.
    raw = {}
    for feat, name in SCORE_FEATURES.items():
        status, v = _one(ex.get(feat, (None, [])), ("float_list", "int64_list"))
        if status == "missing":
            split.score_missing[name] += 1
            rec.skip = rec.skip or ("missing_feature", f"feature {feat!r} is missing")
        elif status == "bad":
            rec.skip = rec.skip or ("bad_feature", f"feature {feat!r} is {v}")
        else:
            v = float(v)
            if math.isfinite(v):
                split.score_values[name].append(v)
            else:
                split.score_nonfinite[name] += 1
            raw[name] = v
    maps = []
    for feat in (*MAP_FEATURES, LABEL_FEATURE):
        status, v = _one(ex.get(feat, (None, [])), ("bytes_list",))
        if status == "missing":
            rec.skip = rec.skip or ("missing_feature", f"feature {feat!r} is missing")
        elif status == "bad":
            rec.skip = rec.skip or ("bad_feature", f"feature {feat!r} is {v}")
        elif feat == LABEL_FEATURE:
            try:
                rec.labels = v.decode("ascii").split()
            except UnicodeDecodeError:
                rec.skip = rec.skip or ("bad_label", "labels are not ASCII")
        else:
            maps.append(v)
    if rec.skip is None:
        if rec.uid in seen:
            rec.skip = ("duplicate_uid", "uid appears more than once in this split; the first is kept")
        seen.add(rec.uid)
    if rec.skip is None:
        bad = [f"{k}={v!r}" for k, v in raw.items() if not math.isfinite(v)]
        if bad:
            rec.skip = ("nonfinite_score", "non-finite score " + ", ".join(bad))
    if rec.skip is None:
        out = {k: v for k, v in raw.items() if not 0.0 <= v <= 1.0}
        if out and not clip:
            rec.skip = ("score_out_of_range", "score outside [0, 1]: " + ", ".join(f"{k}={v!r}" for k, v in out.items()))
        elif out:
            split.clipped.append(rec.uid)
            raw = {k: min(1.0, max(0.0, v)) for k, v in raw.items()}
    rec.scores = raw
    return rec, (tuple(maps) if rec.skip is None else None)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


class _Cache:
    """Append-only ``OUT/.richhf_cache.jsonl``: images written and parquet locations found."""

    def __init__(self, out: Path, fingerprint: dict):
        self.path = out / CACHE_NAME
        self.images: dict[tuple[str, str], dict] = {}
        self.locs: dict[str, dict] = {}
        self.bad: dict[tuple[str, str], str] = {}
        header = {"cache": "rahf-richhf", "version": CACHE_VERSION, "source": fingerprint}
        lines = []
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        lines.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a torn last line from an interrupted run
        if lines and lines[0] == header:
            for e in lines[1:]:
                if e.get("kind") == "image":
                    self.images[(e["split"], e["uid"])] = e
                elif e.get("kind") == "bad_image":
                    self.bad[(e["split"], e["uid"])] = e["error"]
                elif e.get("kind") == "loc":
                    self.locs[e["uid"]] = e
            self._f = open(self.path, "a", encoding="utf-8")
        else:
            self._f = open(self.path, "w", encoding="utf-8")
            self._write(header)

    def _write(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, sort_keys=True) + "\n")
        self._f.flush()

    def add_image(self, split: str, uid: str, ext: str, size: int, crc: int) -> None:
        e = {"kind": "image", "split": split, "uid": uid, "ext": ext, "size": size, "crc": crc}
        self.images[(split, uid)] = e
        self._write(e)

    def add_bad(self, split: str, uid: str, error: str) -> None:
        self.bad[(split, uid)] = error
        self._write({"kind": "bad_image", "split": split, "uid": uid, "error": error})

    def add_loc(self, uid: str, loc: dict) -> None:
        e = {"kind": "loc", "uid": uid, **loc}
        self.locs[uid] = e
        self._write(e)

    def image_ok(self, split_dir: Path, split: str, uid: str, src_crc: int | None = None) -> str | None:
        """The cached extension if ``split_dir/images/<uid>.<ext>`` holds the cached bytes, else None."""
        e = self.images.get((split, uid))
        if e is None or (src_crc is not None and src_crc != e["crc"]):
            return None
        p = split_dir / "images" / f"{uid}.{e['ext']}"
        try:
            if p.stat().st_size != e["size"] or crc32c(p.read_bytes()) != e["crc"]:
                return None
        except OSError:
            return None
        return e["ext"]

    def close(self):
        self._f.close()


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------


def _shard_group(path: Path) -> str:
    return path.name.split("-", 1)[0].split(".", 1)[0]


def _expected_group(split: str) -> str:
    return "test" if split == "test" else "train"


class _ParquetSource:
    kind = "parquet"

    def __init__(self, root: Path, log):
        pa = require("pyarrow", extra="richhf", purpose="reading Pick-a-Pic parquet shards")
        import pyarrow.parquet as pq

        self.pq = pq
        self._pa = pa
        self._warned: set = set()
        self.root = root
        self.shards = sorted(root.rglob("*.parquet"), key=lambda p: p.relative_to(root).as_posix())
        self.log = log
        if not self.shards:
            raise ConversionError(None, "no *.parquet files found", str(root))

    def fingerprint(self) -> dict:
        return {"kind": "parquet", "shards": [[p.relative_to(self.root).as_posix(), p.stat().st_size] for p in self.shards]}

    def _open(self, path: Path):
        try:
            pf = self.pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        except Exception as e:
            raise ConversionError(None, f"cannot read parquet file: {e}", str(path)) from None
        missing = [c for c in PARQUET_COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ConversionError(None, f"parquet shard lacks columns {missing}", str(path))
        return pf

    def locate(self, wanted: dict[str, set], cache: _Cache, progress: bool) -> dict[str, dict]:
        """Find each wanted uid (``{uid: expected shard groups}``); return ``{uid: loc}``."""
        locs: dict[str, dict] = {u: cache.locs[u] for u in wanted if u in cache.locs}
        todo = {u: g for u, g in wanted.items() if u not in locs}
        if not todo:
            return locs
        best: dict[str, dict] = {}  # first occurrence in an expected group wins, else first anywhere
        pending = set(todo)  # uids with no occurrence in an expected group yet
        bar = tqdm(self.shards, desc="scan uids", unit="shard", disable=not progress)
        for path in bar:
            if not pending:
                break
            pf = self._open(path)
            rel = path.relative_to(self.root).as_posix()
            group = _shard_group(path)
            for rg in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(rg, columns=list(PARQUET_UID_COLUMNS))
                hits = []
                for slot, col in enumerate(PARQUET_UID_COLUMNS):
                    for row, u in enumerate(t.column(col).to_pylist()):
                        if u is None:
                            continue
                        u = str(u)
                        if u in todo and (u in pending or u not in best):
                            hits.append((row, slot, u))
                if not hits:
                    continue
                captions = pf.read_row_group(rg, columns=["caption"]).column("caption")
                for row, slot, u in sorted(hits):
                    expected = group in todo[u]
                    if u in best and not (expected and u in pending):
                        continue
                    cap = captions[row].as_py()
                    best[u] = {"shard": rel, "group": group, "row_group": rg, "row": row, "slot": slot,
                               "caption": "" if cap is None else str(cap)}
                    if expected:
                        pending.discard(u)
        bar.close()
        for u in sorted(best):
            cache.add_loc(u, best[u])
            locs[u] = cache.locs[u]
        return locs

    def fetch(self, needs: dict[str, list[tuple[str, _Rec]]], locs: dict, pool: _Pool, on_image, progress: bool,
              cached=None) -> None:
        """Stream the jpg columns for the needed uids; call ``on_image(uid, data, check)`` per image."""
        plan: dict[str, dict[int, list]] = {}
        for u in needs:
            loc = locs[u]
            plan.setdefault(loc["shard"], {}).setdefault(loc["row_group"], []).append((loc["slot"], loc["row"], u))
        bar = tqdm(total=len(needs), desc="fetch images", unit="img", disable=not progress)
        for rel in tqdm(sorted(plan), desc="image shards", unit="shard", disable=not progress or len(plan) < 2):
            pf = self._open(self.root / rel)
            for rg in sorted(plan[rel]):
                items = sorted(plan[rel][rg])
                for slot in sorted({s for s, _, _ in items}):
                    self._warn_big(pf, rel, rg, f"jpg_{slot}")
                    rows = {}
                    for s, row, u in items:
                        if s == slot:
                            rows.setdefault(row, []).append(u)
                    last = max(rows)
                    start = 0
                    batch_items: list[tuple[str, bytes]] = []
                    for batch in pf.iter_batches(batch_size=16, row_groups=[rg], columns=[f"jpg_{slot}"]):
                        n = batch.num_rows
                        col = batch.column(0)
                        for row in [r for r in rows if start <= r < start + n]:
                            v = col[row - start].as_py()
                            for u in rows[row]:
                                batch_items.append((u, v))
                        start += n
                        if len(batch_items) >= _CHUNK or start > last:
                            self._check(batch_items, pool, on_image)
                            bar.update(len(batch_items))
                            batch_items = []
                        if start > last:
                            break
                    if batch_items:
                        self._check(batch_items, pool, on_image)
                        bar.update(len(batch_items))
                    self._pa.default_memory_pool().release_unused()
        bar.close()

    def _warn_big(self, pf, rel: str, rg: int, column: str) -> None:
        """Arrow materialises a row group's whole column chunk: warn when that is large."""
        meta = pf.metadata.row_group(rg)
        for i in range(meta.num_columns):
            c = meta.column(i)
            if c.path_in_schema == column and c.total_uncompressed_size > _BIG_CHUNK and rel not in self._warned:
                self._warned.add(rel)
                self.log(f"warning: {rel} row group {rg} has a {c.total_uncompressed_size / 1e6:.0f} MB {column} "
                         f"column chunk; peak memory is about twice that")

    @staticmethod
    def _check(items, pool, on_image):
        datas = [b"" if v is None else bytes(v) for _, v in items]
        for (u, _), data, res in zip(items, datas, pool.map(_image_job, datas)):
            on_image(u, data, res)


class _FolderSource:
    kind = "folder"

    def __init__(self, root: Path, captions: Path | None, log):
        self.root = root
        self.log = log
        self.files: dict[str, Path] = {}
        dups = []
        for p in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
            if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS:
                if p.stem in self.files:
                    dups.append(p.stem)
                    continue
                self.files[p.stem] = p
        if dups:
            log(f"warning: {len(dups)} uid(s) have several image files; using the first by path, e.g. {dups[0]!r}")
        if captions is None:
            for name in ("captions.jsonl", "captions.csv", "captions.tsv"):
                if (root / name).is_file():
                    captions = root / name
                    break
            else:
                raise ConversionError(None, "no captions file (captions.jsonl, captions.csv or captions.tsv); "
                                            "pass --captions FILE", str(root))
        self.captions = self._read_captions(Path(captions))

    @staticmethod
    def _read_captions(path: Path) -> dict[str, str]:
        if not path.is_file():
            raise ConversionError(None, "captions file not found", str(path))
        out: dict[str, str] = {}
        if path.suffix.lower() in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        e = json.loads(line)
                        out.setdefault(str(e["uid"]), "" if e["caption"] is None else str(e["caption"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ConversionError(None, f"bad captions line ({e}); expected {{\"uid\", \"caption\"}}",
                                              f"{path}:{lineno}") from None
        else:
            delim = "\t" if path.suffix.lower() == ".tsv" else ","
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter=delim)
                if not reader.fieldnames or "uid" not in reader.fieldnames or "caption" not in reader.fieldnames:
                    raise ConversionError(None, f"captions file needs a header row with columns uid and caption "
                                                f"(got {reader.fieldnames})", str(path))
                for row in reader:
                    out.setdefault(str(row["uid"]), row["caption"] or "")
        return out

    def fingerprint(self) -> dict:
        return {"kind": "folder"}

    def locate(self, wanted, cache, progress) -> dict[str, dict]:
        return {u: {"caption": self.captions.get(u), "path": self.files[u]} for u in wanted if u in self.files}

    def fetch(self, needs, locs, pool, on_image, progress, cached=None) -> None:
        uids = sorted(needs)
        bar = tqdm(total=len(uids), desc="read images", unit="img", disable=not progress)
        for chunk in _chunks(uids, _CHUNK):
            datas = [locs[u]["path"].read_bytes() for u in chunk]
            done = [cached(u, d) if cached else None for u, d in zip(chunk, datas)]
            todo = [i for i, ext in enumerate(done) if ext is None]
            results = dict(zip(todo, pool.map(_image_job, [datas[i] for i in todo])))
            for i, (u, data) in enumerate(zip(chunk, datas)):
                # an image already written by an earlier run with the same bytes is not decoded again
                on_image(u, data, results[i] if i in results else (True, (done[i], None, None)))
            bar.update(len(chunk))
        bar.close()


# --------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------


def _is_parquet_source(path: Path) -> bool:
    return any(path.rglob("*.parquet"))


def _fail_strict(strict: bool, recs: Iterable[_Rec]) -> None:
    if not strict:
        return
    bad = [r for r in recs if r.skip is not None]
    if bad:
        lines = [f"record {r.uid!r} ({r.split} split): {r.skip[0]}: {r.skip[1]}" for r in bad[:20]]
        more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ConversionError(None, f"--strict: {len(bad)} record(s) would be skipped:\n" + "\n".join(lines) + more,
                              "convert-richhf")


def _range(values: list[float]) -> dict:
    if not values:
        return {"min": None, "max": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "max": float(a.max()), "mean": round(float(a.mean()), 6)}


def convert_richhf(tfrecords: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                   strict: bool = False, heatmap_size: int | None = None, workers: int = 1,
                   clip_scores: bool = False, captions: str | os.PathLike | None = None,
                   splits: Sequence[str] = SPLITS, progress: bool = True,
                   log: Callable[[str], None] | None = None, tokenizer=None,
                   token_limits: tuple[int, int] | None = None, encoder_prompt: str = "clean",
                   tokenizer_name: str | None = None) -> dict:
    """Convert RichHF-18K; return the report (also written to ``OUT/conversion_report.json``).

    ``tokenizer`` (a loaded tokenizer; ``tokenizer_name`` names it in the report): also report each
    kept split's token lengths — the prompts as the encoder reads them (``encoder_prompt``: ``clean``
    or ``original``) and the tagged prompts — with ``over_limit`` counts against ``token_limits``
    (max prompt tokens, max target tokens).

    Raises :class:`ConversionError` for a bad SOURCE or (with ``strict``) any skipped record, and
    :class:`rahf.data.tfrecord.TFRecordError` for a corrupt or truncated TFRecord file.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    tf_dir, src_dir, out = Path(tfrecords), Path(images), Path(out)
    if heatmap_size is not None and heatmap_size <= 0:
        raise ValueError("heatmap_size must be positive")
    paths = {s: tf_dir / f"{s}.tfrecord" for s in splits}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConversionError(None, f"TFRecord file(s) not found: {', '.join(missing)}", str(tf_dir))
    if not src_dir.is_dir():
        raise ConversionError(None, "image SOURCE is not a directory", str(src_dir))
    source = _ParquetSource(src_dir, log) if _is_parquet_source(src_dir) else _FolderSource(
        src_dir, Path(captions) if captions else None, log)
    out.mkdir(parents=True, exist_ok=True)
    pool = _Pool(workers)
    cache = _Cache(out, source.fingerprint())
    try:
        # ---- 1. TFRecords: features, scores, heatmaps ------------------------------------
        data: dict[str, _Split] = {}
        for s in splits:
            sp = data[s] = _Split(s, paths[s])
            seen: set = set()
            pending: list = []

            def flush():
                results = pool.map(_heatmaps_check_job, [(a, m, heatmap_size) for _, (a, m) in pending])
                for (rec, _), err in zip(pending, results):
                    if err is not None:
                        rec.skip = ("corrupt_heatmap", err)
                pending.clear()

            for i, (offset, raw) in enumerate(tqdm(iter_tfrecord(paths[s]), desc=f"read {s}.tfrecord",
                                                   unit="rec", disable=not progress)):
                rec, maps = _check_record(sp, i, offset, raw, clip_scores, seen)
                sp.records.append(rec)
                if maps is not None:
                    pending.append((rec, maps))
                    if len(pending) >= _CHUNK:
                        flush()
            flush()
        _fail_strict(strict, (r for sp in data.values() for r in sp.records))

        # ---- 2. locate uids, captions -------------------------------------------------------
        wanted: dict[str, set] = {}
        for sp in data.values():
            for r in sp.live():
                wanted.setdefault(r.uid, set()).add(_expected_group(sp.name))
        locs = source.locate(wanted, cache, progress)

        # ---- 3. prompts and labels ------------------------------------------------------------
        for sp in data.values():
            for r in sp.live():
                loc = locs.get(r.uid)
                if loc is None:
                    r.skip = ("missing_image", f"uid not found in {source.kind} source {src_dir}")
                    continue
                if source.kind == "parquet" and loc["group"] != _expected_group(sp.name):
                    sp.elsewhere[r.uid] = loc["shard"]
                cap = loc["caption"]
                if cap is None:
                    r.skip = ("missing_caption", "uid has no caption in the captions file")
                    continue
                words = split_words(cap)
                if not words:
                    r.skip = ("empty_prompt", f"caption {cap!r} has no words")
                elif len(cap) > MAX_PROMPT_CHARS:
                    r.skip = ("long_prompt", f"caption has {len(cap):,} characters")
                elif any(t not in ("0", "1") for t in r.labels):
                    r.skip = ("bad_label", f"labels {' '.join(r.labels)!r} are not all 0/1")
                elif len(words) != len(r.labels):
                    r.skip = ("label_count_mismatch", f"{len(r.labels)} labels for {len(words)} prompt words "
                                                      f"({' '.join(words)!r})")
                else:
                    r.prompt = " ".join(words)
                    r.prompt_raw = cap
                    r.tagged = tag_words(words, [t == "0" for t in r.labels])
        _fail_strict(strict, (r for sp in data.values() for r in sp.records))

        # ---- 4. images ---------------------------------------------------------------------------
        needs: dict[str, list] = {}
        n_cached = 0
        for sp in data.values():
            split_dir = out / sp.name
            for r in sp.live():
                ext = cache.image_ok(split_dir, sp.name, r.uid) if source.kind == "parquet" else None
                bad = cache.bad.get((sp.name, r.uid)) if source.kind == "parquet" else None
                if bad is not None:
                    r.skip = ("corrupt_image", bad)
                elif ext is not None:
                    r.ext = ext
                    n_cached += 1
                else:
                    needs.setdefault(r.uid, []).append((sp.name, r))
        if n_cached:
            log(f"{n_cached} image(s) already in {out} from an earlier run; not fetched again")

        def on_image(uid: str, data_: bytes, res) -> None:
            ok, val = res
            targets = needs[uid]
            if not ok:
                for split_name, r in targets:
                    r.skip = ("corrupt_image", str(val))
                    if source.kind == "parquet":
                        cache.add_bad(split_name, uid, str(val))
                return
            ext = val[0]
            crc = crc32c(data_)
            for split_name, r in targets:
                r.ext = ext
                split_dir = out / split_name
                if source.kind == "folder" and cache.image_ok(split_dir, split_name, uid, src_crc=crc) == ext:
                    continue
                (split_dir / "images").mkdir(parents=True, exist_ok=True)
                _write_file(split_dir / "images" / f"{uid}.{ext}", data_)
                cache.add_image(split_name, uid, ext, len(data_), crc)

        def cached(uid: str, data_: bytes) -> str | None:
            crc = crc32c(data_)
            exts = {cache.image_ok(out / split_name, split_name, uid, src_crc=crc) for split_name, _ in needs[uid]}
            return exts.pop() if len(exts) == 1 and None not in exts else None

        if needs:
            source.fetch(needs, locs, pool, on_image, progress, cached)
        _fail_strict(strict, (r for sp in data.values() for r in sp.records))

        # ---- 5. write the splits ---------------------------------------------------------------
        report_splits = {}
        for sp in data.values():
            kept = sp.live()
            with open(sp.path, "rb") as tf, SplitWriter(out, sp.name) as writer:
                bar = tqdm(total=len(kept), desc=f"write {sp.name}", unit="rec", disable=not progress)
                for chunk in _chunks(kept, _CHUNK):
                    jobs = []
                    for r in chunk:
                        ex = decode_example(read_record_at(tf, r.offset, sp.path))
                        jobs.append((ex["artifact_map"][0], ex["misalignment_map"][0], heatmap_size))
                    for r, (ok, maps) in zip(chunk, pool.map(_heatmaps_job, jobs)):
                        if not ok:  # decoded in stage 1, so this means the file changed meanwhile
                            raise ConversionError(r.uid, f"heatmap no longer decodes: {maps}", str(sp.path))
                        img = (out / sp.name / "images" / f"{r.uid}.{r.ext}").read_bytes()
                        writer.add(r.uid, r.prompt, r.tagged, r.scores, (img, r.ext), maps[0], maps[1],
                                   prompt_raw=r.prompt_raw)
                    bar.update(len(chunk))
                bar.close()
            _remove_stale(out / sp.name, kept)
            report_splits[sp.name] = _split_report(sp)
            if tokenizer is not None:
                from .validate import entry_token_lengths

                limits = token_limits or (None, None)
                entries = [{"prompt": r.prompt, "prompt_raw": r.prompt_raw, "tagged_prompt": r.tagged} for r in kept]
                report_splits[sp.name]["token_lengths"] = {
                    "tokenizer": tokenizer_name, "encoder_prompt": encoder_prompt,
                    **entry_token_lengths(entries, tokenizer, limits[0], limits[1], encoder_prompt)}
        write_dataset_info(out, source="richhf-18k", converter="rahf data convert-richhf",
                           splits={s: report_splits[s]["kept"] for s in report_splits},
                           heatmap_size=heatmap_size)
    finally:
        cache.close()
        pool.close()

    report = {
        "source": {"tfrecords": str(tf_dir), "images": str(src_dir), "kind": source.kind},
        "options": {"heatmap_size": heatmap_size, "clip_scores": clip_scores, "strict": strict},
        "score_features": {name: feat for feat, name in SCORE_FEATURES.items()},
        "skip_reasons": {k: v for k, v in SKIP_REASONS.items()},
        "splits": report_splits,
        "total": sum(r["total"] for r in report_splits.values()),
        "kept": sum(r["kept"] for r in report_splits.values()),
    }
    report["skipped"] = report["total"] - report["kept"]
    tmp = out / (REPORT_NAME + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / REPORT_NAME)
    return report


def _split_report(sp: _Split) -> dict:
    skipped: dict[str, list] = {}
    details: dict[str, str] = {}
    for r in sp.records:
        if r.skip is not None:
            skipped.setdefault(r.skip[0], []).append(r.uid)
            details.setdefault(r.uid, f"{r.skip[0]}: {r.skip[1]}")
    order = list(SKIP_REASONS)
    skipped = {k: skipped[k] for k in sorted(skipped, key=order.index)}
    ranges = {}
    for name in SCORE_NAMES:
        vals = sp.score_values[name]
        ranges[name] = {**_range(vals), "count": len(vals), "missing": sp.score_missing[name],
                        "nonfinite": sp.score_nonfinite[name],
                        "outside_0_1": int(sum(1 for v in vals if not 0.0 <= v <= 1.0))}
    kept = sum(1 for r in sp.records if r.skip is None)
    return {
        "tfrecord": sp.path.name,
        "total": len(sp.records),
        "kept": kept,
        "skipped_count": len(sp.records) - kept,
        "skipped": skipped,
        "skip_details": details,
        "score_ranges": ranges,
        "clipped_scores": sorted(set(sp.clipped) & {r.uid for r in sp.records if r.skip is None}),
        "found_outside_expected_shards": {u: sp.elsewhere[u] for u in sorted(sp.elsewhere)
                                          if any(r.uid == u and r.skip is None for r in sp.records)},
    }


def _remove_stale(split_dir: Path, kept: list) -> None:
    """Remove image/heatmap files (and ``.part`` leftovers) that the new manifest does not reference."""
    want = {f"images/{r.uid}.{r.ext}" for r in kept}
    want |= {f"{m}/{r.uid}.png" for r in kept for m in MAP_NAMES}
    for sub in ("images",) + MAP_NAMES:
        d = split_dir / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and f"{sub}/{p.name}" not in want:
                p.unlink()


def summary_lines(report: dict) -> list[str]:
    lines = []
    for name, r in report["splits"].items():
        why = ", ".join(f"{k}: {len(v)}" for k, v in r["skipped"].items())
        lines.append(f"{name}: {r['total']} records, {r['kept']} kept, {r['skipped_count']} skipped" + (f" ({why})" if why else ""))
        rng = ", ".join(f"{k} [{v['min']:.4g}, {v['max']:.4g}]" for k, v in r["score_ranges"].items() if v["min"] is not None)
        if rng:
            lines.append(f"  score ranges: {rng}")
        if r["found_outside_expected_shards"]:
            lines.append(f"  {len(r['found_outside_expected_shards'])} image(s) found outside the expected shards")
        if r["clipped_scores"]:
            lines.append(f"  {len(r['clipped_scores'])} record(s) had scores clipped to [0, 1]")
        tl = r.get("token_lengths")
        if tl:
            lines.append(f"  token lengths in {tl['tokenizer']!r} (the encoder reads the "
                         f"{'prompt as written' if tl['encoder_prompt'] == 'original' else 'clean prompt'}):")
            lines += [f"    {format_summary(kind, tl[kind])}" for kind in ("prompt", "target")]
    return lines
