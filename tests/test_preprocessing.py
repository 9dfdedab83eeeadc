"""Known inputs give known tensors, and a model with hand-set heads gives known outputs.

* Preprocessing: a hand-made image through ``image_to_tensor``, the torch dataset (training and
  evaluation) and the scorer gives the values worked out from its pixels — resize, the configured
  backbone's mean/std, RGB channel order — and the dataset and the scorer agree exactly.
* Outputs: a model whose score heads end in a known bias and whose heatmap heads end in a known
  pattern must give those scores, and those maps (upsampled in the head, then to the image's own
  size), through the scorer, ``rahf predict``, the evaluation loop and the eval report (the model is
  ``known_model.py``'s).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from rahf import RAHF, RAHFScorer
from rahf.cli import main
from rahf.data.format import SplitWriter, open_dataset, write_dataset_info
from rahf.data.torch_data import RAHFCollator, RAHFTorchDataset, image_to_tensor, resize_map
from rahf.schema import SCORE_NAMES, load_image

from known_model import SET_SCORES, at_size, known_maps, model_map, tiny_config

A, B = (200, 100, 50), (10, 20, 240)  # two colours whose channels all differ (an RGB/BGR swap shows)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ODD = ((0.1, 0.2, 0.3), (0.5, 0.25, 0.125))


def normalised(rgb, mean, std) -> np.ndarray:
    """The expected (3,) tensor value of a pixel: (value / 255 − mean) / std per channel, R, G, B."""
    return (np.array(rgb, np.float64) / 255.0 - np.array(mean)) / np.array(std)


def halves(w: int, h: int, left=A, right=B) -> Image.Image:
    """A w×h image: the left half one colour, the right half the other."""
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2:] = left, right
    return Image.fromarray(a)


# ----------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), IMAGENET, ODD])
def test_known_image_known_tensor(mean, std):
    x = image_to_tensor(halves(128, 128), 128, mean, std)
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32
    for cols, colour in ((slice(0, 64), A), (slice(64, 128), B)):
        want = torch.tensor(normalised(colour, mean, std), dtype=torch.float32).view(3, 1, 1)
        torch.testing.assert_close(x[:, :, cols], want.expand(3, 128, 64), rtol=0, atol=1e-6)
    # channel 0 is red: A is redder than B, and B bluer than A, whatever the normalisation
    assert x[0, 0, 0] > x[0, 0, 127] and x[2, 0, 0] < x[2, 0, 127]


def test_resize_keeps_orientation_and_flat_regions():
    mean, std = IMAGENET
    # 200 wide × 100 high, squashed to 128 × 128: left half A, right half B (no transposition, no flip)
    x = image_to_tensor(halves(200, 100), 128, mean, std)
    a = torch.tensor(normalised(A, mean, std), dtype=torch.float32).view(3, 1, 1)
    b = torch.tensor(normalised(B, mean, std), dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(x[:, :, :58], a.expand(3, 128, 58), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[:, :, 70:], b.expand(3, 128, 58), rtol=0, atol=1e-6)
    edge = x[0, 64, 58:70]  # the boundary is blended (bicubic), monotone from A's red to B's
    assert a[0, 0, 0] + 0.05 >= edge.max() and edge.min() >= b[0, 0, 0] - 0.05 and edge[0] > edge[-1]
    # a top/bottom image upscaled 64 → 128 keeps its rows
    top = np.asarray(halves(64, 64)).transpose(1, 0, 2).copy()
    y = image_to_tensor(Image.fromarray(top), 128, mean, std)
    torch.testing.assert_close(y[:, :58, :], a.expand(3, 58, 128), rtol=0, atol=1e-6)
    torch.testing.assert_close(y[:, 70:, :], b.expand(3, 58, 128), rtol=0, atol=1e-6)


def keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The bicubic (Keys) kernel with a = −0.5, as PIL's BICUBIC filter uses."""
    t = np.abs(t)
    near = (a + 2) * t**3 - (a + 3) * t**2 + 1
    far = a * (t**3 - 5 * t**2 + 8 * t - 4)
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def test_upscale_is_bicubic_by_hand():
    """64 → 128 px: output column i samples the source at i / 2 − 0.25 with the four nearest source
    columns weighted by the cubic kernel (normalised), rounded to 8 bits, then normalised."""
    mean, std = IMAGENET
    x = image_to_tensor(halves(64, 64), 128, mean, std)
    src = np.where(np.arange(64) < 32, 0, 1)  # which colour each source column has
    want = np.empty((128, 3))
    for i in range(128):
        c = i / 2 - 0.25
        taps = np.arange(int(np.floor(c)) - 1, int(np.floor(c)) + 3)
        taps = taps[(taps >= 0) & (taps < 64)]  # PIL cuts the window at the border and renormalises
        w = keys_cubic(c - taps)
        v = (w[:, None] * np.array([A, B], float)[src[taps]]).sum(0) / w.sum()
        want[i] = normalised(np.clip(np.round(v), 0, 255), mean, std)
    got = x[:, 5].numpy().T  # one row, (128, 3)
    np.testing.assert_allclose(got, want, atol=1.01 / 255 / min(std))  # PIL's fixed-point weights: ±1 level


