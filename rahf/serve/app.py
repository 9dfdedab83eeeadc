"""The FastAPI app of ``rahf serve``: JSON in, JSON out, one model shared by every request.

``create_app(scorer, settings)`` builds the app around a loaded :class:`rahf.RAHFScorer`. A score
request is checked as a whole before anything is queued: the schema (pydantic), the item count,
then each item's image (base64 or an allowed path, decoded by :func:`rahf.schema.load_image`
after a header check against the server's pixel limit). Any bad item makes the whole request a
422 whose ``errors`` list every bad item by index with its problem; nothing of it is scored. Good
requests go to the :class:`~rahf.serve.batcher.Batcher`, which scores items of concurrent requests
together in one worker thread, so the event loop stays free to take requests and answer /health.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..schema import MAP_NAMES, MAX_PROMPT_CHARS, MIN_IMAGE_SIDE, SCORE_NAMES, DataError, load_image
from .batcher import Batcher, Closed, QueueFull
from .schemas import (ErrorResponse, Health, ImagePath, Info, ItemError, Limits, ScoreItem, ScoreOptions,
                      ScoreRequest, ScoreResponse)

log = logging.getLogger("rahf.serve")

_WHITESPACE = str.maketrans("", "", " \t\r\n")
_IMAGE_FIELD = TypeAdapter(ScoreItem.model_fields["image"].annotation)


@dataclass
class ServeSettings:
    """Limits and batching of one server. ``api_key``: the key itself (None: no authentication)."""

    checkpoint: str = ""
    dtype: str = "fp32"
    max_batch: int = 32
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_items: int = 64
    max_body_bytes: int = 32 * 2**20
    max_pixels: int = 4096 * 4096
    allow_dir: Optional[str] = None
    api_key: Optional[str] = None

    def __post_init__(self):
        if min(self.max_items, self.max_batch, self.max_queue, self.max_body_bytes, self.max_pixels) < 1:
            raise ValueError("max_items, max_batch, max_queue, max_body_bytes and max_pixels must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        # a request is queued whole, so the queue must hold the largest one
        self.max_queue = max(int(self.max_queue), int(self.max_items))
        if self.allow_dir is not None:
            d = Path(self.allow_dir).expanduser().resolve()
            if not d.is_dir():
                raise ValueError(f"--allow-dir {self.allow_dir}: not a directory")
            self.allow_dir = str(d)


class APIError(Exception):
    """An error answer in the :class:`ErrorResponse` shape."""

    def __init__(self, status: int, code: str, detail: str, errors: Sequence[ItemError] = (),
                 headers: Optional[dict] = None):
        self.status, self.code, self.detail, self.errors, self.headers = status, code, detail, list(errors), headers
        super().__init__(detail)

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.code, detail=self.detail, errors=self.errors)
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


class _ItemProblem(Exception):
    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(problem)


# ------------------------------------------------------------------------------------ body size
class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 in the API's error shape —
    at once when its Content-Length says so, else as soon as the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    def error(self) -> APIError:
        return APIError(413, "body_too_large", f"the request body is over this server's limit of "
                                               f"{self.max_bytes:,} bytes",
                        [ItemError(item=None, field="body", problem="request body too large")])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.error().response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413)  # FastAPI passes it on to the app's handler
            return message

        await self.app(scope, limited_receive, send)


# ------------------------------------------------------------------------------------ images
def _base64_bytes(text: str) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _ItemProblem("image", "a data URL must be 'data:<type>;base64,<data>'")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        wrapped = text.translate(_WHITESPACE)  # line-wrapped base64 (e.g. MIME's 76 columns) is fine too
        try:
            data = base64.b64decode(wrapped, validate=True) if wrapped != text else None
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            raise _ItemProblem("image", f"not valid base64 ({e})") from None
    if not data:
        raise _ItemProblem("image", "the image is empty")
    return data


def _resolve_path(path: str, allow_dir: Optional[str]) -> Path:
    if allow_dir is None:
        raise _ItemProblem("image.path", "this server takes no image paths (start it with --allow-dir DIR)")
    p = Path(path).expanduser()
    p = (p if p.is_absolute() else Path(allow_dir) / p).resolve()
    if not p.is_relative_to(allow_dir):
        raise _ItemProblem("image.path", "the path is outside the server's allowed directory")
    return p


def _declared_pixels(source) -> Optional[tuple[int, int]]:
    """The (width, height) an image file declares in its header, without decoding it (None: unreadable;
    :func:`load_image` then reports why)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.size
    except Exception:  # noqa: BLE001 - load_image names the problem
        return None


