"""The training loss (rahf.model.loss.RAHFLoss) against values computed by hand on tiny tensors.

Each expected number below is worked out in the comment next to it from the loss's definition
(``w_h·Σ heatmap MSE + w_s·Σ score MSE + w_t·CE``, positive pixels weighted), not read off the code.
"""

import math

import pytest
import torch

from rahf.model.config import LossConfig
from rahf.model.loss import RAHFLoss
from rahf.model.rahf_model import RAHFOutput
from rahf.schema import MAP_NAMES, SCORE_NAMES

IMP, MIS = MAP_NAMES  # ("implausibility", "misalignment")


def out_and_batch(logits=None, labels=None):
    """B=2 examples with 2×2 maps and 4 scores, chosen so that every error is a short fraction."""
    pred_imp = torch.tensor([[[0.5, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    gt_imp = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.5]]])
    pred_mis = torch.zeros(2, 2, 2)
    gt_mis = torch.zeros(2, 2, 2)
    gt_mis[1, 0, 0] = 1.0
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.5, 0.5]])
    gt_scores = torch.tensor([[0.0, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0]])
    out = RAHFOutput(heatmaps={IMP: pred_imp, MIS: pred_mis}, scores=scores, logits=logits)
    batch = {f"{IMP}_map": gt_imp, f"{MIS}_map": gt_mis, "scores": gt_scores}
    if labels is not None:
        batch["labels"] = labels
    return out, batch


# implausibility: squared errors .25, 0, 1, 0 | 0, 0, 0, .25 (positives: (0,0,0) and (1,1,1))
#   plain mean = 1.5 / 8 = 0.1875; positive weight 5: (5·.25 + 1 + 5·.25) / (2·5 + 6) = 3.5 / 16 = 0.21875
# misalignment: one positive pixel, error 1: plain 1/8 = 0.125; weighted 5 / (5 + 7) = 5/12
# scores (per column, mean over the batch): plausibility (.25 + 0)/2 = .125, alignment (0 + .25)/2 = .125,
#   aesthetics 0, overall (0 + .25)/2 = .125 → score_loss 0.375
HAND = {
    1.0: {"implausibility_loss": 0.1875, "misalignment_loss": 0.125},
    5.0: {"implausibility_loss": 0.21875, "misalignment_loss": 5 / 12},
}
PER_SCORE = {"plausibility": 0.125, "alignment": 0.125, "aesthetics": 0.0, "overall": 0.125}


@pytest.mark.parametrize("positive_weight", [1.0, 5.0])
def test_heatmap_and_score_terms_by_hand(positive_weight):
    cfg = LossConfig(heatmap=1.0, score=1.0, text=1.0, heatmap_positive_weight=positive_weight)
    losses = RAHFLoss(cfg)(*out_and_batch())
    want = HAND[positive_weight]
    for k, v in want.items():
        assert losses[k].item() == pytest.approx(v, abs=1e-7), k
    assert losses["heatmap_loss"].item() == pytest.approx(sum(want.values()), abs=1e-7)
    for s in SCORE_NAMES:
        assert losses[f"{s}_loss"].item() == pytest.approx(PER_SCORE[s], abs=1e-7), s
    assert losses["score_loss"].item() == pytest.approx(0.375, abs=1e-7)
    assert losses["text_loss"].item() == 0.0  # no logits: no text term
    assert losses["loss"].item() == pytest.approx(sum(want.values()) + 0.375, abs=1e-6)


def test_term_weights_multiply_their_terms():
    # heatmap 5/12 + 0.21875 = 0.6354166..; score 0.375; text: one valid position, logits (0, ln 3) with
    # label 0 → -log(1/4) = ln 4
    logits = torch.tensor([[[0.0, math.log(3.0)], [7.0, -7.0]], [[-3.0, 9.0], [1.0, 2.0]]])
    labels = torch.tensor([[0, -100], [-100, -100]])
    cfg = LossConfig(heatmap=2.0, score=3.0, text=0.5, heatmap_positive_weight=5.0)
    losses = RAHFLoss(cfg)(*out_and_batch(logits, labels))
    heat = 5 / 12 + 0.21875
    assert losses["text_loss"].item() == pytest.approx(math.log(4.0), abs=1e-6)
    want = 2.0 * heat + 3.0 * 0.375 + 0.5 * math.log(4.0)
    assert losses["loss"].item() == pytest.approx(want, abs=1e-6)
    # the defaults (tiny preset: 10 / 10 / 1, positive weight 5)
    d = RAHFLoss(LossConfig())(*out_and_batch(logits, labels))
    assert d["loss"].item() == pytest.approx(10 * heat + 10 * 0.375 + math.log(4.0), abs=1e-5)


