"""Typed model configuration: named presets (``tiny``, ``paper``, ``large384``) and head styles.

``RAHFConfig()`` is the ``tiny`` preset: every field's default is the tiny model's, and the other
presets (:data:`PRESETS`) list only what differs from it.

Head styles
-----------
The heatmap and score heads come in named styles (:data:`HEAD_STYLES`: ``repro``, ``light``,
``light_heatmap``, ``tiny``). ``head_style`` records which style a config's heads are, or ``custom``
when they are none of them (edited by hand); it is saved in ``config.json``. In a settings dict (a
preset, the overrides of :meth:`RAHFConfig.preset`, :meth:`RAHFConfig.from_dict`, the ``model``
section of a training config) a named ``head_style`` sets both ``heatmap_head`` and ``score_head`` to
that style, and head keys given next to it apply on top; the config's ``head_style`` is then the
style the heads equal, or ``custom``. A ``config.json`` written before the field existed loads with
the style read off its heads. ``RAHFConfig(head_style=...)`` with heads of another style is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional

from ..configtools import ConfigError, from_dict, merge, to_dict
from ..schema import MAP_NAMES, SCORE_NAMES, TASKS  # noqa: F401  (MAP_NAMES, SCORE_NAMES re-exported for old imports)


VISION_STEMS = ("patch", "conv", "conv_ln")


@dataclass
class VisionConfig:
    """The timm ViT image encoder. Geometry (patch grid) is read from the built model, not parsed from names.

    Defaults: the tiny preset's ViT (4 blocks of width 128 at 128 px)."""

    arch: str = "vit_tiny_patch16_224"  # timm architecture name; the kwargs below override its defaults
    img_size: int = 128
    patch_size: int = 16
    embed_dim: Optional[int] = 128  # None: the architecture's own
    depth: Optional[int] = 4
    num_heads: Optional[int] = 4
    mlp_ratio: Optional[float] = 2.0
    drop_path_rate: float = 0.0
    # how pixels become patch tokens: "patch" (one linear map per patch, every pretrained ViT's) or "conv"
    # (log2(patch_size) stride-2 3x3 convolutions with BatchNorm and GELU, widths rising to embed_dim, then
    # the transformer blocks unchanged: a ViT with a convolutional stem, same patch grid); "conv_ln": the
    # same with LayerNorm over channels at each position (batch-independent, but it normalises away much of
    # a pixel's colour and brightness). A from-scratch ViT with a linear patch embedding does not learn
    # shapes at the tiny preset's budget; a conv stem does (docs/prompt_reading.md). Not loadable from
    # pretrained patch-embedding weights.
    stem: str = "patch"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # local .safetensors file/dir, a timm name or hf-hub:org/name (rahf.model.pretrained); its mean/std replace
    # the two above when the model is built from it
    pretrained: Optional[str] = None
    allow_resize: bool = False  # pretrained weights of another img_size/patch_size: resample them (else an error)


@dataclass
class TextConfig:
    """The T5 encoder-decoder and its tokenizer. Defaults: the tiny preset's 3+2 layer T5 of width 128."""

    d_model: int = 128
    d_kv: int = 32
    d_ff: int = 256
    num_layers: int = 3
    num_decoder_layers: int = 2
    num_heads: int = 4
    dropout_rate: float = 0.0
    feed_forward_proj: str = "relu"
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    tokenizer: str = "words"  # "words" (built in, no file), "byt5" (no file), or a T5 tokenizer dir / hub name
    # local T5 dir or Hub name (rahf.model.pretrained); its config.json's values replace the architecture
    # fields (vocab_size, sizes, feed_forward_proj, dropout_rate, the four below) when the model is built from it
    pretrained: Optional[str] = None
    max_prompt_tokens: int = 40
    max_target_tokens: int = 48
    # what the encoder reads: "clean" (the prompt's words) or "original" (the caption as written, where
    # the dataset keeps it: rahf.data.format); the decoder's target is the clean words either way
    encoder_prompt: Literal["clean", "original"] = "clean"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # true: T5 v1.0 (lm_head = the shared embedding, decoder output scaled by d_model**-0.5); false: T5 v1.1 /
    # Flan-T5 (an lm_head of its own, no scaling)
    tie_word_embeddings: bool = True