def decode_image(image, settings: ServeSettings) -> Image.Image:
    """One item's image as PIL RGB, or :class:`_ItemProblem` naming what is wrong with it."""
    source = _resolve_path(image.path, settings.allow_dir) if isinstance(image, ImagePath) else _base64_bytes(image)
    size = _declared_pixels(source)
    if size is not None and size[0] * size[1] > settings.max_pixels:
        w, h = size
        raise _ItemProblem("image", f"the image declares {w}×{h} = {w * h:,} pixels, over this server's limit "
                                    f"of {settings.max_pixels:,}")
    try:
        return load_image(source)
    except DataError as e:
        raise _ItemProblem("image", e.problem) from None


def decode_items(items: Sequence[Any], settings: ServeSettings, skip: frozenset = frozenset()):
    """Decode every item's image. Items are :class:`ScoreItem` or raw JSON values (then only the
    image is looked at: this completes the error list of a request that failed the schema).
    Returns (images, errors): images[i] is None where the item is bad or its index is in ``skip``."""
    images: list[Optional[Image.Image]] = [None] * len(items)
    errors: list[ItemError] = []
    for i, item in enumerate(items):
        if i in skip:
            continue
        if isinstance(item, ScoreItem):
            image = item.image
        else:
            try:
                image = _IMAGE_FIELD.validate_python(item["image"])
            except Exception:  # noqa: BLE001 - not an object with an image: its schema errors are listed
                continue
        try:
            images[i] = decode_image(image, settings)
        except _ItemProblem as p:
            errors.append(ItemError(item=i, field=p.field, problem=p.problem))
    return images, errors


# ------------------------------------------------------------------------------------ outputs
def heatmap_png(m: np.ndarray) -> dict:
    """An 8-bit grayscale PNG (base64) of a [0, 1] map; value = pixel / 255."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8), mode="L").save(buf, "PNG")
    return {"format": "png", "width": int(m.shape[1]), "height": int(m.shape[0]),
            "data": base64.b64encode(buf.getvalue()).decode("ascii")}


def heatmap_floats(m: np.ndarray, size: int) -> dict:
    """A [0, 1] map resampled to size × size by the package's map rule (area down, bilinear up)."""
    from ..data.torch_data import resize_map

    r = resize_map(m, size).numpy()
    return {"format": "float", "width": size, "height": size, "data": r.astype(float).tolist()}


def item_result(index: int, result, options: ScoreOptions, decoded: bool) -> dict:
    d: dict[str, Any] = {"index": index, "prompt": result.prompt, "size": list(result.size)}
    if "scores" in options.outputs:
        d["scores"] = dict(result.scores)
    if "misaligned_words" in options.outputs and decoded:
        d["tagged_prompt"] = result.tagged_prompt
        d["misaligned_words"] = list(result.misaligned_words)
    if "heatmaps" in options.outputs:
        maps = result.heatmaps
        d["heatmaps"] = {m: heatmap_png(maps[m]) if options.heatmap_format == "png"
                         else heatmap_floats(maps[m], options.heatmap_size) for m in MAP_NAMES}
    return d


# ------------------------------------------------------------------------------------ errors
def _item_error(err: dict) -> ItemError:
    """A pydantic error (FastAPI's ``loc`` starts with 'body') as an :class:`ItemError`."""
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err.get("type") == "json_invalid":
        return ItemError(item=None, field="body", problem=f"not valid JSON: {err.get('ctx', {}).get('error', msg)}")
    if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):
        rest = [str(x) for x in loc[2:]]
        return ItemError(item=loc[1], field=".".join(rest) or None, problem=msg)
    return ItemError(item=None, field=".".join(str(x) for x in loc) or "body", problem=msg)