def test_ignored_label_positions_do_not_count():
    # valid positions: (0, 0) label 1 with logits (0, 0) → ln 2; (1, 1) label 0 with logits (ln 3, 0) → ln(4/3)
    # mean over the 2 valid positions; the -100 positions carry huge wrong logits that must not count
    logits = torch.tensor([[[0.0, 0.0], [50.0, -50.0]], [[-50.0, 50.0], [math.log(3.0), 0.0]]])
    labels = torch.tensor([[1, -100], [-100, 0]])
    losses = RAHFLoss(LossConfig())(*out_and_batch(logits, labels))
    assert losses["text_loss"].item() == pytest.approx((math.log(2.0) + math.log(4 / 3)) / 2, abs=1e-6)
    # the same logits with the ignored positions relabelled to what the logits predict worst: ignored
    # positions change nothing, a real label there does
    moved = labels.clone()
    moved[0, 1] = 1
    assert RAHFLoss(LossConfig())(*out_and_batch(logits, moved))["text_loss"].item() > 30


def test_gradients_point_towards_the_targets():
    """Each term is minimised, not maximised: one step down the gradient moves every prediction towards
    its target (a term subtracted from the total would push its predictions away)."""
    logits = torch.zeros(2, 2, 2, requires_grad=True)
    labels = torch.tensor([[1, 0], [0, -100]])
    out, batch = out_and_batch(logits, labels)
    for t in (out.scores, *out.heatmaps.values()):
        t.requires_grad_(True)
    losses = RAHFLoss(LossConfig())(out, batch)
    losses["loss"].backward()
    # d loss / d score = w_s · 2 (pred − gt) / B
    want = 10.0 * 2 * (out.scores - batch["scores"]) / 2
    assert torch.allclose(out.scores.grad, want)
    for m in MAP_NAMES:
        diff = out.heatmaps[m] - batch[f"{m}_map"]
        assert (out.heatmaps[m].grad * diff >= 0).all() and (out.heatmaps[m].grad[diff != 0] != 0).all()
    # the CE gradient raises the logit of the label and leaves the ignored position alone
    g = logits.grad
    assert g[0, 0, 1] < 0 < g[0, 0, 0] and g[0, 1, 0] < 0 and g[1, 0, 0] < 0
    assert (g[1, 1] == 0).all()


def test_tag_weight_weights_the_tag_positions():
    # token 2 is the tag. Positions: (0, 0) label 2, logits (0, 0, 0) → CE ln 3; (0, 1) label 0, logits
    # (ln 3, 0, 0) → CE ln(5/3); (0, 2) ignored. Tag weight 3: (3·ln 3 + ln(5/3)) / 4
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [9.0, -9.0, 0.0]]])
    labels = torch.tensor([[2, 0, -100]])
    out, batch = out_and_batch(logits, labels)
    out.scores, out.heatmaps = out.scores[:1], {m: h[:1] for m, h in out.heatmaps.items()}
    batch = {**{k: v[:1] for k, v in batch.items()}, "labels": labels, "tag_token_id": 2}
    plain = (math.log(3.0) + math.log(5 / 3)) / 2
    assert RAHFLoss(LossConfig())(out, batch)["text_loss"].item() == pytest.approx(plain, abs=1e-6)
    weighted = RAHFLoss(LossConfig(tag_weight=3.0))(out, batch)["text_loss"].item()
    assert weighted == pytest.approx((3 * math.log(3.0) + math.log(5 / 3)) / 4, abs=1e-6)
    # a tokenizer whose tag is several tokens (tag_token_id -1): no position is weighted
    other = RAHFLoss(LossConfig(tag_weight=3.0))(out, {**batch, "tag_token_id": -1})["text_loss"].item()
    assert other == pytest.approx(plain, abs=1e-6)


def test_alignment_rank_term_by_hand():
    # records 0 and 1 show one image ("u1" and its variant "u1~1"); record 1 fits its prompt worse
    # (alignment 0.5 < 0.9), so the pair (0, 1) counts: softplus(−20 · (0.6 − 0.55)) = ln(1 + e^−1).
    # Record 2 ("u2") has no partner.
    out = RAHFOutput(heatmaps={m: torch.zeros(3, 2, 2) for m in MAP_NAMES},
                     scores=torch.tensor([[0.5, 0.6, 0.5, 0.5], [0.5, 0.55, 0.5, 0.5], [0.5, 0.1, 0.5, 0.5]]))
    batch = {**{f"{m}_map": torch.zeros(3, 2, 2) for m in MAP_NAMES}, "uids": ["u1", "u1~1", "u2"],
             "scores": torch.tensor([[0.5, 0.9, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.5, 0.9, 0.5, 0.5]])}
    cfg = LossConfig(heatmap=0.0, score=0.0, text=0.0, alignment_rank=2.0)
    losses = RAHFLoss(cfg)(out, batch)
    assert losses["rank_loss"].item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)
    assert losses["loss"].item() == pytest.approx(2.0 * math.log(1 + math.exp(-1.0)), abs=1e-6)
    # a predicted order that agrees with the labels costs less than one that contradicts them
    swapped = RAHFOutput(heatmaps=out.heatmaps, scores=out.scores[[1, 0, 2]])
    assert RAHFLoss(cfg)(swapped, batch)["rank_loss"].item() == pytest.approx(math.log(1 + math.exp(1.0)), abs=1e-6)
    assert "rank_loss" not in RAHFLoss(LossConfig())(out, batch)  # off by default