def test_resize_map_by_hand():
    m = np.zeros((6, 6), np.float32)
    m[0, 0], m[2, 2], m[4, 1] = 0.9, 0.45, 0.18  # one block's corner, another's corner, a third's centre
    down = resize_map(m, 2)  # area: means of 3×3 blocks
    np.testing.assert_allclose(down.numpy(), [[(0.9 + 0.45) / 9, 0], [0.18 / 9, 0]], atol=1e-7)
    up = resize_map(np.array([[0.0, 1.0]], np.float32).repeat(2, 0), 4)  # bilinear, align_corners=False
    np.testing.assert_allclose(up.numpy(), np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)), atol=1e-6)
    assert resize_map(m, None).shape == (6, 6)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """A dataset of three hand-made records (odd sizes; zero maps) and its ground-truth scores."""
    root = tmp_path_factory.mktemp("handmade")
    images = [halves(128, 128), halves(90, 60, B, A), halves(41, 77)]
    scores = [dict(zip(SCORE_NAMES, s)) for s in ([0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.5])]
    with SplitWriter(root, "test") as w:
        for i, (im, sc) in enumerate(zip(images, scores)):
            hm = np.zeros((im.height, im.width), np.float32)
            w.add(f"h{i}", "a red circle", "a red circle", sc, im, hm, hm)
    write_dataset_info(root, source="handmade")
    return root, images, scores


