"""The package's one schema: output names, tasks, the misalignment tag, prompt words and record rules.

Everything that names a score or a map, splits a prompt into words, tags or parses a tagged prompt,
or decides whether an image or a heatmap file is acceptable imports it from here (the dataset
loader, the validator, the converters, the model, the metrics, the scorer and the server), so
there is one definition of each rule. No torch import.

Words: a caption is split on any of ``, . ? ! " : ;`` and whitespace, empty strings dropped; the
clean prompt is the words joined by single spaces. A tagged prompt appends :data:`TAG` (``_0``) to
each misaligned word: ``"a yellow_0 cat"``.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from PIL import Image

SCORE_NAMES: tuple[str, ...] = ("plausibility", "alignment", "aesthetics", "overall")
MAP_NAMES: tuple[str, ...] = ("implausibility", "misalignment")
TASKS: tuple[str, ...] = MAP_NAMES + SCORE_NAMES + ("keywords",)
"""Task order of the augmented-prompt variant (the task named in the encoder's text input)."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")
TAG = "_0"
MAX_PROMPT_CHARS = 2048  # longer prompts are bad records (the text encoder truncates far earlier)
MIN_IMAGE_SIDE = 8  # smaller images are bad records
BAD_RECORD_POLICIES = ("error", "skip")
DECODE_MODES: tuple[str, ...] = ("constrained", "free", "word_head")
"""How the tagged prompt is made (:mod:`rahf.eval.predict`); ``"none"`` / None: not at all."""

# Word rule: split the caption on any of , . ? ! " : ; and whitespace, dropping empty strings.
_WORD_SPLIT = re.compile(r'[,.?!":;\s]+')


class DataError(ValueError):
    """A problem with one record (or one file) of a dataset. The message names the record."""

    def __init__(self, uid: str | None, problem: str | None = None, where: str | None = None):
        if problem is None:  # DataError(message): how torch's DataLoader re-raises a worker's exception
            self.uid, self.problem, self.where = None, str(uid), None
            super().__init__(str(uid))
            return
        self.uid = uid
        self.problem = problem
        self.where = where
        loc = f" in {where}" if where else ""
        super().__init__(f"record {uid!r}{loc}: {problem}" if uid is not None else f"{where or 'dataset'}: {problem}")


def split_words(caption: str) -> list[str]:
    """Split a caption into words by the package's word rule (``, . ? ! " : ;`` and whitespace)."""
    return [w for w in _WORD_SPLIT.split(caption) if w]


def clean_prompt(caption: str) -> str:
    """The clean prompt: the caption's words joined by single spaces."""
    return " ".join(split_words(caption))


def tag_words(words: Sequence[str], misaligned: Sequence[bool]) -> str:
    """Join ``words`` with single spaces, appending ``_0`` to each misaligned word."""
    if len(words) != len(misaligned):
        raise ValueError(f"{len(words)} words but {len(misaligned)} labels")
    return " ".join(w + TAG if bad else w for w, bad in zip(words, misaligned))


def parse_tagged(tagged: str) -> tuple[list[str], list[bool]]:
    """Inverse of :func:`tag_words`: ``"a yellow_0 cat"`` -> (["a", "yellow", "cat"], [False, True, False])."""
    words, flags = [], []
    for tok in tagged.split():
        bad = tok.endswith(TAG) and len(tok) > len(TAG)
        words.append(tok[: -len(TAG)] if bad else tok)
        flags.append(bad)
    return words, flags


def misaligned_words(tagged: str | None) -> list[str]:
    """The words of a tagged prompt that carry the tag (``[]`` for ``None``)."""
    if not tagged:
        return []
    return [w for w, bad in zip(*parse_tagged(tagged)) if bad]


_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def error_text(e: BaseException) -> str:
    """An exception's message without object addresses (``<_io.BytesIO object at 0x7f...>``), so
    that error messages and reports are the same from run to run."""
    return _ADDRESS.sub("", str(e)).strip() or type(e).__name__


def _name(path) -> str:
    """How a message names a file: its directory and name as a manifest writes them (``misalignment/u.png``)."""
    if isinstance(path, (bytes, bytearray)):
        return "(bytes)"
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        return f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    return str(getattr(path, "name", "(stream)"))


def load_map(path: str | os.PathLike, uid: str | None = None) -> np.ndarray:
    """Read a heatmap file as float32 (H, W) in [0, 1] (pixel / 255). Errors name the record.

    The file must be a PNG (lossless; any other format is an error even when it decodes), not a
    decompression bomb (over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels, refused from the header), and
    2-D single-channel 8-bit grayscale (mode 'L'). The dataset loader and the validator both apply
    this one function."""
    name = _name(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise DataError(uid, f"heatmap {name} is a decompression bomb: it declares {w}×{h} pixels")
            if im.format != "PNG":
                raise DataError(uid, f"heatmap {name} is a {im.format or 'non-PNG'} file; expected an 8-bit "
                                     f"grayscale PNG")
            if im.mode != "L":
                raise DataError(uid, f"heatmap {name} has mode {im.mode!r}; expected 2-D single-channel "
                                     f"8-bit grayscale 'L'")
            im.load()
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(uid, f"heatmap file missing: {path}") from None
    except Image.DecompressionBombError as e:
        raise DataError(uid, f"heatmap {name} is a decompression bomb: {e}") from e
    except Exception as e:  # PIL raises many kinds
        raise DataError(uid, f"heatmap {name} does not decode: {error_text(e)}") from e
    return arr


def load_image(path: str | os.PathLike | bytes | BinaryIO, uid: str | None = None,
               min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Open an image file as PIL RGB, fully decoded. Errors name the record.

    ``path``: a file path, the encoded bytes, or a binary file object. Any mode is converted to RGB
    (RGBA/LA: alpha dropped). Images over ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused from
    their header, before decoding; images with a side under ``min_side`` (default
    :data:`MIN_IMAGE_SIDE`) are errors. The loader, the validator, the scorer and the server all
    apply this one function."""
    name = _name(path)
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path) as im:
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise DataError(uid, f"image {name} is a decompression bomb: it declares {w}×{h} = "
                                     f"{w * h:,} pixels, over the limit of {Image.MAX_IMAGE_PIXELS:,}")
            if min(w, h) < min_side:
                raise DataError(uid, f"image {name} is {w}×{h}, smaller than {min_side}×{min_side}")
            im.load()
            return im.convert("RGB")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(uid, f"image file missing: {path}") from None
    except Image.DecompressionBombError as e:
        raise DataError(uid, f"image {name} is a decompression bomb: {e}") from e
    except Exception as e:
        raise DataError(uid, f"image {name} does not decode: {error_text(e)}") from e


def array_to_image(array: np.ndarray) -> Image.Image:
    """A PIL RGB image from an array: HWC, HW or CHW (1, 3 or 4 channels; alpha dropped); uint8 as
    0–255; any other dtype read as [0, 1] floats (scaled by 255) unless its maximum is above 1 (then
    read as 0–255); NaN becomes 0. The scorer and the HTTP client both use this one rule."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot read an image from an array of shape {np.shape(array)}")
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")

