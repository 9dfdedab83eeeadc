"""The RAHF training loss, shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import MAP_NAMES, SCORE_NAMES
from .config import LossConfig


class RAHFLoss(nn.Module):
    """w_h·Σ heatmap MSE + w_s·Σ score MSE + w_t·teacher-forced CE (label -100 ignored).

    With ``tag_weight`` != 1 the CE weights the positions whose target is the tag token (``batch
    ["tag_token_id"]``, set by the collator); with ``alignment_rank`` > 0 a pairwise ranking term over
    records of the same image is added (:meth:`alignment_rank_loss`, key ``rank_loss``); with a word
    head (``model.word_head``) the binary cross-entropy of its per-token logits against the word tags
    (``batch["word_tags"]``: 1 tagged, 0 not, -1 no word) is added with weight ``word_tags``
    (key ``word_loss``); with a scene head (``model.scene_head``) the soft cross-entropy of its
    per-patch logits against ``batch["scene_targets"]`` for the records of ``batch["scene_known"]``
    (object patches weighted by ``scene_object_weight``) is added with weight ``scene`` (key
    ``scene_loss``, :meth:`scene_loss`).
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
            labels = batch["labels"].reshape(-1)
            if self.cfg.tag_weight != 1.0 and "tag_token_id" in batch:
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100, reduction="none")
                w = (labels != -100).float() * (1.0 + (self.cfg.tag_weight - 1.0) * (labels == batch["tag_token_id"]).float())
                losses["text_loss"] = (ce * w).sum() / w.sum().clamp_min(1.0)
            else:
                losses["text_loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100)
        else:
            losses["text_loss"] = losses["score_loss"].new_zeros(())
        losses["loss"] = (self.cfg.heatmap * losses["heatmap_loss"] + self.cfg.score * losses["score_loss"]
                          + self.cfg.text * losses["text_loss"])
        if getattr(out, "word_logits", None) is not None and "word_tags" in batch:
            target = batch["word_tags"].to(out.word_logits.device)
            known = target >= 0
            bce = F.binary_cross_entropy_with_logits(out.word_logits, target.clamp_min(0).float(), reduction="none")
            losses["word_loss"] = (bce * known).sum() / known.sum().clamp_min(1)
            losses["loss"] = losses["loss"] + self.cfg.word_tags * losses["word_loss"]
        if getattr(out, "scene_logits", None) is not None and "scene_targets" in batch:
            losses["scene_loss"] = self.scene_loss(out.scene_logits, batch["scene_targets"].to(out.scene_logits.device),
                                                   batch["scene_known"].to(out.scene_logits.device),
                                                   self.cfg.scene_object_weight)
            losses["loss"] = losses["loss"] + self.cfg.scene * losses["scene_loss"]
        if self.cfg.alignment_rank > 0 and batch.get("uids"):
            losses["rank_loss"] = self.alignment_rank_loss(out.scores[:, SCORE_NAMES.index("alignment")].float(),
                                                           batch["scores"][:, SCORE_NAMES.index("alignment")].float(),
                                                           batch["uids"])
            losses["loss"] = losses["loss"] + self.cfg.alignment_rank * losses["rank_loss"]
        return losses

    @staticmethod
    def scene_loss(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
                   object_weight: float = 1.0) -> torch.Tensor:
        """Soft cross-entropy of the scene head: for each attribute of
        :data:`rahf.data.synth.SCENE_ATTRIBUTES` (its own softmax over its classes), against the
        patch's class shares; summed over attributes, a weighted mean over the patches of the records
        whose scene is known (``known`` (B,) bool): a patch weighs ``1 + (object_weight - 1) * c``, c
        the share of it covered by drawn objects. 0 when no record's scene is known."""
        from ..data.synth import SCENE_ATTRIBUTES

        if not bool(known.any()):
            return logits.sum() * 0.0
        logits, targets = logits[known].float(), targets[known].float()  # (B', N, C)
        w = 1.0 + (object_weight - 1.0) * (1.0 - targets[..., 0])  # class 0 of the first attribute: background
        total, start = logits.new_zeros(()), 0
        for names in SCENE_ATTRIBUTES.values():
            part = slice(start, start + len(names))
            ce = -(targets[..., part] * F.log_softmax(logits[..., part], dim=-1)).sum(-1)
            total = total + (ce * w).sum() / w.sum()
            start += len(names)
        return total

    @staticmethod
    def alignment_rank_loss(pred: torch.Tensor, target: torch.Tensor, uids, min_gap: float = 0.05,
                            scale: float = 20.0) -> torch.Tensor:
        """Mean over pairs of records of the same image (uid ``<uid>`` / ``<uid>~<k>``) whose alignment
        labels differ by at least ``min_gap`` of ``softplus(-scale * (pred_i - pred_j))``, i the better
        fitting prompt; 0 when the batch holds no such pair."""
        from ..swaps import group_key

        keys = [group_key(u) for u in uids]
        ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
        g = torch.tensor([ids[k] for k in keys], device=pred.device)
        same = g[:, None] == g[None, :]
        better = (target[:, None] - target[None, :]) >= min_gap
        pairs = same & better
        if not pairs.any():
            return pred.sum() * 0.0
        diff = pred[:, None] - pred[None, :]
        return F.softplus(-scale * diff[pairs]).mean()