@pytest.mark.parametrize("mean,std", [IMAGENET, ODD])
def test_dataset_and_scorer_apply_the_configured_normalisation(handmade, mean, std):
    root, images, _ = handmade
    torch.manual_seed(0)
    model = RAHF(tiny_config(vision={"mean": mean, "std": std})).eval()
    v = model.config.vision
    split = open_dataset(root, "test")
    # as training and `rahf eval` build it from the model's config
    ds = RAHFTorchDataset(split, v.img_size, None, v.mean, v.std)
    scorer = RAHFScorer(model, device="cpu")
    for i, im in enumerate(images):
        from_ds = ds[i]["pixel_values"]
        from_scorer = scorer.prepare([load_image(split.path(i, "image"))], ["a red circle"])["pixel_values"][0]
        assert torch.equal(from_ds, from_scorer), i  # one preprocessing
        assert from_ds.shape == (3, 32, 32)
        left, right = (A, B) if i != 1 else (B, A)
        for cols, colour in ((slice(0, 12), left), (slice(20, 32), right)):
            want = torch.tensor(normalised(colour, mean, std), dtype=torch.float32).view(3, 1, 1)
            torch.testing.assert_close(from_ds[:, :, cols], want.expand(3, 32, 12), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- known outputs
def test_model_outputs_are_the_hand_set_values(known_ckpt):
    model, _ = known_ckpt
    n = model.config.heatmap_size
    scorer = RAHFScorer(model, device="cpu")
    out = scorer.forward([halves(64, 64), halves(50, 30, B, A)], ["a red circle", "two blue squares"])
    want = model_map(n)
    for b in range(2):
        np.testing.assert_allclose(out.heatmaps["implausibility"][b].numpy(), want, atol=1e-6)
        np.testing.assert_allclose(out.heatmaps["misalignment"][b].numpy(), want.T, atol=1e-6)
        np.testing.assert_allclose(out.scores[b].numpy(), [SET_SCORES[s] for s in SCORE_NAMES], atol=1e-6)


def test_scorer_returns_known_scores_and_maps_at_the_image_size(known_ckpt):
    model, _ = known_ckpt
    scorer = RAHFScorer(model, device="cpu")
    n = model.config.heatmap_size
    images = [halves(64, 64), np.zeros((30, 50, 3), np.uint8), halves(23, 71)]
    results = scorer.score(images, "a red circle", batch_size=2, decode=None)
    for r, (h, w) in zip(results, [(64, 64), (30, 50), (71, 23)]):
        assert r.scores == pytest.approx(SET_SCORES, abs=1e-6)
        want = at_size(model_map(n), h, w)
        np.testing.assert_allclose(r.implausibility, want, atol=1e-5)  # high at the left edge, not the top
        np.testing.assert_allclose(r.misalignment, at_size(model_map(n), w, h).T, atol=1e-5)


def test_predict_cli_and_evaluation_report_the_known_values(known_ckpt, handmade, tmp_path):
    model, ckpt = known_ckpt
    root, images, gt_scores = handmade
    split = open_dataset(root, "test")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(split.path(i, "image")), "prompt": "a red circle"}) + "\n"
                                for i in range(len(images))))
    assert main(["predict", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--out", str(tmp_path / "p"),
                 "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    n = model.config.heatmap_size
    for row, im in zip(rows, images):
        assert row["scores"] == pytest.approx(SET_SCORES, abs=1e-5)
        want = at_size(model_map(n), im.height, im.width)
        st = row["heatmaps"]["implausibility"]
        assert st["max"] == pytest.approx(want.max(), abs=1e-4) and st["mean"] == pytest.approx(want.mean(), abs=1e-4)
        assert st["area_gt_0.5"] == pytest.approx((want > 0.5).mean(), abs=1e-5)
    # the evaluation loop: ground-truth maps are all zero, so MSE is the mean square of the known map at
    # each image's stored size; the score loss is the mean squared distance to the hand-set scores
    from rahf.eval.evaluate import run_evaluation
    from rahf.model.loss import RAHFLoss

    ds = RAHFTorchDataset(split, model.config.vision.img_size, None, model.config.vision.mean, model.config.vision.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=RAHFCollator.for_model(model))
    metrics = run_evaluation(model, loader, decode=None, loss_fn=RAHFLoss(model.config.loss)).metrics
    mse = np.mean([(at_size(model_map(n), im.height, im.width) ** 2).mean() for im in images])
    assert metrics["heatmap/mse_gt0/implausibility"] == pytest.approx(mse, abs=1e-5)
    assert metrics["heatmap/mse_gt0/misalignment"] == pytest.approx(
        np.mean([(at_size(model_map(n), im.width, im.height).T ** 2).mean() for im in images]), abs=1e-5)
    per_score = {s: np.mean([(SET_SCORES[s] - g[s]) ** 2 for g in gt_scores]) for s in SCORE_NAMES}
    for s in SCORE_NAMES:
        assert metrics[f"loss/{s}_loss"] == pytest.approx(per_score[s], abs=1e-5), s
    assert metrics["loss/score_loss"] == pytest.approx(sum(per_score.values()), abs=1e-5)


def test_eval_report_shows_the_known_values(known_ckpt, tmp_path):
    """The eval report of the hand-set model: the MSE and CC it prints are those of the known maps against
    each record's ground truth, the PLCC of its constant scores is n/a with the reason, and the grids rank
    the record whose ground truth lies on the left edge (where the model marks) first."""
    from rahf.eval.evaluate import run_evaluation
    from rahf.eval.report import write_eval_report

    model, _ = known_ckpt
    h, w = 40, 60
    left, right = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    left[:, :6], right[:, -6:] = 1.0, 1.0
    with SplitWriter(tmp_path, "test") as sw:
        for uid, gt in (("on-the-left", left), ("on-the-right", right), ("nothing", np.zeros_like(left))):
            sw.add(uid, "a red circle", "a red circle", dict(zip(SCORE_NAMES, (0.5,) * 4)),
                   Image.new("RGB", (w, h), (128, 128, 128)), gt, np.zeros_like(gt))
    write_dataset_info(tmp_path, source="handmade")
    v = model.config.vision
    ds = RAHFTorchDataset(open_dataset(tmp_path, "test"), v.img_size, None, v.mean, v.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=RAHFCollator.for_model(model))
    ev = run_evaluation(model, loader, decode=None, examples=True, keep_maps=3)
    page = write_eval_report(ev, ds, tmp_path / "report", n_show=1).read_text()
    want = known_maps(model, h, w)["implausibility"]
    cc = {uid: np.corrcoef(want.ravel(), gt.ravel())[0, 1] for uid, gt in (("on-the-left", left), ("on-the-right", right))}
    assert cc["on-the-left"] > 0.5 > 0 > cc["on-the-right"]
    for uid in cc:  # each grid card names its record and the CC worked out here
        assert f"uid {uid} · implausibility CC {cc[uid]:.3f}" in page
    best, worst = page.index("Best by implausibility CC"), page.index("Worst by implausibility CC")
    assert best < page.index("uid on-the-left") < worst < page.index("uid on-the-right")
    # the heatmap table: MSE over the three maps, CC over the two non-empty ones
    mse = np.mean([((want - gt) ** 2).mean() for gt in (left, right, np.zeros_like(left))])
    row = re.search(r"<tr><td>implausibility</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[0] == f"{mse:.5f}" and cells[2] == f"{np.mean(list(cc.values())):.3f}"
    assert "n/a (constant predictions" in page  # the score PLCCs of a model that ignores its input