@dataclass
class HeatmapHeadConfig:
    """conv stem → stride-2 deconv stages (each followed by a residual pair of convs) → conv → 1 channel.

    Output size = patch grid × 2^len(up_channels) × upsample. ``upsample > 1`` predicts at a lower
    resolution and upsamples the logits bilinearly (cheap; the annotated maps are soft disks).
    Defaults: the ``tiny`` head style.
    """

    stem_channels: tuple[int, ...] = (64,)
    up_channels: tuple[int, ...] = (32, 16)
    final_channels: int = 16
    upsample: int = 2
    residual: bool = True


@dataclass
class ScoreHeadConfig:
    """3×3 convs through ``channels`` → flatten → MLP ``mlp`` → 1 → sigmoid. Defaults: the ``tiny`` head style."""

    channels: tuple[int, ...] = (64, 32, 16, 8)  # empty: d, d/2, d/4, d/8, d/16, d/64 of the T5 width d
    mlp: tuple[int, ...] = (128, 64)


@dataclass
class LossConfig:
    """Loss weights. Defaults: the tiny preset's. Synth maps are sparse and the CE term dominates at
    weights 1/1/1, so heatmaps and scores are weighted up and positive pixels get more weight."""

    heatmap: float = 10.0
    score: float = 10.0
    text: float = 1.0
    heatmap_positive_weight: float = 5.0  # pixel weight where the ground truth is > 0 (1 = plain MSE)
    tag_weight: float = 1.0  # cross-entropy weight of the target positions that hold the tag token (1 = plain CE)
    # pairwise alignment ranking within an image: for records of one image under different prompts
    # (grouped batches, rahf.training.grouping), a logistic loss on the difference of predicted
    # alignments, with this weight (0 = off)
    alignment_rank: float = 0.0
    # weight of the per-word tag loss (binary cross-entropy of the word head, model.word_head=true)
    word_tags: float = 1.0
    # weight of the scene loss (soft cross-entropy of the scene head per patch, model.scene_head=true)
    scene: float = 1.0
    # the scene loss's weight on a patch covered by drawn objects, relative to background (scaled by the
    # covered share): most patches are background, and shapes are learned only when objects weigh more
    scene_object_weight: float = 5.0


# Named head styles: both heads, absolute in channels; the output size of every style is patch grid × 16.
# "repro": the public reproduction's heads. "light": predicts the heatmap at 1/4 size with few channels
# where the map is large, then upsamples the logits bilinearly ×4 (the annotated maps are soft disks of
# radius ~1/20 of the image), and narrows the score heads' convs (6 vs 233 GFLOP per heatmap head per
# image at the paper's size; on synth, at the same step budget, no worse than "repro").
# "light_heatmap": the light heatmap head with the reproduction's score heads. "tiny": light heads sized
# for the tiny preset's width-128 T5 (predicts at 32×32, upsamples ×2; the field defaults).
HEAD_STYLES: dict[str, dict] = {
    "repro": {"heatmap_head": {"stem_channels": (768, 384), "up_channels": (768, 384, 384, 192), "final_channels": 192,
                               "upsample": 1, "residual": True},
              "score_head": {"channels": (), "mlp": (512, 128)}},
    "light": {"heatmap_head": {"stem_channels": (384,), "up_channels": (256, 128), "final_channels": 64, "upsample": 4,
                               "residual": True},
              "score_head": {"channels": (256, 64, 16), "mlp": (512, 128)}},
}
HEAD_STYLES["light_heatmap"] = {"heatmap_head": HEAD_STYLES["light"]["heatmap_head"],
                                "score_head": HEAD_STYLES["repro"]["score_head"]}
HEAD_STYLES["tiny"] = {"heatmap_head": dataclasses.asdict(HeatmapHeadConfig()),
                       "score_head": dataclasses.asdict(ScoreHeadConfig())}
CUSTOM_HEADS = "custom"  # the head_style of heads that are no named style


