"""The optimizer and the learning-rate schedule: AdamW over decay / no-decay groups (the decoder and the
randomly initialised parts at their own learning rates), linear warm-up then cosine decay to
``optim.min_lr_ratio`` of the peak.

Learning rates by part (:meth:`rahf.model.RAHF.parts`): the parts the model creates itself — the
heatmap and score heads and the vision→text projection (:data:`NEW_PARTS`), which no pretrained
checkpoint provides — train at ``optim.head_lr``; the T5 decoder at ``optim.decoder_lr``; everything
else (the ViT, the T5 encoder, the shared embeddings) at ``optim.lr``. Unset (None), each of the two
is ``optim.lr``. The schedule scales every group by the same factor, so their ratios hold throughout.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig


#: The model's parts that start from random weights even when the encoders are pretrained.
NEW_PARTS: tuple[str, ...] = ("heads", "projection")


def part_learning_rates(cfg: TrainConfig) -> dict[str, float]:
    """The peak learning rate of each part that does not train at ``optim.lr``."""
    o = cfg.optim
    rates = {"decoder": o.decoder_lr if o.decoder_lr is not None else o.lr}
    rates.update({part: o.head_lr if o.head_lr is not None else o.lr for part in NEW_PARTS})
    return rates


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups by (learning rate, weight decay): each part at its rate (:func:`part_learning_rates`,
    ``optim.lr`` for the rest), 1-D parameters (biases, norms) without weight decay. Each group is named
    by its parts (``"name"``: e.g. ``"heads+projection"``, ``"vision+text_encoder+embeddings"``), in the
    order of ``model.named_parameters()`` (the ViT's group first)."""
    rates = part_learning_rates(cfg)
    part_of = {id(p): part for part, ps in model.parts().items() for p in ps}
    groups: dict[tuple, dict] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of[id(p)]
        lr = rates.get(part, cfg.optim.lr)
        wd = 0.0 if p.ndim < 2 else cfg.optim.weight_decay
        g = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd, "parts": []})
        g["params"].append(p)
        if part not in g["parts"]:
            g["parts"].append(part)
    return [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"], "name": "+".join(g["parts"])}
            for g in groups.values()]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The schedule's factor of the peak learning rate at optimizer step ``step`` (0-based)."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its :func:`lr_lambda` schedule. The scheduler is stepped by
    the trainer once per optimizer step (it is not passed to ``accelerate.prepare``, which would step it
    once per process)."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps, **({"fused": True} if cfg.optim.fused else {}))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
