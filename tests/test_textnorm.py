"""TextNorm softmax, its limits, ranking metrics vs hand computations / scipy, contrastive prompt rules."""

import math

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

import rahf.reward.textnorm as textnorm_module
from rahf.eval.metrics import ap_at_k, average_precision, kendall_tau, ranking_metrics, roc_auc, srcc
from rahf.reward.textnorm import RuleContrast, Vocabulary, contrast_sets, default_vocabulary, log_textnorm, textnorm


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
    np.testing.assert_allclose(textnorm([0.0], [[np.nan, np.nan]], 1.0), [1.0])  # no contrast: 1
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
def _diff(a: str, b: str) -> list[int]:
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb)  # the form (word count) is kept
    return [i for i, (x, y) in enumerate(zip(wa, wb)) if x != y]


def test_rules_change_exactly_the_targeted_word():
    p = "A photo of two red circles left of a big blue square"
    cs = RuleContrast(max_contrasts=0).contrasts(p)
    kinds = {c.kind for c in cs}
    assert kinds == {"colour", "count", "object", "size", "relation"}
    for c in cs:
        d = _diff(p, c.prompt)
        assert d and d == list(range(*c.span))[: len(d)] and set(d) <= set(range(*c.span))
        if c.kind != "relation":
            assert len(d) == 1
    words = p.split()
    counts = [c for c in cs if c.kind == "count"]
    assert [c.prompt.split()[3] for c in counts] == ["three"]  # plural numerals only, noun unchanged
    objs = [c.prompt.split()[5] for c in cs if c.kind == "object" and c.span == (5, 6)]
    assert objs and all(o.endswith("s") for o in objs)  # plural stays plural
    rel = [c.new for c in cs if c.kind == "relation"]
    assert set(rel) == {"right of", "next to"}  # two-word phrases for a two-word phrase
    assert p not in [c.prompt for c in cs] and len({c.prompt for c in cs}) == len(cs)
    assert words[:3] == ["A", "photo", "of"]


def test_case_punctuation_limits_and_generator_hook():
    cs = RuleContrast(kinds=("colour",), max_contrasts=0)("Red star, above.")
    assert all(c.split()[0][0].isupper() and c.endswith("star, above.") for c in cs) and len(cs) == 5
    g = RuleContrast(max_contrasts=3, seed=1)
    p = "two red circles above a blue square"
    assert g(p) == g(p) and len(g(p)) == 3 and len({RuleContrast(max_contrasts=3).contrasts(p)[i].kind for i in range(3)}) == 3
    v = default_vocabulary().extend(colours=["teal"], nouns={"cat": "cats"})
    assert "a teal cat" in RuleContrast(v, max_contrasts=0)("a red cat") and "a red circle" in RuleContrast(v, max_contrasts=0)("a red cat")
    assert Vocabulary.from_dict({"nouns": ["box"]}).nouns == {"box": "boxes"}
    assert contrast_sets(["x y"], generator=lambda s: [s, "y x", "y x"]) == [["y x"]]
