"""TextNorm softmax, its limits, ranking metrics vs hand computations / scipy, contrastive prompt rules."""

import math

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

import rahf.reward.textnorm as textnorm_module
from rahf.eval.metrics import ap_at_k, average_precision, kendall_tau, ranking_metrics, roc_auc, srcc
from rahf.reward.textnorm import (FileContrasts, SwapContrast, contrast_sets, log_textnorm, pad_contrasts,
                                  restrict_contrasts, select_tau, textnorm)
from rahf.swaps import DEFAULT_SWAPS, SYNTH_SWAPS, word_swaps


# ------------------------------------------------------------------ the normalized reward
def test_textnorm_is_the_softmax_of_the_prompt():
    r, c = np.array([1.0, 0.2]), np.array([[0.0, 2.0], [0.2, -1.0]])
    for tau in (0.5, 1.0, 3.0):
        want = [math.exp(1 / tau) / (math.exp(1 / tau) + 1 + math.exp(2 / tau)),
                math.exp(0.2 / tau) / (2 * math.exp(0.2 / tau) + math.exp(-1 / tau))]
        np.testing.assert_allclose(textnorm(r, c, tau), want, rtol=1e-12)


def test_textnorm_limits_and_shift_invariance():
    r, c = np.array([1.0, 0.0, 3.0]), np.array([[0.5, 0.9], [1.0, 2.0], [3.0, 1.0]])
    np.testing.assert_allclose(textnorm(r, c, 1e-6), [1.0, 0.0, 0.5], atol=1e-12)  # tau -> 0: one-hot (ties share)
    np.testing.assert_array_equal(textnorm(r, c, 0.0), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(textnorm(r, c, 1e9), [1 / 3] * 3, rtol=1e-6)  # tau -> inf: uniform
    np.testing.assert_allclose(textnorm(r, c, np.inf), [1 / 3] * 3)
    for k in (-7.0, 123.0):
        np.testing.assert_allclose(textnorm(r + k, c + k, 0.3), textnorm(r, c, 0.3), rtol=1e-12)


def test_textnorm_is_stable_and_handles_ragged_sets():
    r, c = np.array([1000.0]), np.array([[999.0, np.nan]])  # exp(1000) overflows naively
    np.testing.assert_allclose(textnorm(r, c, 0.01), [1 / (1 + math.exp(-100))])
    np.testing.assert_allclose(log_textnorm([1e4], [[0.0]], 1e-3), [0.0], atol=1e-300)
    # no contrast: undefined (not 1), at every tau
    for tau in (0.0, 1.0, np.inf):
        assert np.isnan(textnorm([0.0, 0.0], [[np.nan, np.nan], [1.0, np.nan]], tau)[0])
    with pytest.raises(ValueError):
        textnorm([0.0, 1.0], [[0.0]], 1.0)


# ------------------------------------------------------------------ metrics
def test_roc_auc_and_ap_by_hand():
    s = [0.9, 0.8, 0.7, 0.6, 0.5]
    y = [1, 0, 1, 0, 0]
    assert roc_auc(s, y) == pytest.approx(5 / 6)  # pairs (pos, neg): 3 + 2 won of 6
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts 1/2
    assert math.isnan(roc_auc([1, 2], [1, 1]))
    assert average_precision(s, y) == pytest.approx((1 / 1 + 2 / 3) / 2)
    # ties form one threshold: both tied at the top -> precision 1/2 at recall 1/2
    assert average_precision([1, 1, 0], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert ap_at_k(s, y, 1) == pytest.approx(1.0)
    assert ap_at_k(s, y, 2) == pytest.approx(1 / 2)  # one hit in top 2, normalised by min(2, 2)
    assert ap_at_k(s, y, 3) == pytest.approx((1 + 2 / 3) / 2)
    assert ap_at_k(s, y, 100) == pytest.approx(average_precision(s, y))


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 6, 40).astype(float)  # many ties
        b = (rng.random(40) < 0.5).astype(float)
        assert srcc(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
        assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)
        c = rng.normal(size=40)
        assert kendall_tau(c, a) == pytest.approx(kendalltau(c, a).statistic, abs=1e-12)
    # by hand: pairs of (1, 2, 3) vs (1, 3, 2): 2 concordant, 1 discordant, no ties -> 1/3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau([1], [2]))
    m = ranking_metrics([3, 2, 1, 0], [1, 1, 0, 0], ks=(2,))
    assert m["auroc"] == 1 and m["auprc"] == 1 and m["ap@2"] == 1 and m["kendall"] == pytest.approx(kendalltau([3, 2, 1, 0], [1, 1, 0, 0]).statistic)
    assert m["spearman"] == pytest.approx(spearmanr([3, 2, 1, 0], [1, 1, 0, 0]).statistic)


def test_textnorm_reexports_the_one_implementation():
    import rahf.eval.metrics as metrics

    for name in ("roc_auc", "average_precision", "ap_at_k", "kendall_tau", "ranking_metrics"):
        assert getattr(textnorm_module, name) is getattr(metrics, name)
    assert textnorm_module.spearman is metrics.srcc and textnorm_module.METRIC_NAMES == metrics.RANKING_METRICS


# ------------------------------------------------------------------ contrastive prompts
def test_swap_contrasts_come_from_rahf_swaps():
    g = SwapContrast(max_contrasts=3, seed=2)
    p = "two red circles left of a big blue square"
    assert g(p, key="u1") == [s.prompt for s in word_swaps(p, "u1", 3, DEFAULT_SWAPS, seed=2)]
    assert g(p, key="u1") == g(p, key="u1") and len(g(p, key="u1")) == 3
    every = SwapContrast(max_contrasts=0)("a red apple")
    assert "an orange apple" in every and "a orange apple" not in every  # the article is fixed
    # natural prompts get contrasts with the default vocabulary, none with the synth one
    assert SwapContrast()("a cat on a sofa") and not SwapContrast("synth")("a cat on a sofa")
    assert len(SwapContrast("synth", kinds=("colour",), max_contrasts=0)("a red star")) == len(SYNTH_SWAPS.colours) - 1
    with pytest.raises(ValueError, match="vocabulary"):
        SwapContrast("nope")


def test_contrast_file_and_callables(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"uid": "a", "contrasts": ["x", "y", "x"]}\n{"prompt": "p q", "contrasts": ["q p", "p q"]}\n')
    fc = FileContrasts(f)
    # by uid first, then by prompt; the prompt itself and duplicates dropped; unknown -> none
    assert contrast_sets(["p q", "p q", "zz"], fc, keys=["a", "b", "c"]) == [["x", "y"], ["q p"], []]
    (tmp_path / "bad.jsonl").write_text('{"uid": "a", "contrasts": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        FileContrasts(tmp_path / "bad.jsonl")
    assert contrast_sets(["x y"], generator=lambda s: [s, "y x", "y x"]) == [["y x"]]


def test_pairs_without_contrasts_are_excluded_and_counted():
    sets, keep = restrict_contrasts([["a", "b", "c"], [], ["d"]])
    assert keep.tolist() == [True, False, True] and sets == [["a", "b", "c"], [], ["d"]]
    sets, keep = restrict_contrasts([["a", "b", "c"], [], ["d"]], fixed_k=2)
    assert keep.tolist() == [True, False, False] and sets == [["a", "b"], [], []]
    np.testing.assert_array_equal(pad_contrasts([[1.0], []]), [[1.0], [np.nan]])


def test_tau_is_selected_by_the_metric_on_dev():
    # aligned pair: 1 above 3 contrasts; misaligned pair: 0.5 above 1 contrast. tau=0.2:
    # e^5/(e^5+3) = 0.980 vs e^2.5/(e^2.5+1) = 0.924: AUROC 1. tau=100: ~1/4 vs ~1/2: AUROC 0.
    r, c, y = np.array([1.0, 0.5]), np.array([[0.0, 0.0, 0.0], [0.0, np.nan, np.nan]]), np.array([1, 0])
    tau, table = select_tau(r, c, y, [100.0, 0.2], ks=(1,))
    assert tau == 0.2 and table[0.2]["auroc"] == 1.0 and table[100.0]["auroc"] == 0.0
    # a pair without contrasts is ignored, and the first tau wins a tie
    tau, _ = select_tau(np.r_[r, 9.0], np.r_[c, [[np.nan] * 3]], np.r_[y, 0], [0.25, 0.2], ks=(1,))
    assert tau == 0.25


def test_cli_textnorm_selects_tau_on_dev_and_writes_examples(synth_root, ckpt, tmp_path, capsys):
    import json

    from rahf.cli import main

    out, ex = tmp_path / "tn.json", tmp_path / "ex.jsonl"
    assert main(["textnorm", "--checkpoint", str(ckpt), "--data", str(synth_root), "--vocab", "synth",
                 "--max-contrasts", "3", "--fixed-k", "3", "--tau", "0.05,1", "--batch-size", "16",
                 "--out", str(out), "--examples", str(ex)]) == 0
    res = json.loads(out.read_text())
    rows = [json.loads(line) for line in ex.read_text().splitlines()]
    assert res["dev_split"] == "dev" and res["tau"] in (0.05, 1.0) and len(rows) == res["counts"]["pairs"] == 16
    kept = [r for r in rows if r["included"]]
    assert len(kept) == res["counts"]["kept"] and res["counts"]["excluded"] == 16 - len(kept)
    for r in rows:
        if r["included"]:  # the written value is TextNorm of the written rewards at the chosen tau
            assert len(r["contrasts"]) == 3 == len(r["contrast_rewards"])
            want = textnorm([r["raw"]], [r["contrast_rewards"]], res["tau"])[0]
            assert r["textnorm"] == pytest.approx(want, rel=1e-9)
        else:
            assert r["textnorm"] is None
    best = max(res["dev_sweep"].values(), key=lambda m: m["auroc"])["auroc"]
    assert res["dev_sweep"][f"{res['tau']:g}"]["auroc"] == best
    assert "excluded for lack of contrasts" in capsys.readouterr().out
