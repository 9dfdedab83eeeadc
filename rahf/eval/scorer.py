"""``RAHFScorer``: load a checkpoint once and score images (scores, heatmaps, misaligned words).

Example::

    from rahf import RAHFScorer
    scorer = RAHFScorer.from_pretrained("runs/r/export")            # cuda if available, else cpu
    results = scorer.score(["a.png", "b.png"], "a yellow cat on a red mat")
    results[0].scores["overall"], results[0].implausibility.shape, results[0].misaligned_words

Preprocessing is the evaluation path's own (``image_to_tensor`` and ``RAHFCollator.tokenize_prompts``)
and inference is the one inference path (:func:`rahf.eval.predict.predict_batch`, constrained
decoding by default), so the numbers equal ``rahf eval``'s for the same image and prompt.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..schema import DECODE_MODES as SCHEMA_DECODE_MODES, MAP_NAMES, SCORE_NAMES, array_to_image
from ..schema import clean_prompt, load_image, parse_tagged
from ..data.torch_data import RAHFCollator, image_to_tensor
from .predict import DEFAULT_DECODE, Predictions, predict_batch

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray]
DECODE_MODES = SCHEMA_DECODE_MODES + (None,)


@dataclass
class ScoreResult:
    """One image's feedback. Heatmaps are float32 (H, W) in [0, 1] at the image's own size."""

    prompt: str
    scores: dict[str, float]
    implausibility: np.ndarray = field(repr=False)
    misalignment: np.ndarray = field(repr=False)
    tagged_prompt: Optional[str] = None
    misaligned_words: list[str] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # (width, height) of the input image

    @property
    def heatmaps(self) -> dict[str, np.ndarray]:
        return {"implausibility": self.implausibility, "misalignment": self.misalignment}

    # dict-like access (``r["scores"]``) for callers that prefer plain dicts
    def __getitem__(self, key: str):
        if key == "heatmaps":
            return self.heatmaps
        return getattr(self, key)

    def keys(self):
        return ["prompt", "scores", "implausibility", "misalignment", "tagged_prompt", "misaligned_words", "size"]

    def to_dict(self, heatmaps: bool = True) -> dict:
        d = {k: self[k] for k in self.keys()}
        if not heatmaps:
            d.pop("implausibility"), d.pop("misalignment")
        return d


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a PIL image, a file path, or a numpy array (HWC/HW/CHW; uint8 0–255 or
    float in [0, 1] — float arrays with values above 1 are read as 0–255)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return array_to_image(image)
    raise TypeError(f"unsupported image type {type(image).__name__}; give a PIL image, a path or a numpy array")


def _prompts_for(prompts: Union[str, Sequence[str]], n: int, clean: bool = True) -> list[str]:
    if isinstance(prompts, str):
        return [clean_prompt(prompts) if clean else prompts] * n
    prompts = list(prompts)
    if len(prompts) == 1 and n != 1:
        prompts = prompts * n
    if len(prompts) != n:
        raise ValueError(f"{n} images but {len(prompts)} prompts (give one prompt, or one per image)")
    return [clean_prompt(p) for p in prompts] if clean else prompts


def _batches(n: int, size: int) -> Iterable[slice]:
    size = max(1, int(size))
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


class RAHFScorer:
    """Batched inference with a trained :class:`rahf.model.RAHF` (weights loaded once)."""

    def __init__(self, model, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype if dtype not in (torch.float32, None) else None
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.collator = RAHFCollator.for_model(model)

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        dtype: Optional[torch.dtype] = None, *, revision: Optional[str] = None,
                        cache_dir: Optional[Union[str, os.PathLike]] = None, token: Optional[Union[str, bool]] = None,
                        local_files_only: Optional[bool] = None) -> "RAHFScorer":
        """Load a ``save_pretrained`` directory or a Hugging Face Hub repo id (``org/name``,
        ``org/name@revision``); the Hub arguments are :meth:`rahf.model.RAHF.from_pretrained`'s.
        ``dtype`` (e.g. ``torch.bfloat16``) runs under autocast."""
        from ..model import RAHF

        if isinstance(dtype, str):
            dtype = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                     "fp16": torch.float16, "float16": torch.float16}[dtype]
        model = RAHF.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                                     local_files_only=local_files_only)
        return cls(model, device=device, dtype=dtype)

    # ------------------------------------------------------------------ internals
    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str],
                originals: Optional[Sequence[str]] = None) -> dict:
        """Model inputs for PIL images and clean prompts (the evaluation path's preprocessing); the
        batch also carries the ``prompts`` (for constrained decoding). ``originals``: the prompts as
        written, which the encoder reads instead when the model's ``text.encoder_prompt`` is ``original``."""
        v = self.config.vision
        pixels = torch.stack([image_to_tensor(im, v.img_size, v.mean, v.std) for im in images])
        batch = {"pixel_values": pixels, **self.collator.tokenize_prompts(list(prompts), originals)}
        return {**{k: t.to(self.device) for k, t in batch.items()}, "prompts": list(prompts)}

    def predict(self, images: Sequence[Image.Image], prompts: Sequence[str],
                decode: Optional[str] = DEFAULT_DECODE, originals: Optional[Sequence[str]] = None) -> Predictions:
        """:func:`rahf.eval.predict.predict_batch` for one batch of PIL images and clean prompts
        (``originals``: see :meth:`prepare`)."""
        return predict_batch(self.model, self.prepare(images, prompts, originals), decode=decode,
                             autocast=self._autocast if self.dtype is not None else None)

    def forward(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        """Raw :class:`rahf.model.RAHFOutput` for one batch of PIL images and clean prompts."""
        return self.predict(images, prompts, decode=None).output

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def score(self, images: Union[ImageLike, Sequence[ImageLike]], prompts: Union[str, Sequence[str]],
              batch_size: int = 16, decode: Optional[str] = DEFAULT_DECODE, progress: bool = False) -> list[ScoreResult]:
        """Score images against prompts (one prompt for all images, or one per image).

        Returns one :class:`ScoreResult` per image: the four scores, both heatmaps upsampled
        (bilinear) to the image's own size, the tagged prompt and its misaligned words
        (``decode``: ``"constrained"`` — the prompt's own words, each tagged or not; ``"free"`` —
        greedy generation; ``None`` — skip). Images are loaded one batch at a time.
        """
        single = isinstance(images, (Image.Image, str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype != object)
        if single:
            images = [images]
        images = list(images)
        originals = _prompts_for(prompts, len(images), clean=False)
        prompts = _prompts_for(prompts, len(images))
        results: list[ScoreResult] = []
        from tqdm.auto import tqdm

        n_batches = (len(images) + max(1, batch_size) - 1) // max(1, batch_size)
        for sl in tqdm(list(_batches(len(images), batch_size)), desc="score", disable=not progress or n_batches < 2):
            pil = [to_pil(im) for im in images[sl]]
            ps = prompts[sl]
            pred = self.predict(pil, ps, decode=decode, originals=originals[sl])
            tagged = pred.tagged or [None] * len(ps)
            scores = pred.scores.cpu().numpy()
            maps = pred.heatmaps
            for j, im in enumerate(pil):
                w, h = im.size
                up = {m: F.interpolate(maps[m][j][None, None], size=(h, w), mode="bilinear", align_corners=False)
                      [0, 0].clamp_(0.0, 1.0).cpu().numpy().astype(np.float32) for m in MAP_NAMES}
                t = tagged[j]
                bad = [wd for wd, f in zip(*parse_tagged(t)) if f] if t else []
                results.append(ScoreResult(prompt=ps[j], scores={s: float(scores[j, k]) for k, s in enumerate(SCORE_NAMES)},
                                           implausibility=up["implausibility"], misalignment=up["misalignment"],
                                           tagged_prompt=t, misaligned_words=bad, size=(w, h)))
        return results

    @torch.no_grad()
    def embed(self, images: Union[ImageLike, Sequence[ImageLike]], prompts: Union[str, Sequence[str]],
              batch_size: int = 16, progress: bool = False) -> np.ndarray:
        """(N, d) float32: the fused T5-encoder states (image tokens + prompt tokens) mean-pooled over
        the attended positions. For the augmented-prompt variant, the mean over the task copies."""
        if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        images = list(images)
        prompts = _prompts_for(prompts, len(images))
        chunks = []
        from tqdm.auto import tqdm

        for sl in tqdm(list(_batches(len(images), batch_size)), desc="embed", disable=not progress):
            batch = self.prepare([to_pil(im) for im in images[sl]], prompts[sl])
            with self._autocast():
                hidden, mask, _, _ = self.model._encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                                        batch.get("task_ids"), batch.get("task_mask"))
            m = mask.to(hidden.dtype).float()[..., None]
            pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B', d)
            B = sl.stop - sl.start
            if pooled.shape[0] != B:  # augmented prompt: (T·B, d) → mean over tasks
                pooled = pooled.view(-1, B, pooled.shape[-1]).mean(0)
            chunks.append(pooled.cpu().numpy().astype(np.float32))
        d = self.config.text.d_model
        return np.concatenate(chunks, 0) if chunks else np.zeros((0, d), np.float32)