def head_style_of(heatmap_head, score_head) -> str:
    """The name of the style (:data:`HEAD_STYLES`) these heads are, or ``"custom"``."""
    heads = {"heatmap_head": to_dict(heatmap_head), "score_head": to_dict(score_head)}
    for name, style in HEAD_STYLES.items():
        if to_dict(style) == heads:
            return name
    return CUSTOM_HEADS


def expand_head_style(settings: Mapping) -> dict:
    """``settings`` (one layer of model settings) with a named ``head_style`` replaced by both heads of
    that style, the layer's own head keys applied on top (see the module docstring)."""
    out = dict(settings)
    style = out.pop("head_style", None)
    if style is None or style == CUSTOM_HEADS:
        return out
    if style not in HEAD_STYLES:
        raise ConfigError(f"model.head_style: unknown style {style!r}; choose from {sorted(HEAD_STYLES)}")
    for key, heads in HEAD_STYLES[style].items():
        given = to_dict(out.get(key, {}))
        out[key] = merge(heads, given) if isinstance(given, dict) else given
    return out


def preset_settings(name: str, overrides: Optional[Mapping] = None) -> dict:
    """The settings of preset ``name`` with ``overrides`` on top, head styles expanded (a dict that
    :func:`~rahf.configtools.from_dict` turns into a :class:`RAHFConfig`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    data = merge(expand_head_style(PRESETS[name]), {"preset": name})
    return merge(data, expand_head_style(overrides)) if overrides else data


def _task_prompts() -> dict:
    return {**{m: f"heatmap: {m}" for m in MAP_NAMES}, **{s: f"score: {s}" for s in SCORE_NAMES},
            "keywords": "keywords: misaligned"}


@dataclass
class RAHFConfig:
    """The model's configuration; the defaults are the ``tiny`` preset (``RAHFConfig() ==
    RAHFConfig.preset("tiny")``). ``RAHFConfig.preset(name, **overrides)`` builds a named preset."""

    preset: str = "tiny"
    variant: Literal["multi_head", "augmented_prompt"] = "multi_head"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head_style: Optional[str] = None  # a HEAD_STYLES name or "custom"; None: read off the heads
    heatmap_head: HeatmapHeadConfig = field(default_factory=HeatmapHeadConfig)
    score_head: ScoreHeadConfig = field(default_factory=ScoreHeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    task_prompts: dict = field(default_factory=_task_prompts)  # per task (TASKS order): the encoder's text
    # training a non-tiny preset without both pretrained encoders is refused unless this is set
    # (rahf.model.pretrained.check_random_init); loading a trained checkpoint never checks it
    allow_random_init: bool = False
    # a linear head on the fused prompt-token states that predicts, per prompt token, whether its word
    # is misaligned (trained with the tags, loss.word_tags): a dense image-text comparison signal for
    # the encoder (experimental, docs/prompt_reading.md); its logits are returned as ``word_logits``
    word_head: bool = False
    # a linear head on the image tokens as they enter the fusion (after the projection) that names, per
    # patch, the shape, colour and size word of what is drawn there (soft cross-entropy, loss.scene),
    # trained on synth training splits only, whose scenes the generator knows: it teaches the vision
    # encoder the words the prompt uses (docs/prompt_reading.md); logits returned as ``scene_logits``
    scene_head: bool = False
    # the score heads also read the fused prompt tokens: a small MLP on their masked mean and max adds
    # a logit to each score head's (zero at initialisation). The prompt tokens are where the word head
    # finds which words are misaligned; the alignment score is a function of those words
    score_text: bool = False

    def __post_init__(self):
        found = head_style_of(self.heatmap_head, self.score_head)
        if self.head_style is None or self.head_style == CUSTOM_HEADS:
            self.head_style = found
        elif self.head_style not in HEAD_STYLES:
            raise ConfigError(f"model.head_style: unknown style {self.head_style!r}; "
                              f"choose from {sorted(HEAD_STYLES)} or {CUSTOM_HEADS!r}")
        elif self.head_style != found:
            raise ConfigError(f"model.head_style={self.head_style!r}, but heatmap_head/score_head are not that "
                              f"style's ({found}); build the config with RAHFConfig.preset(..., "
                              f"head_style={self.head_style!r}) or from_dict, which apply the style")

    # ---- derived geometry -------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.vision.img_size // self.vision.patch_size

    @property
    def heatmap_size(self) -> int:
        return self.grid_size * (2 ** len(self.heatmap_head.up_channels)) * self.heatmap_head.upsample

    # ---- (de)serialisation (``RAHFConfig.preset`` is attached below the class) ----------
    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "RAHFConfig":
        """Build from a (possibly partial) settings dict; a named ``head_style`` is applied to the heads."""
        return from_dict(cls, expand_head_style(data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RAHFConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> None:
        if self.vision.img_size % self.vision.patch_size:
            raise ConfigError(
                f"model.vision.img_size={self.vision.img_size} is not a multiple of patch_size={self.vision.patch_size}")
        if self.vision.stem not in VISION_STEMS:
            raise ConfigError(f"model.vision.stem: unknown stem {self.vision.stem!r}; choose from {list(VISION_STEMS)}")
        if self.vision.stem != "patch":
            p = self.vision.patch_size
            if p < 2 or p & (p - 1):
                raise ConfigError(f"model.vision.stem={self.vision.stem} needs a power-of-two patch_size (one stride-2 convolution "
                                  f"per halving), got patch_size={p}")
            if self.vision.pretrained:
                raise ConfigError(f"model.vision.stem={self.vision.stem} cannot load model.vision.pretrained="
                                  f"{self.vision.pretrained!r}: pretrained ViTs have a linear patch embedding "
                                  f"(use stem=patch)")
        if self.heatmap_head.upsample < 1:
            raise ConfigError("model.heatmap_head.upsample must be >= 1")
        for k in TASKS:
            if self.variant == "augmented_prompt" and k not in self.task_prompts:
                raise ConfigError(f"model.task_prompts lacks an entry for {k!r}")
        if self.text.d_model % self.text.num_heads and self.text.d_kv * self.text.num_heads == 0:
            raise ConfigError("model.text: d_kv * num_heads must be positive")

    def replace(self, **changes) -> "RAHFConfig":
        """A copy with ``changes`` (settings or sub-configs) applied like an overrides layer."""
        base = self.to_dict()
        del base["head_style"]  # read off the resulting heads
        return type(self).from_dict(merge(base, expand_head_style({k: to_dict(v) for k, v in changes.items()})))


def _preset(cls, name: str, **overrides) -> RAHFConfig:
    """The named preset (:data:`PRESETS`), with ``overrides`` (nested settings) on top."""
    return from_dict(cls, preset_settings(name, overrides))


# Attached after @dataclass so that the ``preset`` field keeps its default ("tiny"); on an instance,
# ``config.preset`` is the field (the preset's name).
RAHFConfig.preset = classmethod(_preset)


_ARCH_OWN = {"embed_dim": None, "depth": None, "num_heads": None, "mlp_ratio": None}  # the timm architecture's
_T5_BASE = {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12,
            "dropout_rate": 0.1, "tokenizer": "t5-base", "vocab_size": 32128, "max_prompt_tokens": 64,
            "max_target_tokens": 96}
_PLAIN_LOSS = {"heatmap": 1.0, "score": 1.0, "text": 1.0, "heatmap_positive_weight": 1.0}

# Each preset: what differs from the field defaults (= tiny). Light heads are the default of the big
# presets (model.head_style=repro restores the reproduction's).
PRESETS: dict[str, dict] = {
    # The tests' and the CPU main job's model: 128 px images, 8×8 patches, a 3+2 layer T5 of width 128.
    "tiny": {},
    # The paper's size: ViT-B/16 at 224 px + T5-base.
    "paper": {"vision": {"arch": "vit_base_patch16_224", "img_size": 224, **_ARCH_OWN}, "text": _T5_BASE,
              "head_style": "light", "loss": _PLAIN_LOSS},
    # The public reproduction's best: ViT-L/16 at 384 px (24×24 patches) + T5-base.
    "large384": {"vision": {"arch": "vit_large_patch16_384", "img_size": 384, **_ARCH_OWN}, "text": _T5_BASE,
                 "head_style": "light", "loss": _PLAIN_LOSS},
}
