"""Typed model configuration with named presets (``tiny``, ``paper``, ``large384``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..configtools import ConfigError, from_dict, merge, to_dict
from ..schema import MAP_NAMES, SCORE_NAMES  # noqa: F401  (re-exported for old imports)



@dataclass
class VisionConfig:
    """The timm ViT image encoder. Geometry (patch grid) is read from the built model, not parsed from names."""

    arch: str = "vit_base_patch16_224"  # timm architecture name; the kwargs below override its defaults
    img_size: int = 224
    patch_size: int = 16
    embed_dim: Optional[int] = None  # None: the architecture's own
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    drop_path_rate: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pretrained: Optional[str] = None  # local .safetensors file/dir, or a timm/hub name; loaded only when asked


@dataclass
class TextConfig:
    """The T5 encoder-decoder and its tokenizer."""

    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_decoder_layers: int = 12
    num_heads: int = 12
    dropout_rate: float = 0.1
    feed_forward_proj: str = "relu"
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    tokenizer: str = "words"  # "words" (built in, no file), "byt5" (no file), or a T5 tokenizer dir / hub name
    pretrained: Optional[str] = None  # local T5 dir or hub name; loaded only when asked
    max_prompt_tokens: int = 64
    max_target_tokens: int = 96


@dataclass
class HeatmapHeadConfig:
    """conv stem → stride-2 deconv stages (each followed by a residual pair of convs) → conv → 1 channel.

    Output size = patch grid × 2^len(up_channels) × upsample. ``upsample > 1`` predicts at a lower
    resolution and upsamples the logits bilinearly (cheap; the annotated maps are soft disks).
    """

    stem_channels: tuple[int, ...] = (768, 384)
    up_channels: tuple[int, ...] = (768, 384, 384, 192)
    final_channels: int = 192
    upsample: int = 1
    residual: bool = True


@dataclass
class ScoreHeadConfig:
    """3×3 convs through ``channels`` → flatten → MLP ``mlp`` → 1 → sigmoid."""

    channels: tuple[int, ...] = ()  # empty: d, d/2, d/4, d/8, d/16, d/64 of the T5 width d
    mlp: tuple[int, ...] = (512, 128)


@dataclass
class LossConfig:
    heatmap: float = 1.0
    score: float = 1.0
    text: float = 1.0
    heatmap_positive_weight: float = 1.0  # pixel weight where the ground truth is > 0 (1 = plain MSE)


@dataclass
class RAHFConfig:
    preset: str = "paper"
    variant: Literal["multi_head", "augmented_prompt"] = "multi_head"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    heatmap_head: HeatmapHeadConfig = field(default_factory=HeatmapHeadConfig)
    score_head: ScoreHeadConfig = field(default_factory=ScoreHeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    task_prompts: dict = field(default_factory=lambda: {
        "implausibility": "heatmap: implausibility",
        "misalignment": "heatmap: misalignment",
        "plausibility": "score: plausibility",
        "alignment": "score: alignment",
        "aesthetics": "score: aesthetics",
        "overall": "score: overall",
        "keywords": "keywords: misaligned",
    })

    # ---- derived geometry -------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.vision.img_size // self.vision.patch_size

    @property
    def heatmap_size(self) -> int:
        return self.grid_size * (2 ** len(self.heatmap_head.up_channels)) * self.heatmap_head.upsample

    # ---- presets and (de)serialisation --------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "RAHFConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        data = merge(PRESETS[name], {"preset": name})
        if overrides:
            data = merge(data, overrides)
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RAHFConfig":
        return from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RAHFConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> None:
        if self.vision.img_size % self.vision.patch_size:
            raise ConfigError(
                f"model.vision.img_size={self.vision.img_size} is not a multiple of patch_size={self.vision.patch_size}")
        if self.heatmap_head.upsample < 1:
            raise ConfigError("model.heatmap_head.upsample must be >= 1")
        for k in SCORE_NAMES + MAP_NAMES + ("keywords",):
            if self.variant == "augmented_prompt" and k not in self.task_prompts:
                raise ConfigError(f"model.task_prompts lacks an entry for {k!r}")
        if self.text.d_model % self.text.num_heads and self.text.d_kv * self.text.num_heads == 0:
            raise ConfigError("model.text: d_kv * num_heads must be positive")

    def replace(self, **kw) -> "RAHFConfig":
        return dataclasses.replace(self, **kw)


# Named head styles (overrides of ``heatmap_head``/``score_head``), absolute in channels; the output
# size of every style is patch grid × 16. "repro" is the public reproduction's heads;
# "light" predicts the heatmap at 1/4 size with few channels where the map is large, then upsamples
# the logits bilinearly ×4 (the annotated maps are soft disks of radius ~1/20 of the image), and
# narrows the score heads' convs. "light_heatmap": the light heatmap head with the reproduction's score heads.
_REPRO_HEATMAP = {"stem_channels": (768, 384), "up_channels": (768, 384, 384, 192), "final_channels": 192,
                  "upsample": 1, "residual": True}
_LIGHT_HEATMAP = {"stem_channels": (384,), "up_channels": (256, 128), "final_channels": 64, "upsample": 4,
                  "residual": True}
_REPRO_SCORE = {"channels": (), "mlp": (512, 128)}
_LIGHT_SCORE = {"channels": (256, 64, 16), "mlp": (512, 128)}
HEAD_STYLES: dict[str, dict] = {
    "repro": {"heatmap_head": _REPRO_HEATMAP, "score_head": _REPRO_SCORE},
    "light": {"heatmap_head": _LIGHT_HEATMAP, "score_head": _LIGHT_SCORE},
    "light_heatmap": {"heatmap_head": _LIGHT_HEATMAP, "score_head": _REPRO_SCORE},
}

PRESETS: dict[str, dict] = {
    # The tests' and the CPU main job's model: 128 px images, 8×8 patches, a 2+2 layer T5 of width 128.
    "tiny": {
        "vision": {"arch": "vit_tiny_patch16_224", "img_size": 128, "patch_size": 16, "embed_dim": 128,
                   "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
        "text": {"d_model": 128, "d_kv": 32, "d_ff": 256, "num_layers": 3, "num_decoder_layers": 2,
                 "num_heads": 4, "dropout_rate": 0.0, "max_prompt_tokens": 40, "max_target_tokens": 48},
        # Light heads: predict at 32×32 and upsample ×2 (2.3× fewer FLOPs than a full-resolution head;
        # the targets are soft disks).
        "heatmap_head": {"stem_channels": (64,), "up_channels": (32, 16), "final_channels": 16, "upsample": 2},
        "score_head": {"channels": (64, 32, 16, 8), "mlp": (128, 64)},
        # Synth maps are sparse and the CE term dominates at weights 1/1/1: weight heatmaps and
        # scores up and give positive pixels more weight.
        "loss": {"heatmap": 10.0, "score": 10.0, "text": 1.0, "heatmap_positive_weight": 5.0},
    },
    # The paper's size: ViT-B/16 at 224 px + T5-base.
    "paper": {
        "vision": {"arch": "vit_base_patch16_224", "img_size": 224, "patch_size": 16},
        "text": {"tokenizer": "t5-base", "vocab_size": 32128},
        # Light heads (6 vs 233 GFLOP per heatmap head per image; model.head_style=repro restores the
        # reproduction's): on synth, at the same step budget, the light style was no worse.
        "heatmap_head": _LIGHT_HEATMAP,
        "score_head": _LIGHT_SCORE,
    },
    # The public reproduction's best: ViT-L/16 at 384 px (24×24 patches) + T5-base.
    "large384": {
        "vision": {"arch": "vit_large_patch16_384", "img_size": 384, "patch_size": 16},
        "text": {"tokenizer": "t5-base", "vocab_size": 32128},
        # Light heads (6 vs 233 GFLOP per heatmap head per image; model.head_style=repro restores the
        # reproduction's): on synth, at the same step budget, the light style was no worse.
        "heatmap_head": _LIGHT_HEATMAP,
        "score_head": _LIGHT_SCORE,
    },
}
