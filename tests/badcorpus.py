"""The bad-input corpus: a small synth dataset with one record broken per kind (tests and docs).

``build(dst, base)`` copies a clean dataset ``base`` (e.g. ``rahf.data.synth.generate(base, train=28,
dev=8, test=0, size=64)``) to ``dst`` and breaks train records 0, 1, 2, ... one per kind of
:data:`KINDS` (``kinds=`` picks some). Returns ``{kind: Case}``; each Case says what the loader must
make of it: ``stage`` "manifest" (found when the split is opened), "load" (found when the record is
loaded) or "ok" (a valid record, e.g. an RGBA image, converted to RGB), and ``pattern``, a regex the
problem message must match.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


@dataclass
class Case:
    kind: str
    uid: str  # the record's uid (bad_json / invalid_utf8: the uid the line had; duplicate_uid: the repeated uid)
    line: int  # its line in train/manifest.jsonl (1-based)
    stage: str  # "manifest" | "load" | "ok"
    pattern: str  # regex the problem must match ("" for ok)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG whose header declares ``width``×``height`` (8-bit gray) with a tiny, truncated body: PIL
    refuses it at open (decompression bomb check) without allocating anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# --- file-level breakers: (split_dir, entry) -> None
def _image_path(d: Path, e: dict) -> Path:
    return d / e["image"]


def _write_image(d: Path, e: dict, data: bytes, ext: str) -> None:
    _image_path(d, e).unlink()
    e["image"] = f"images/{e['uid']}.{ext}"
    (d / e["image"]).write_bytes(data)


def truncated_jpeg(d, e):
    buf = io.BytesIO()
    Image.open(_image_path(d, e)).convert("RGB").save(buf, format="JPEG", quality=90)
    _write_image(d, e, buf.getvalue()[: len(buf.getvalue()) // 2], "jpg")


def zero_byte_image(d, e):
    _write_image(d, e, b"", "png")


def _convert_image(mode: str, fmt: str, ext: str):
    def f(d, e):
        buf = io.BytesIO()
        Image.open(_image_path(d, e)).convert(mode).save(buf, format=fmt)
        _write_image(d, e, buf.getvalue(), ext)
    return f


def image_1x1(d, e):
    _write_image(d, e, _png(np.zeros((1, 1, 3), np.uint8)), "png")


def decompression_bomb(d, e):
    _write_image(d, e, bomb_png(), "png")


def _map(d: Path, e: dict, name: str = "implausibility_map") -> Path:
    return d / e[name]


def heatmap_wrong_size(d, e):
    _map(d, e).write_bytes(_png(np.zeros((20, 20), np.uint8), "L"))


def heatmap_rgb(d, e):
    a = np.asarray(Image.open(_map(d, e)))
    _map(d, e).write_bytes(_png(np.stack([a] * 3, -1)))


def heatmap_16bit(d, e):
    a = np.asarray(Image.open(_map(d, e))).astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")  # mode I;16
    _map(d, e).write_bytes(buf.getvalue())


def heatmap_jpeg(d, e):  # mode 'L' and decodes, but lossy: not the format's PNG
    buf = io.BytesIO()
    Image.open(_map(d, e)).save(buf, format="JPEG", quality=95)
    _map(d, e).unlink()
    e["implausibility_map"] = f"implausibility/{e['uid']}.jpg"
    _map(d, e).write_bytes(buf.getvalue())


def escaping_path(d, e):
    e["image"] = "../" + e["image"]


def image_min_side(d, e):  # exactly the smallest side allowed
    _write_image(d, e, _png(np.full((8, 40, 3), 128, np.uint8)), "png")


def heatmap_palette(d, e):
    buf = io.BytesIO()
    Image.open(_map(d, e)).convert("P").save(buf, format="PNG")
    _map(d, e).write_bytes(buf.getvalue())


def missing_image(d, e):
    _image_path(d, e).unlink()


def missing_heatmap(d, e):
    _map(d, e, "misalignment_map").unlink()


# --- manifest-level breakers: (entry) -> None (edit the dict) or bytes (the raw line to write)
def _scores(key: str, value):
    def f(e):
        e["scores"][key] = value
    return f


def empty_prompt(e):
    e["prompt"] = e["tagged_prompt"] = ""


def long_prompt(e):
    e["prompt"] = e["tagged_prompt"] = " ".join(["cat"] * 1250)  # 4,999 characters


def missing_field(e):
    del e["scores"]


def invalid_utf8(e):
    return json.dumps(e).encode().replace(b'"prompt": "', b'"prompt": "\xff\xfe', 1)


def bad_json(e):
    return json.dumps(e).encode()[:40]


# kind -> (breaker, level ("file"/"manifest"), stage, pattern)
KINDS: dict[str, tuple[Callable, str, str, str]] = {
    "truncated_jpeg": (truncated_jpeg, "file", "load", r"does not decode"),
    "zero_byte_image": (zero_byte_image, "file", "load", r"does not decode"),
    "image_rgba": (_convert_image("RGBA", "PNG", "png"), "file", "ok", ""),
    "image_cmyk": (_convert_image("CMYK", "JPEG", "jpg"), "file", "ok", ""),
    "image_grayscale": (_convert_image("L", "PNG", "png"), "file", "ok", ""),
    "image_webp": (_convert_image("RGB", "WEBP", "webp"), "file", "ok", ""),
    "image_min_side": (image_min_side, "file", "ok", ""),
    "image_1x1": (image_1x1, "file", "load", r"is 1×1, smaller than 8×8"),
    "decompression_bomb": (decompression_bomb, "file", "load", r"decompression bomb"),
    "heatmap_wrong_size": (heatmap_wrong_size, "file", "load", r"heatmaps differ in size"),
    "heatmap_rgb": (heatmap_rgb, "file", "load", r"mode 'RGB'"),
    "heatmap_16bit": (heatmap_16bit, "file", "load", r"mode 'I;16"),
    "heatmap_palette": (heatmap_palette, "file", "load", r"mode 'P'"),
    "heatmap_jpeg": (heatmap_jpeg, "file", "load", r"is a JPEG file; expected an 8-bit grayscale PNG"),
    "escaping_path": (escaping_path, "file", "load", r"leaves the split directory"),
    "missing_image": (missing_image, "file", "load", r"image file missing"),
    "missing_heatmap": (missing_heatmap, "file", "load", r"heatmap file missing"),
    "nan_score": (_scores("overall", float("nan")), "manifest", "manifest", r"not a finite number: nan"),
    "inf_score": (_scores("aesthetics", float("inf")), "manifest", "manifest", r"not a finite number: inf"),
    "score_out_of_range": (_scores("plausibility", 1.5), "manifest", "manifest", r"outside \[0, 1\]"),
    "empty_prompt": (empty_prompt, "manifest", "manifest", r"empty prompt"),
    "long_prompt": (long_prompt, "manifest", "manifest", r"4,999 characters, more than the limit of 2,048"),
    "missing_field": (missing_field, "manifest", "manifest", r"missing field 'scores'"),
    "invalid_utf8": (invalid_utf8, "manifest", "manifest", r"not valid UTF-8"),
    "bad_json": (bad_json, "manifest", "manifest", r"not valid JSON"),
    "duplicate_uid": (None, "manifest", "manifest", r"duplicate uid"),  # handled in build()
}
BAD_KINDS = [k for k, v in KINDS.items() if v[2] != "ok"]


def build(dst: str | Path, base: str | Path, kinds: list[str] | None = None, split: str = "train") -> dict[str, Case]:
    """Copy dataset ``base`` to ``dst`` and break one ``split`` record per kind (records 1, 2, ...; record
    0 stays good: ``duplicate_uid`` repeats its uid). Returns ``{kind: Case}``."""
    dst, base = Path(dst), Path(base)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(base, dst)
    d = dst / split
    lines = (d / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    kinds = list(KINDS) if kinds is None else list(kinds)
    if len(kinds) + 1 > len(entries):
        raise ValueError(f"{len(kinds)} kinds need at least {len(kinds) + 1} {split} records, got {len(entries)}")
    raw: dict[int, bytes] = {}
    cases = {}
    for i, kind in enumerate(kinds, 1):
        fn, level, stage, pattern = KINDS[kind]
        e = entries[i]
        cases[kind] = Case(kind, e["uid"], i + 1, stage, pattern)
        if kind == "duplicate_uid":
            e["uid"] = cases[kind].uid = entries[0]["uid"]
        elif level == "file":
            fn(d, e)
        else:
            out = fn(e)
            if isinstance(out, bytes):
                raw[i] = out
    with open(d / "manifest.jsonl", "wb") as f:
        for i, e in enumerate(entries):
            f.write(raw.get(i, json.dumps(e, ensure_ascii=False).encode("utf-8")) + b"\n")
    return cases
