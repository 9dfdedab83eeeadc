"""Tests for rahf.metrics: hand-computed values, scipy / numpy references, edge cases, aggregation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import entropy, pearsonr, spearmanr

import rahf.metrics as M
from rahf.data.format import MAP_NAMES, SCORE_NAMES
from rahf.metrics import (
    EPS,
    MetricAccumulator,
    auc_judd,
    cc,
    evaluate_predictions,
    format_tables,
    heatmap_metrics,
    keyword_counts,
    keyword_metrics,
    kld,
    mse,
    nss,
    plcc,
    sim,
    srcc,
)

PER_MAP = {"mse": mse, "cc": cc, "kld": kld, "sim": sim, "nss": nss, "auc_judd": auc_judd}


def auc_judd_reference(p: np.ndarray, g: np.ndarray) -> float:
    """Straightforward per-threshold AUC-Judd: one pass over the pixels per threshold."""
    p = np.asarray(p, dtype=np.float64).ravel()
    F = np.asarray(g).ravel() > 0
    K, N = int(F.sum()), p.size
    tpr, fpr = [0.0], [0.0]
    for t in np.unique(p[F])[::-1]:
        above = p >= t
        tpr.append(np.count_nonzero(above & F) / K)
        fpr.append(np.count_nonzero(above & ~F) / (N - K))
    tpr.append(1.0)
    fpr.append(1.0)
    return float(np.trapezoid(tpr, fpr))


def _t(x, dtype=torch.float32):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# hand-computed 2x2 example
#   p = [[.4, .3], [.2, .1]], g = [[.5, 0], [.5, 0]]  ->  F = {.4, .2}, K = 2, N = 4
# --------------------------------------------------------------------------------------------------
P22 = np.array([[[0.4, 0.3], [0.2, 0.1]]])
G22 = np.array([[[0.5, 0.0], [0.5, 0.0]]])


def test_hand_2x2_mse():
    # (.4-.5)^2 + .3^2 + (.2-.5)^2 + .1^2 = .01 + .09 + .09 + .01 = .2 -> / 4
    assert mse(_t(P22, torch.float64), _t(G22, torch.float64)).item() == pytest.approx(0.05, abs=1e-15)


def test_hand_2x2_cc():
    # pc = [.15, .05, -.05, -.15], gc = [.25, -.25, .25, -.25]
    # sum pc*gc = .05, sum pc^2 = .05, sum gc^2 = .25 -> cc = .05 / sqrt(.0125) = 1/sqrt(5)
    assert cc(_t(P22, torch.float64), _t(G22, torch.float64)).item() == pytest.approx(1 / math.sqrt(5), abs=1e-12)


def test_hand_2x2_nss():
    # std (ddof 1) = sqrt(.05 / 3); standardised p on F: .15/std, -.05/std -> mean .05/std = sqrt(.15)
    assert nss(_t(P22, torch.float64), _t(G22, torch.float64)).item() == pytest.approx(math.sqrt(0.15), abs=1e-12)


def test_hand_2x2_sim_kld():
    # sum p = 1, sum g = 1: P = p, G = g (up to eps). SIM = min(.4,.5) + min(.2,.5) = .6
    # KLD = .5 ln(.5/.4) + .5 ln(.5/.2) = .5 ln(3.125)
    p, g = _t(P22, torch.float64), _t(G22, torch.float64)
    assert sim(p, g).item() == pytest.approx(0.6, abs=1e-7)
    assert kld(p, g).item() == pytest.approx(0.5 * math.log(3.125), abs=1e-6)
    # exact formula with eps
    Pn = P22.ravel() / (1.0 + EPS)
    Gn = G22.ravel() / (1.0 + EPS)
    want = float(np.sum(Gn * np.log(Gn / (Pn + EPS) + EPS)))
    assert kld(p, g).item() == pytest.approx(want, abs=1e-12)


def test_hand_2x2_auc_judd():
    # t=.4: TPR 1/2, FPR 0; t=.2: TPR 1, FPR 1/2 (the .3 pixel). Points (0,0),(0,.5),(.5,1),(1,1)
    # area = .5 * (.5 + 1) / 2 + .5 * 1 = .875
    for dt in (torch.float32, torch.float64):
        assert auc_judd(_t(P22, dt), _t(G22, dt)).item() == pytest.approx(0.875, abs=1e-15)


def test_hand_auc_judd_ties():
    # p = [.5, .5, .5, .1], F = {0, 3}: t=.5: TPR 1/2, FPR 2/2 (both ties enter together); t=.1: (1, 1)
    # points (0,0), (1,.5), (1,1), (1,1) -> area .25
    p = np.array([[0.5, 0.5], [0.5, 0.1]])[None]
    g = np.array([[1.0, 0.0], [0.0, 1.0]])[None]
    for dt in (torch.float32, torch.float64, torch.float16):
        assert auc_judd(_t(p, dt), _t(g, dt)).item() == pytest.approx(0.25, abs=1e-15)
    assert auc_judd_reference(p, g) == pytest.approx(0.25, abs=1e-15)


def test_hand_auc_judd_non_f_values_are_not_thresholds():
    # p = [.9, .8, .7, .6], F = {.9, .6}: thresholds .9 -> (0, .5), .6 -> (1, 1); the non-F values
    # .8 and .7 are NOT thresholds. Area = 1 * (.5 + 1) / 2 = .75
    p = np.array([[[0.9, 0.8], [0.7, 0.6]]])
    g = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert auc_judd(_t(p), _t(g)).item() == pytest.approx(0.75, abs=1e-15)
    assert auc_judd_reference(p, g) == pytest.approx(0.75, abs=1e-15)


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------
def _random_maps(rng, b=8, h=17, w=13, levels=None, empty_rows=(), dtype=np.float32):
    p = rng.random((b, h, w)).astype(dtype)
    if levels:
        p = (np.round(p * levels) / levels).astype(dtype)
    g = (rng.random((b, h, w)) > 0.75) * rng.random((b, h, w))
    for i in empty_rows:
        g[i] = 0
    return p, g.astype(np.float32)


@pytest.mark.parametrize("levels", [None, 3, 10, 255])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auc_judd_matches_reference(levels, dtype):
    rng = np.random.default_rng(levels or 0)
    p, g = _random_maps(rng, b=10, levels=levels, dtype=dtype)
    got = auc_judd(torch.from_numpy(p), torch.from_numpy(g)).numpy()
    want = np.array([auc_judd_reference(p[i], g[i]) for i in range(len(p))])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_auc_judd_bfloat16_and_negative_and_signed_zero():
    rng = np.random.default_rng(5)
    p, g = _random_maps(rng, b=4, levels=7)
    p = p - 0.5  # negative values, and exact zeros
    p[0, 0, :3] = -0.0
    p[0, 1, :3] = 0.0
    g[0, 0, 0] = 1.0
    got = auc_judd(torch.from_numpy(p), torch.from_numpy(g)).numpy()
    want = np.array([auc_judd_reference(p[i], g[i]) for i in range(len(p))])
    np.testing.assert_allclose(got, want, atol=1e-12)
    pb = torch.from_numpy(p).to(torch.bfloat16)
    got_b = auc_judd(pb, torch.from_numpy(g)).numpy()
    want_b = np.array([auc_judd_reference(pb[i].float().numpy(), g[i]) for i in range(len(p))])
    np.testing.assert_allclose(got_b, want_b, atol=1e-12)


def test_cc_kld_nss_against_scipy_numpy():
    rng = np.random.default_rng(1)
    p, g = _random_maps(rng, b=6)
    p = p + 0.01  # strictly positive so scipy's entropy and our eps-KLD agree to O(eps)
    pt, gt = torch.from_numpy(p), torch.from_numpy(g)
    c, k, s, n = cc(pt, gt).numpy(), kld(pt, gt).numpy(), sim(pt, gt).numpy(), nss(pt, gt).numpy()
    for i in range(len(p)):
        pi, gi = p[i].ravel().astype(np.float64), g[i].ravel().astype(np.float64)
        assert c[i] == pytest.approx(pearsonr(pi, gi)[0], abs=1e-10)
        assert k[i] == pytest.approx(entropy(gi, pi), abs=1e-5)
        assert s[i] == pytest.approx(np.minimum(pi / pi.sum(), gi / gi.sum()).sum(), abs=1e-6)
        z = (pi - pi.mean()) / pi.std(ddof=1)
        assert n[i] == pytest.approx(z[gi > 0].mean(), abs=1e-10)


# --------------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------------
def test_empty_gt_is_nan_except_mse():
    p = torch.rand(3, 5, 5)
    g = torch.zeros(3, 5, 5)
    g[1, 2, 2] = 0.7
    for name, fn in PER_MAP.items():
        v = fn(p, g)
        assert v.shape == (3,) and v.dtype == torch.float64
        if name == "mse":
            assert torch.isfinite(v).all()
        else:
            assert torch.isnan(v[[0, 2]]).all(), name
            assert torch.isfinite(v[1]), name


def test_constant_prediction_no_warnings_no_nan():
    g = torch.zeros(4, 6, 6)
    g[:, 1:3, 1:3] = 0.5
    for value in (0.0, 0.1, 1.0 / 3.0, 1.0):
        p = torch.full((4, 6, 6), value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = heatmap_metrics(p, g)
        assert torch.equal(r["cc"], torch.zeros(4, dtype=torch.float64))
        assert torch.equal(r["nss"], torch.zeros(4, dtype=torch.float64))
        assert torch.allclose(r["auc_judd"], torch.full((4,), 0.5, dtype=torch.float64))
        for k in ("mse", "kld", "sim"):
            assert torch.isfinite(r[k]).all()
    # all-zero prediction: KLD large but finite, SIM 0
    p = torch.zeros(4, 6, 6)
    assert torch.isfinite(kld(p, g)).all() and (kld(p, g) > 10).all()
    assert torch.equal(sim(p, g), torch.zeros(4, dtype=torch.float64))


def test_constant_gt_and_full_gt():
    p = torch.rand(2, 4, 4)
    g = torch.full((2, 4, 4), 0.3)  # covers every pixel, constant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = heatmap_metrics(p, g)
    assert torch.equal(r["cc"], torch.zeros(2, dtype=torch.float64))
    assert torch.isnan(r["auc_judd"]).all()  # FPR undefined
    assert torch.isfinite(r["nss"]).all() and torch.isfinite(r["kld"]).all()
    assert r["nss"].abs().max() < 1e-12  # mean of the standardised map over all pixels


def test_single_pixel_maps():
    p = torch.tensor([[[0.3]], [[0.0]]])
    g = torch.tensor([[[1.0]], [[0.0]]])
    r = heatmap_metrics(p, g)
    assert r["nss"][0] == 0 and r["cc"][0] == 0 and torch.isnan(r["auc_judd"][0])
    assert all(torch.isnan(r[k][1]) for k in ("cc", "kld", "sim", "nss", "auc_judd"))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        cc(torch.rand(2, 4, 4), torch.rand(2, 4, 5))
    with pytest.raises(ValueError):
        cc(torch.rand(4), torch.rand(4))


# --------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------
def test_batched_equals_single(monkeypatch):
    rng = np.random.default_rng(2)
    p, g = _random_maps(rng, b=9, levels=20, empty_rows=(0, 4))
    g[5] = 0.2  # full coverage
    p[6] = 0.5  # constant
    pt, gt = torch.from_numpy(p), torch.from_numpy(g)
    full = heatmap_metrics(pt, gt)
    # force tiny chunks: several maps per chunk and one map per chunk
    monkeypatch.setattr(M, "_CHUNK_ELEMS", 2 * 17 * 13)
    monkeypatch.setattr(M, "_AUC_CHUNK_ELEMS", 3 * 17 * 13)
    chunked = heatmap_metrics(pt, gt)
    for name, fn in PER_MAP.items():
        single = torch.cat([fn(pt[i : i + 1], gt[i : i + 1]) for i in range(len(p))])
        torch.testing.assert_close(full[name], single, equal_nan=True, rtol=0, atol=1e-12)
        torch.testing.assert_close(chunked[name], single, equal_nan=True, rtol=0, atol=1e-12)
        torch.testing.assert_close(fn(pt, gt), single, equal_nan=True, rtol=0, atol=1e-12)


def test_accepts_numpy_and_flat_maps():
    rng = np.random.default_rng(3)
    p, g = _random_maps(rng, b=3)
    a = cc(p, g)
    b = cc(torch.from_numpy(p).reshape(3, -1), torch.from_numpy(g).reshape(3, -1))
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# score metrics
# --------------------------------------------------------------------------------------------------
def test_plcc_srcc_against_scipy():
    rng = np.random.default_rng(4)
    a = rng.random(50)
    b = a + 0.3 * rng.random(50)
    assert plcc(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(pearsonr(a, b)[0], abs=1e-12)
    assert srcc(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    # ties: average ranks like scipy
    at = np.round(a * 4) / 4
    bt = np.round(b * 3) / 3
    assert srcc(at, bt) == pytest.approx(spearmanr(at, bt)[0], abs=1e-12)
    assert isinstance(plcc(a, b), float) and isinstance(srcc(a, b), float)


def test_plcc_srcc_degenerate_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(plcc([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
        assert math.isnan(srcc([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
        assert math.isnan(plcc([1.0], [2.0]))
        assert math.isnan(srcc([], []))


# --------------------------------------------------------------------------------------------------
# keyword metrics
# --------------------------------------------------------------------------------------------------
TARGET = "a yellow_0 cat on a red_0 mat"


@pytest.mark.parametrize(
    "pred, want",
    [
        (TARGET, (2, 0, 0)),
        ("a yellow_0 cat on a red mat", (1, 0, 1)),
        ("a yellow cat on a red mat", (0, 0, 2)),
        ("a_0 yellow_0 cat on a red_0 mat", (2, 1, 0)),
        # deletion shifts words: cat_0 vs yellow_0 (wrong word) -> FP + FN; red_0 vs "a" -> FP;
        # target red_0 vs "mat" -> FN
        ("a cat_0 on a red_0 mat", (0, 2, 2)),
        # insertion shifts words the other way
        ("a big yellow_0 cat on a red_0 mat", (0, 2, 2)),
        # extra predicted words beyond the target: FP
        (TARGET + " extra_0 words", (2, 1, 0)),
        # missing words at the end: FN
        ("a yellow_0", (1, 0, 1)),
        ("", (0, 0, 2)),
        # right flag on a wrong word is not a TP
        ("a green_0 cat on a red_0 mat", (1, 1, 1)),
    ],
)
def test_keyword_counts(pred, want):
    assert tuple(keyword_counts(pred, TARGET)) == want


def test_keyword_counts_no_misaligned_words():
    assert tuple(keyword_counts("a cat", "a cat")) == (0, 0, 0)
    assert tuple(keyword_counts("a cat_0", "a cat")) == (0, 1, 0)
    assert tuple(keyword_counts("_0 cat", "_0 cat_0")) == (0, 0, 1)  # a bare "_0" is a word, not a tag


def test_keyword_metrics_pooled_and_per_prompt():
    preds = [TARGET, "a cat", "a yellow_0 cat on a red mat", "a dog_0"]
    targets = [TARGET, "a cat", TARGET, "a dog"]
    # counts: (2,0,0), (0,0,0), (1,0,1), (0,1,0) -> TP 3, FP 1, FN 1
    r = keyword_metrics(preds, targets)
    assert (r["tp"], r["fp"], r["fn"], r["n"]) == (3, 1, 1, 4)
    assert r["precision"] == pytest.approx(0.75) and r["recall"] == pytest.approx(0.75)
    assert r["f1"] == pytest.approx(0.75)
    # per prompt: P = [1, 0, 1, 0], R = [1, 0, .5, 0], F1 = [1, 0, 2/3, 0]
    assert r["per_prompt_precision"] == pytest.approx(0.5)
    assert r["per_prompt_recall"] == pytest.approx(0.375)
    assert r["per_prompt_f1"] == pytest.approx((1 + 2 / 3) / 4)


def test_keyword_metrics_degenerate():
    # nothing tagged, nothing to tag: every pooled rate is 0/0, undefined; per prompt scores 0
    r = keyword_metrics(["a cat", "a dog"], ["a cat", "a dog"])
    assert math.isnan(r["precision"]) and math.isnan(r["recall"]) and math.isnan(r["f1"])
    assert r["per_prompt_f1"] == 0.0
    # nothing tagged but targets have tags: precision undefined, recall and F1 = 0
    r = keyword_metrics(["a cat", "a dog"], ["a cat_0", "a dog"])
    assert math.isnan(r["precision"]) and r["recall"] == 0.0 and r["f1"] == 0.0
    # tags predicted, none in the targets: recall undefined, precision and F1 = 0
    r = keyword_metrics(["a cat_0"], ["a cat"])
    assert r["precision"] == 0.0 and math.isnan(r["recall"]) and r["f1"] == 0.0
    r = keyword_metrics([], [])
    assert math.isnan(r["f1"]) and r["n"] == 0
    with pytest.raises(ValueError):
        keyword_metrics(["a"], [])


def test_unavailable_metrics_have_reasons():
    acc = MetricAccumulator()
    true = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 0.2, 0.1, 0.3]], dtype=torch.float64)
    pred = true.clone()
    pred[:, 1] = 0.5123  # constant alignment predictions
    gt = torch.zeros(3, 4, 4)  # no non-empty ground truth at all
    acc.update(pred, true, {"implausibility": torch.rand(3, 4, 4)}, {"implausibility": gt},
               ["a cat", "a dog", "x"], ["a cat_0", "a dog", "x"])
    out = acc.compute()
    why = acc.unavailable(out)
    assert set(why) == {k for k, v in out.items() if math.isnan(v)}
    assert why["score/plcc/alignment"] == why["score/srcc/alignment"] == "constant predictions (all 0.5123)"
    assert math.isfinite(out["score/plcc/overall"]) and "score/plcc/overall" not in why
    for k in ("cc", "kld", "sim", "nss", "auc_judd"):
        assert why[f"heatmap/{k}/implausibility"] == "no example with a non-empty ground-truth map (all 3 are empty)"
    assert "heatmap/mse_gt0/implausibility" not in why
    assert why["keyword/precision"] == "no word tagged misaligned in the 3 predictions"
    assert out["keyword/recall"] == 0.0 and "keyword/recall" not in why
    # the tables say n/a with the reason; other cells keep their numbers
    text = format_tables(out, why)
    assert "n/a (constant predictions (all 0.5123))" in text
    assert "n/a (no word tagged misaligned in the 3 predictions)" in text
    assert f"{out['score/plcc/overall']:.3f}" in text and "nan" not in text
    # a ground truth covering every pixel: AUC-Judd alone is undefined
    acc = MetricAccumulator()
    acc.update(pred_maps={"implausibility": torch.rand(2, 3, 3)}, true_maps={"implausibility": torch.ones(2, 3, 3)})
    why = acc.unavailable()
    assert set(why) == {"heatmap/auc_judd/implausibility", "heatmap/mse_gt0/implausibility"}
    assert "covers the whole map" in why["heatmap/auc_judd/implausibility"]
    assert MetricAccumulator().unavailable() == {}


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
def _dataset(n=10, h=12, w=10, seed=7):
    rng = np.random.default_rng(seed)
    pred_scores = torch.from_numpy(rng.random((n, 4)))
    true_scores = pred_scores + 0.2 * torch.from_numpy(rng.random((n, 4)))
    pm, tm = {}, {}
    for j, name in enumerate(MAP_NAMES):
        p, g = _random_maps(rng, b=n, h=h, w=w, empty_rows=range(j, n, 3))
        pm[name], tm[name] = torch.from_numpy(p), torch.from_numpy(g)
    pt = [TARGET, "a cat", "a dog_0"] * (n // 3) + [TARGET] * (n % 3)
    tt = [TARGET, "a cat_0", "a dog_0"] * (n // 3) + [TARGET] * (n % 3)
    return pred_scores, true_scores, pm, tm, pt, tt


def test_evaluate_predictions_keys_and_values():
    ps, ts, pm, tm, pt, tt = _dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = evaluate_predictions(ps, ts, pm, tm, pt, tt)
    expected = {"count/n", "keyword/precision", "keyword/recall", "keyword/f1", "count/keyword_prompts"}
    expected |= {f"keyword_per_prompt/{m}" for m in ("precision", "recall", "f1")}
    expected |= {f"score/{k}/{s}" for k in ("plcc", "srcc") for s in SCORE_NAMES}
    for m in MAP_NAMES:
        expected |= {f"heatmap/{k}/{m}" for k in ("mse_all", "mse_gt0", "cc", "kld", "sim", "nss", "auc_judd")}
        expected |= {f"count/gt_nonempty/{m}", f"count/gt_empty/{m}", f"count/auc_judd/{m}"}
    assert set(out) == expected
    assert all(isinstance(v, float) for v in out.values())
    assert out["count/n"] == 10
    for j, s in enumerate(SCORE_NAMES):
        assert out[f"score/plcc/{s}"] == pytest.approx(pearsonr(ps[:, j].numpy(), ts[:, j].numpy())[0], abs=1e-12)
        assert out[f"score/srcc/{s}"] == pytest.approx(spearmanr(ps[:, j].numpy(), ts[:, j].numpy())[0], abs=1e-12)
    for name in MAP_NAMES:
        p, g = pm[name], tm[name]
        empty = ~(g > 0).flatten(1).any(1)
        m = mse(p, g)
        assert out[f"heatmap/mse_all/{name}"] == pytest.approx(m.mean().item(), abs=1e-15)
        assert out[f"heatmap/mse_gt0/{name}"] == pytest.approx(m[empty].mean().item(), abs=1e-15)
        assert out[f"heatmap/mse_gt0/{name}"] != pytest.approx(out[f"heatmap/mse_all/{name}"])
        assert out[f"count/gt_nonempty/{name}"] == (~empty).sum().item()
        assert out[f"count/gt_empty/{name}"] == empty.sum().item()
        for k in ("cc", "kld", "sim", "nss", "auc_judd"):
            want = PER_MAP[k](p[~empty], g[~empty]).mean().item()
            assert out[f"heatmap/{k}/{name}"] == pytest.approx(want, abs=1e-12)
            assert math.isfinite(out[f"heatmap/{k}/{name}"])
    kw = keyword_metrics(pt, tt)
    assert out["keyword/f1"] == kw["f1"] and out["keyword_per_prompt/f1"] == kw["per_prompt_f1"]


def test_evaluate_predictions_chunked_iterables_equal_full():
    ps, ts, pm, tm, pt, tt = _dataset(n=11)
    full = evaluate_predictions(ps, ts, pm, tm, pt, tt)
    def gen(v):  # a lazy iterator of chunks
        return (v[i : i + 4] for i in range(0, 11, 4))

    pc = {k: gen(v) for k, v in pm.items()}
    tc = {k: [v[i : i + 4] for i in range(0, 11, 4)] for k, v in tm.items()}
    chunked = evaluate_predictions(ps, ts, pc, tc, pt, tt)
    assert chunked.keys() == full.keys()
    for k in full:
        assert chunked[k] == pytest.approx(full[k], abs=1e-12, nan_ok=True), k
    # accumulator per batch, maps only for one name, no strings
    acc = MetricAccumulator()
    for i in range(0, 11, 5):
        acc.update(ps[i : i + 5], ts[i : i + 5], {"implausibility": pm["implausibility"][i : i + 5]},
                   {"implausibility": tm["implausibility"][i : i + 5]})
    out = acc.compute()
    assert not any("misalignment" in k or k.startswith("keyword") for k in out)
    for k in out:
        assert out[k] == pytest.approx(full[k], abs=1e-12), k


def test_evaluate_predictions_skips_nan_maps_and_no_nonempty():
    p = torch.rand(4, 5, 5)
    g = torch.zeros(4, 5, 5)
    out = evaluate_predictions(None, None, {"implausibility": p}, {"implausibility": g})
    assert math.isnan(out["heatmap/cc/implausibility"]) and out["count/gt_nonempty/implausibility"] == 0
    assert out["heatmap/mse_gt0/implausibility"] == pytest.approx(out["heatmap/mse_all/implausibility"])
    g[0] = 1.0  # full coverage: AUC-Judd NaN, skipped
    g[1, 0, 0] = 1.0
    out = evaluate_predictions(None, None, {"implausibility": p}, {"implausibility": g})
    assert out["count/gt_nonempty/implausibility"] == 2 and out["count/auc_judd/implausibility"] == 1
    assert out["heatmap/auc_judd/implausibility"] == pytest.approx(auc_judd(p[1:2], g[1:2]).item())


def test_evaluate_predictions_errors():
    p = torch.rand(2, 3, 3)
    with pytest.raises(ValueError):
        evaluate_predictions(torch.rand(2, 4), None, None, None)
    with pytest.raises(ValueError):
        evaluate_predictions(torch.rand(2, 3), torch.rand(2, 3), None, None)
    with pytest.raises(ValueError):
        evaluate_predictions(None, None, {"implausibility": p}, {"misalignment": p})
    with pytest.raises(ValueError):
        evaluate_predictions(None, None, {"implausibility": [p, p]}, {"implausibility": [p]})


def test_format_tables():
    ps, ts, pm, tm, pt, tt = _dataset()
    out = evaluate_predictions(ps, ts, pm, tm, pt, tt)
    text = format_tables(out)
    lines = text.splitlines()
    assert lines[0] == "| heatmap | MSE all | MSE GT=0 | CC | KLD | SIM | NSS | AUC-Judd |"
    assert lines[2].startswith("| implausibility | ") and lines[3].startswith("| misalignment | ")
    assert "| score | plausibility | aesthetics | alignment | overall |" in lines
    plcc_line = next(line for line in lines if line.startswith("| PLCC |"))
    cells = [c.strip() for c in plcc_line.strip("|").split("|")][1:]
    assert cells == [f"{out[f'score/plcc/{s}']:.3f}" for s in ("plausibility", "aesthetics", "alignment", "overall")]
    assert f"F1 {100 * out['keyword/f1']:.1f}" in text
    assert f"F1 {100 * out['keyword_per_prompt/f1']:.1f}" in text
    # partial dicts render without errors
    assert "PLCC" not in format_tables({"heatmap/cc/implausibility": 0.5})
    assert format_tables({}) == ""


def test_add_map_values_equals_update():
    ps, ts, pm, tm, pt, tt = _dataset(n=9)
    a = MetricAccumulator()
    a.update(ps, ts, pm, tm, pt, tt)
    b = MetricAccumulator()
    b.update(ps, ts, pred_tagged=pt, target_tagged=tt)
    for name in MAP_NAMES:
        for i in range(0, 9, 4):  # as gathered per-sample values (float64, gt_empty as 0/1)
            vals = heatmap_metrics(pm[name][i : i + 4], tm[name][i : i + 4])
            b.add_map_values(name, {k: v.double() for k, v in vals.items()})
    ra, rb = a.compute(), b.compute()
    assert ra.keys() == rb.keys()
    for k in ra:
        assert rb[k] == pytest.approx(ra[k], abs=1e-12, nan_ok=True), k
