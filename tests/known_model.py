"""A small model whose heads are set by hand, so that every output is known without running it.

The score heads end in weight 0 and a bias, so each score is a chosen constant; the heatmap heads
end in a constant feature and a 3×3 conv that reads only one neighbour, so the implausibility map is
high on the first column and the misalignment map on the first row (where that neighbour is
padding), low elsewhere, whatever the image. :func:`model_map` and :func:`at_size` give those maps
by hand at the model's resolution and at any image size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rahf import RAHF, RAHFConfig
from rahf.schema import SCORE_NAMES

SET_SCORES = dict(zip(SCORE_NAMES, (0.2, 0.4, 0.6, 0.8)))
HIGH, LOW = 3.0, -3.0  # logits of the marked edge and of the rest


def tiny_config(**overrides) -> RAHFConfig:
    """A very small model: 32 px images (2×2 patches of 16), one layer per stack, narrow heads. Section
    overrides (``text={"tokenizer": "byt5"}``) update those sections; other keys (``variant``) are set."""
    cfg = {"vision": {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
           "text": {"d_model": 32, "d_kv": 8, "d_ff": 32, "num_heads": 4, "num_layers": 1, "num_decoder_layers": 1},
           "heatmap_head": {"stem_channels": [8], "up_channels": [8, 8], "final_channels": 8, "upsample": 2},
           "score_head": {"channels": [8], "mlp": [8]}}
    for k, v in overrides.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return RAHFConfig.preset("tiny", **cfg)


def hand_set(model: RAHF) -> RAHF:
    """Score head s ends in weight 0 and bias logit(SET_SCORES[s]); heatmap heads end in a constant 1
    feature and a 3×3 conv that reads only its left (implausibility) or upper (misalignment) neighbour,
    so their logits are HIGH on the first column (resp. row), where the neighbour is padding, and LOW
    elsewhere, whatever the input."""
    with torch.no_grad():
        for s, head in model.score_heads.items():
            head.mlp[-1].weight.zero_()
            head.mlp[-1].bias.fill_(math.log(SET_SCORES[s] / (1 - SET_SCORES[s])))
        for m, tap in (("implausibility", (1, 0)), ("misalignment", (0, 1))):
            first, last = model.heatmap_heads[m].out[0], model.heatmap_heads[m].out[2]
            first.weight.zero_()
            first.bias.fill_(1.0)
            last.weight.zero_()
            last.weight[0, 0, tap[0], tap[1]] = LOW - HIGH
            last.bias.fill_(HIGH)
    return model


def known_model() -> RAHF:
    """:func:`hand_set` on the :func:`tiny_config` model (seeded: the rest of the weights are fixed too)."""
    torch.manual_seed(0)
    return hand_set(RAHF(tiny_config())).eval()


def model_map(size: int) -> np.ndarray:
    """The implausibility map at the model's resolution, by hand: logits (HIGH, LOW, LOW, ...) per row at
    half resolution, bilinear ×2 (align_corners=False: column j reads source (j + 0.5) / 2 − 0.5, clamped
    to the edge) → HIGH, HIGH/2, LOW/2, LOW, LOW, ...; then the sigmoid. The misalignment map is its
    transpose."""
    row = np.full(size, LOW)
    row[:3] = [HIGH, (HIGH + LOW) / 2 + (HIGH - LOW) / 4, (HIGH + LOW) / 2 - (HIGH - LOW) / 4]
    return np.tile(1 / (1 + np.exp(-row)), (size, 1))


def at_size(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize (align_corners=False) of a map that varies along x only, by np.interp."""
    n = m.shape[1]
    src = (np.arange(w) + 0.5) * n / w - 0.5
    return np.tile(np.interp(src, np.arange(n), m[0]), (h, 1))


def known_maps(model: RAHF, h: int, w: int) -> dict[str, np.ndarray]:
    """Both maps of :func:`hand_set`'s model for an image of h × w pixels, by hand."""
    n = model.config.heatmap_size
    return {"implausibility": at_size(model_map(n), h, w), "misalignment": at_size(model_map(n), w, h).T}
