"""The RAHF training loss, shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import MAP_NAMES, SCORE_NAMES
from .config import LossConfig


class RAHFLoss(nn.Module):
    """w_h·Σ heatmap MSE + w_s·Σ score MSE + w_t·teacher-forced CE (label -100 ignored).

    Heatmap MSE is pixel-wise, optionally weighting pixels with ground truth > 0 by
    ``heatmap_positive_weight`` (weighted mean). Returns ``{"loss", "heatmap_loss", "score_loss",
    "text_loss", "<map>_loss", "<score>_loss"}`` (all scalars; ``loss`` is the one to backpropagate).
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def heatmap_mse(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        err = (pred.float() - gt.float()).pow(2)  # (B, H, W)
        if self.cfg.heatmap_positive_weight == 1.0:
            return err.mean()
        w = 1.0 + (self.cfg.heatmap_positive_weight - 1.0) * (gt > 0).float()
        return (err * w).sum() / w.sum()

    def forward(self, out, batch: dict) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for m in MAP_NAMES:
            losses[f"{m}_loss"] = self.heatmap_mse(out.heatmaps[m], batch[f"{m}_map"])
        per_score = (out.scores.float() - batch["scores"].float()).pow(2).mean(dim=0)  # (4,)
        for i, s in enumerate(SCORE_NAMES):
            losses[f"{s}_loss"] = per_score[i]
        losses["heatmap_loss"] = sum(losses[f"{m}_loss"] for m in MAP_NAMES)
        losses["score_loss"] = per_score.sum()
        if out.logits is not None and "labels" in batch:
            logits = out.logits.float()
            losses["text_loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                                  ignore_index=-100)
        else:
            losses["text_loss"] = losses["score_loss"].new_zeros(())
        losses["loss"] = (self.cfg.heatmap * losses["heatmap_loss"] + self.cfg.score * losses["score_loss"]
                          + self.cfg.text * losses["text_loss"])
        return losses
