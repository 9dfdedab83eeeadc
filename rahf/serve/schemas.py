"""The JSON schema of ``rahf serve``: request, response and error models (pydantic, no torch).

These models are the API's one definition: FastAPI validates requests against them and publishes
them in ``/openapi.json``. Limits that depend on the server's settings (items per request, body
size, image pixels) are checked by the app and reported by ``GET /v1/info``.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from ..schema import DECODE_MODES as _MODES, MAP_NAMES, MAX_PROMPT_CHARS, SCORE_NAMES, clean_prompt

OUTPUTS = ("scores", "heatmaps", "misaligned_words")
DECODE_MODES = _MODES + ("none",)
HEATMAP_FORMATS = ("png", "float")
MAX_HEATMAP_SIZE = 512

Output = Literal["scores", "heatmaps", "misaligned_words"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------ request
class ImagePath(_Request):
    """An image file on the server's disk; accepted only when the server was started with
    ``--allow-dir DIR``, and only inside DIR (relative paths are read from DIR)."""

    path: str = Field(min_length=1, max_length=4096, strict=True)


class ScoreItem(_Request):
    """One image and its prompt."""

    image: Union[str, ImagePath] = Field(
        description="the encoded image file (PNG, JPEG, WebP, ...) as base64, optionally as a "
                    "'data:image/...;base64,' URL; or {\"path\": ...} on a server started with --allow-dir")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, strict=True, description="the image's prompt (at least one word)")

    @field_validator("image", mode="before")
    @classmethod
    def _image_kind(cls, v):
        if isinstance(v, (str, dict, ImagePath)):
            return v
        raise ValueError('expected a base64-encoded image string or an object {"path": ...}')

    @field_validator("prompt")
    @classmethod
    def _has_words(cls, v: str) -> str:
        if not clean_prompt(v):
            raise ValueError("prompt has no words")
        return v


class ScoreOptions(_Request):
    """What to compute and return, for every item of the request."""

    outputs: list[Output] = Field(default_factory=lambda: ["scores", "misaligned_words"], min_length=1,
                                  description="any of 'scores', 'heatmaps', 'misaligned_words'")
    heatmap_format: Literal["png", "float"] = Field(
        "png", description="'png': 8-bit grayscale PNG (base64) at the image's own size; "
                           "'float': rows of floats in [0, 1], heatmap_size × heatmap_size")
    heatmap_size: int = Field(32, strict=True, ge=1, le=MAX_HEATMAP_SIZE, description="side of 'float' heatmaps")
    decode: Literal[DECODE_MODES] = Field(
        "constrained", description="misaligned words: 'constrained' (tag the prompt's own words), 'free' "
                                   "(greedy generation), 'word_head' (a word-head model's per-word "
                                   "probabilities) or 'none'")


class ScoreRequest(_Request):
    """``POST /v1/score``: items are answered in order."""

    items: list[ScoreItem] = Field(min_length=1)
    options: ScoreOptions = Field(default_factory=ScoreOptions)


# ------------------------------------------------------------------------------------ response
Scores = create_model("Scores", **{name: (float, ...) for name in SCORE_NAMES})
Scores.__doc__ = "The four scores, each in [0, 1]."


class Heatmap(BaseModel):
    """A heatmap in [0, 1]. ``png``: ``data`` is a base64 8-bit grayscale PNG (value = pixel / 255);
    ``float``: ``data`` is ``height`` rows of ``width`` floats."""

    format: Literal["png", "float"]
    width: int
    height: int
    data: Union[str, list[list[float]]]


Heatmaps = create_model("Heatmaps", **{name: (Heatmap, ...) for name in MAP_NAMES})
Heatmaps.__doc__ = "Both heatmaps of one image."


class ItemResult(BaseModel):
    """One item's answer. Fields not asked for in ``options.outputs`` are left out."""

    index: int = Field(description="the item's position in the request")
    prompt: str = Field(description="the clean prompt that was scored (the prompt's words, single-spaced)")
    size: tuple[int, int] = Field(description="the image's (width, height)")
    scores: Optional[Scores] = None
    tagged_prompt: Optional[str] = Field(None, description="the prompt with '_0' after each misaligned word")
    misaligned_words: Optional[list[str]] = None
    heatmaps: Optional[Heatmaps] = None


class ScoreResponse(BaseModel):
    results: list[ItemResult]


class ItemError(BaseModel):
    """One problem: ``item`` is the index of the bad item, or null for a problem with the request as a whole."""

    item: Optional[int] = None
    field: Optional[str] = Field(None, description="where in the item (or request) the problem is, e.g. 'image'")
    problem: str


class ErrorResponse(BaseModel):
    """Every error answer (4xx, 5xx) has this shape."""

    error: str = Field(description="a short code: invalid_request, body_too_large, unauthorized, queue_full, "
                                   "shutting_down, internal_error")
    detail: str
    errors: list[ItemError] = Field(default_factory=list)


class Health(BaseModel):
    status: Literal["ok", "draining", "stopped"]
    model_loaded: bool
    queue_depth: int = Field(description="items waiting for a forward pass")
    in_flight_items: int = Field(description="items in the forward pass now running")
    in_flight_requests: int = Field(description="score requests accepted and not yet answered")
    max_queue: int
    batches: int = Field(description="forward passes run since the server started")
    items_scored: int = Field(description="items scored since the server started")


class Limits(BaseModel):
    max_items: int
    max_body_bytes: int
    max_image_pixels: int
    min_image_side: int
    max_prompt_chars: int
    max_queue: int
    max_batch: int
    max_wait_ms: float
    allow_paths: bool


class Info(BaseModel):
    version: str
    checkpoint: str
    device: str
    dtype: str
    parameters: int
    score_names: list[str]
    map_names: list[str]
    config: dict = Field(description="the model's configuration (config.json)")
    metrics: Optional[dict] = Field(None, description="the checkpoint's metrics.json, when it has one")
    limits: Limits
