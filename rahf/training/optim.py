"""The optimizer and the learning-rate schedule: AdamW over decay / no-decay groups (the decoder at its
own learning rate), linear warm-up then cosine decay to ``optim.min_lr_ratio`` of the peak."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: decay / no-decay (1-D params), and the decoder at its own learning rate."""
    dec_lr = cfg.optim.decoder_lr or cfg.optim.lr
    decoder_ids = {id(p) for p in model.parts()["decoder"]}
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = dec_lr if id(p) in decoder_ids else cfg.optim.lr
        wd = 0.0 if p.ndim < 2 else cfg.optim.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


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
