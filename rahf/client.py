"""``RAHFClient``: score images on a ``rahf serve`` server from Python (httpx, numpy and PIL; no torch).

Example::

    from rahf.client import RAHFClient
    with RAHFClient("http://127.0.0.1:8000") as client:
        results = client.score(["a.png", pil_image, array], "a yellow cat on a red mat",
                               outputs=("scores", "misaligned_words", "heatmaps"))
    results[0]["scores"]["overall"], results[0]["misaligned_words"], results[0]["heatmaps"]["implausibility"]

Images are what :meth:`rahf.RAHFScorer.score` takes — PIL images, file paths, numpy arrays (HWC,
HW or CHW; uint8, or floats in [0, 1]) — plus encoded image bytes. Files and bytes are sent as they
are; PIL images and arrays as lossless PNG. Connection errors and 503 answers are retried
(``retries`` times, waiting the server's ``Retry-After``, at most ``max_retry_wait`` seconds each);
4xx answers raise :class:`ServerError` with the server's list of bad items.
"""

from __future__ import annotations

import base64
import io
import os
import time
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ._extras import require
from .schema import array_to_image

httpx = require("httpx", "serve", "rahf.client")

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray, bytes]
DEFAULT_OUTPUTS = ("scores", "misaligned_words")


class ServerError(Exception):
    """An error answer from the server: ``status``, ``code`` (e.g. ``invalid_request``), ``detail``,
    and ``errors``: a list of ``{"item": index or None, "field": ..., "problem": ...}``."""

    def __init__(self, status: int, code: str, detail: str, errors: Optional[list] = None):
        self.status, self.code, self.detail, self.errors = status, code, detail, list(errors or [])
        lines = [f"HTTP {status} {code}: {detail}"]
        lines += [f"  item {e.get('item')}{' ' + e['field'] if e.get('field') else ''}: {e.get('problem')}"
                  for e in self.errors]
        super().__init__("\n".join(lines))


def encode_image(image: ImageInput) -> str:
    """The base64 text the server takes for one image."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            data = f.read()
    else:
        if isinstance(image, np.ndarray):
            image = array_to_image(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"unsupported image type {type(image).__name__}; give a PIL image, a path, a numpy "
                            f"array or encoded bytes")
        buf = io.BytesIO()
        (image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGB")).save(buf, "PNG", compress_level=1)
        data = buf.getvalue()
    return base64.b64encode(data).decode("ascii")


def decode_heatmap(h: dict) -> np.ndarray:
    """A heatmap of the response as float32 (H, W) in [0, 1]."""
    if h["format"] == "png":
        with Image.open(io.BytesIO(base64.b64decode(h["data"]))) as im:
            return np.asarray(im, dtype=np.float32) / 255.0
    return np.asarray(h["data"], dtype=np.float32).reshape(h["height"], h["width"])


def _is_single(images) -> bool:
    return isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object)


class RAHFClient:
    """A client of one ``rahf serve`` server (thread-safe: one connection pool, shared).

    ``batch_size``: most images per request (default: the server's ``max_items``, from ``/v1/info``)."""

    RETRY_STATUS = (502, 503, 504)

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 120.0, retries: int = 3,
                 max_retry_wait: float = 30.0, batch_size: Optional[int] = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.retries = max(0, int(retries))
        self.max_retry_wait = float(max_retry_wait)
        self._batch_size = max(1, int(batch_size)) if batch_size else None
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RAHFClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait(self, attempt: int, response: Optional[httpx.Response]) -> float:
        after = response.headers.get("Retry-After") if response is not None else None
        try:
            wait = float(after) if after is not None else 0.25 * 2 ** attempt
        except ValueError:
            wait = 0.25 * 2 ** attempt
        return min(max(wait, 0.0), self.max_retry_wait)

    def _request(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(self._wait(attempt, None))
                continue
            if r.status_code in self.RETRY_STATUS and not last:
                time.sleep(self._wait(attempt, r))
                continue
            if r.status_code >= 400:
                try:
                    body = r.json()
                except ValueError:
                    body = {}
                if not isinstance(body, dict):
                    body = {}
                raise ServerError(r.status_code, str(body.get("error", "error")),
                                  str(body.get("detail", r.text[:200])), body.get("errors"))
            return r.json()
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def batch_size(self) -> int:
        """Most images per request: as given, else the server's ``max_items`` (asked once)."""
        if self._batch_size is None:
            self._batch_size = int(self.info()["limits"]["max_items"])
        return self._batch_size

    # ------------------------------------------------------------------ API
    def health(self) -> dict:
        return self._request("GET", "/health")

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def score_raw(self, items: list[dict], options: Optional[dict] = None) -> list[dict]:
        """POST already-encoded items (``{"image": base64 or {"path": ...}, "prompt": ...}``); the
        server's per-item results, unchanged."""
        body = {"items": items, **({"options": options} if options else {})}
        return self._request("POST", "/v1/score", json=body)["results"]

    def score(self, images: Union[ImageInput, Sequence[ImageInput]], prompts: Union[str, Sequence[str]],
              outputs: Iterable[str] = DEFAULT_OUTPUTS, decode: Optional[str] = "constrained",
              heatmap_format: str = "png", heatmap_size: int = 32) -> list[dict]:
        """Score images against prompts (one prompt for all, or one per image), like ``RAHFScorer.score``.

        Returns one dict per image with ``prompt`` (the clean prompt), ``size`` ((width, height)) and
        what ``outputs`` asks for: ``scores`` (dict), ``tagged_prompt`` and ``misaligned_words``
        (unless ``decode`` is None), ``heatmaps`` (name → float32 numpy array: at the image's size
        for ``heatmap_format="png"``, ``heatmap_size``² for ``"float"``). Lists longer than
        ``batch_size`` (default: the server's ``max_items``) go in several requests."""
        if _is_single(images):
            images = [images]
        images = list(images)
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        prompts = list(prompts)
        if len(prompts) == 1 and len(images) != 1:
            prompts = prompts * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts (give one prompt, or one per image)")
        options = {"outputs": list(outputs), "decode": decode or "none", "heatmap_format": heatmap_format,
                   "heatmap_size": int(heatmap_size)}
        out: list[dict] = []
        n = self.batch_size if len(images) > 1 else 1
        for s in range(0, len(images), n):
            items = [{"image": encode_image(im), "prompt": p} for im, p in zip(images[s:s + n], prompts[s:s + n])]
            for r in self.score_raw(items, options):
                r.pop("index", None)
                r["size"] = tuple(r["size"])
                if "heatmaps" in r:
                    r["heatmaps"] = {k: decode_heatmap(v) for k, v in r["heatmaps"].items()}
                out.append(r)
        return out


__all__ = ["RAHFClient", "ServerError", "array_to_image", "decode_heatmap", "encode_image"]