def _invalid(errors: list[ItemError]) -> APIError:
    errors = sorted(errors, key=lambda e: (e.item is not None, e.item or 0))
    bad = sorted({e.item for e in errors if e.item is not None})
    detail = (f"{len(bad)} bad item{'s' if len(bad) != 1 else ''} (index {', '.join(map(str, bad))}); nothing was "
              f"scored" if bad else "invalid request; nothing was scored")
    return APIError(422, "invalid_request", detail, errors)


def _too_many(n: int, limit: int) -> ItemError:
    return ItemError(item=None, field="items", problem=f"{n} items; this server takes at most {limit} per request")


# ------------------------------------------------------------------------------------ app
def _model_info(scorer) -> tuple[str, int]:
    params = list(scorer.model.parameters())
    device = str(params[0].device) if params else "cpu"
    return device, sum(p.numel() for p in params)


def read_metrics(checkpoint: str) -> Optional[dict]:
    """The checkpoint's ``metrics.json`` (its directory, or a Hub repo's copy in the local cache), or None."""
    from ..model.hub import resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint, local_files_only=True) / "metrics.json"
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # not found / not cached / no metrics.json / not JSON
        return None
    return data if isinstance(data, dict) else None


def create_app(scorer, settings: Optional[ServeSettings] = None) -> FastAPI:
    """The scoring app around a loaded ``RAHFScorer``. The batcher's worker thread starts with the
    app (lifespan startup) and, at shutdown, finishes every queued item before it stops."""
    settings = settings or ServeSettings()
    device, n_params = _model_info(scorer)
    metrics = read_metrics(settings.checkpoint) if settings.checkpoint else None
    state: dict[str, Any] = {"batcher": None, "requests": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(scorer, settings.max_batch, settings.max_wait_ms, settings.max_queue)
        state["batcher"] = app.state.batcher = batcher
        try:
            yield
        finally:
            log.info("shutting down: finishing %d queued items", batcher.queue_depth + batcher.in_flight)
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="rahf", version=__version__, lifespan=lifespan,
                  description="Rich Automatic Human Feedback: scores, heatmaps and misaligned prompt words for "
                              "generated images. Every error answer has the ErrorResponse shape.")
    app.state.settings = settings
    app.state.scorer = scorer
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    # ---- errors: one shape for all of them
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            err = BodyLimit(None, settings.max_body_bytes).error()
        else:
            code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
            err = APIError(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
        return err.response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.error("%s %s failed: %r", request.method, request.url.path, exc)
        return APIError(500, "internal_error", f"the server failed on this request ({type(exc).__name__})").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [_item_error(e) for e in exc.errors()]
        body = getattr(exc, "body", None)
        items = body.get("items") if isinstance(body, dict) else None
        if request.url.path == "/v1/score" and isinstance(items, list):
            if len(items) > settings.max_items:
                errors.append(_too_many(len(items), settings.max_items))
            else:  # complete the list: the images of the items the schema let through
                bad = frozenset(e.item for e in errors
                                if e.item is not None and (e.field or "image").startswith("image"))
                _, more = await run_in_threadpool(decode_items, items, settings, bad)
                errors += more
        return _invalid(errors).response()

    # ---- authentication (only when the server has a key)
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <key>")

    async def require_key(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
                          api_key: Optional[str] = Depends(header_key)) -> None:
        given = credentials.credentials if credentials is not None else api_key
        if given is None or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key> "
                                                "or X-API-Key: <key>)", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_key)] if settings.api_key else []
    errors_doc = {s: {"model": ErrorResponse} for s in (401, 413, 422, 503)}

    # ---- routes
    @app.get("/health", response_model=Health, summary="liveness, queue depth and work in flight")
    async def health() -> Health:
        b: Optional[Batcher] = state["batcher"]
        alive = b is not None and b.alive
        status = "stopped" if not alive else "draining" if b.closing else "ok"
        return Health(status=status, model_loaded=alive, queue_depth=b.queue_depth if b else 0,
                      in_flight_items=b.in_flight if b else 0, in_flight_requests=state["requests"],
                      max_queue=settings.max_queue, batches=b.batches if b else 0,
                      items_scored=b.items_done if b else 0)

    @app.get("/v1/info", response_model=Info, dependencies=guarded, responses={401: {"model": ErrorResponse}},
             summary="the model, its checkpoint's metrics and this server's limits")
    async def info() -> Info:
        pixels = min(settings.max_pixels, Image.MAX_IMAGE_PIXELS or settings.max_pixels)
        return Info(version=__version__, checkpoint=settings.checkpoint, device=device, dtype=settings.dtype,
                    parameters=n_params, score_names=list(SCORE_NAMES), map_names=list(MAP_NAMES),
                    config=scorer.config.to_dict(), metrics=metrics,
                    limits=Limits(max_items=settings.max_items, max_body_bytes=settings.max_body_bytes,
                                  max_image_pixels=pixels,
                                  min_image_side=MIN_IMAGE_SIDE, max_prompt_chars=MAX_PROMPT_CHARS,
                                  max_queue=settings.max_queue, max_batch=settings.max_batch,
                                  max_wait_ms=settings.max_wait_ms, allow_paths=settings.allow_dir is not None))

    def _queue_full(batcher: Batcher, n: int) -> APIError:
        wait = batcher.retry_after(n)
        return APIError(503, "queue_full", f"the server is busy ({batcher.queue_depth} items queued, limit "
                                           f"{settings.max_queue}); retry after {wait} s",
                        headers={"Retry-After": str(wait)})

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, dependencies=guarded,
              responses=errors_doc, summary="score images against their prompts (answers in item order)")
    async def score(body: ScoreRequest) -> Any:
        batcher: Batcher = state["batcher"]
        items, options = body.items, body.options
        if len(items) > settings.max_items:
            raise _invalid([_too_many(len(items), settings.max_items)])
        if batcher.closing:
            raise APIError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "5"})
        if batcher.queue_depth + len(items) > settings.max_queue:  # refuse before spending time decoding
            raise _queue_full(batcher, len(items))
        images, errors = await run_in_threadpool(decode_items, items, settings)
        if errors:
            raise _invalid(errors)
        decode = options.decode if "misaligned_words" in options.outputs and options.decode != "none" else None
        if decode == "word_head" and getattr(scorer.model, "word_head", None) is None:
            raise _invalid([ItemError(item=None, field="options.decode",
                                      problem="'word_head' needs a model trained with a word head; this one has none")])
        try:
            future = batcher.submit(images, [it.prompt for it in items], decode)
        except QueueFull:
            raise _queue_full(batcher, len(items)) from None
        except Closed:
            raise APIError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "5"}) from None
        state["requests"] += 1
        try:
            results = await asyncio.wrap_future(future)
        finally:
            state["requests"] -= 1
        if "heatmaps" in options.outputs:  # PNG encoding / resampling: off the event loop
            out = await run_in_threadpool(lambda: [item_result(i, r, options, decode is not None)
                                                   for i, r in enumerate(results)])
        else:
            out = [item_result(i, r, options, decode is not None) for i, r in enumerate(results)]
        return {"results": out}

    return app


def settings_dict(settings: ServeSettings) -> dict:
    """The settings without the API key (for logs)."""
    d = asdict(settings)
    d["api_key"] = "(set)" if settings.api_key else None
    return d


def serve(scorer, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", graceful_timeout: Optional[float] = None) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM; in-flight requests are finished first."""
    import uvicorn

    app = create_app(scorer, settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                access_log=log_level == "debug")


__all__ = ["APIError", "ServeSettings", "create_app", "decode_image", "heatmap_floats", "heatmap_png", "read_metrics",
           "serve", "settings_dict"]
