"""Concept-bottleneck aggregator on known cases."""

import json
import math

import numpy as np
import pytest

from rahf.reward.cbm import (TREES, Aggregator, binarize, class_weights, controlled_experiment, fit_aggregator,
                             fit_logistic, fit_probe, format_curve_table, format_interval_table, learning_curve,
                             paired_bootstrap, plot_curves, rahf_attributes, verdicts)
from rahf.eval.metrics import roc_auc


def _linear_data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)) * np.array([1.0, 2.0, 0.5, 1.0]) + np.array([3.0, -1.0, 0.0, 5.0])
    z = 2.0 * (X[:, 0] - 3.0) - 1.0 * (X[:, 1] + 1.0) / 2.0 + 0.0 * X[:, 2] + 0.0 * X[:, 3]
    y = (z + 0.05 * rng.normal(size=n) > 0).astype(int)
    return X, y


def test_aggregator_recovers_a_linear_target(tmp_path):
    X, y = _linear_data()
    agg = fit_aggregator(X, y, ["a", "b", "c", "d"], l2=1e-4)
    w = dict(zip(agg.features, agg.weights))  # standardised: the true ratio is 2*1 : (-1/2)*2 = 2 : -1
    assert w["a"] > 0 > w["b"] and w["a"] / -w["b"] == pytest.approx(2.0, rel=0.1)
    assert abs(w["c"]) < 0.1 * w["a"] and abs(w["d"]) < 0.1 * w["a"]
    assert [f for f, _ in agg.ranked_weights()[:2]] == ["a", "b"]
    Xt, yt = _linear_data(seed=1)
    assert roc_auc(agg.decision_function(Xt), yt) > 0.99
    agg.save(tmp_path / "agg.json")
    back = Aggregator.load(tmp_path / "agg.json")
    np.testing.assert_allclose(back.predict_proba(Xt[:5]), agg.predict_proba(Xt[:5]))
    rows = [dict(zip("abcd", r)) for r in Xt[:5]]
    np.testing.assert_allclose(back.decision_function(rows), agg.decision_function(Xt[:5]))
    assert json.loads((tmp_path / "agg.json").read_text())["format"] == "rahf-cbm-aggregator"


def test_class_balancing():
    np.testing.assert_allclose(class_weights([1, 0, 0, 0]), [2.0, 2 / 3, 2 / 3, 2 / 3])
    # one feature, heavy imbalance: the balanced intercept sits where both classes weigh the same
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.1).astype(int)
    X = np.zeros((4000, 1))
    _, b_bal = fit_logistic(X, y, balanced=True)
    _, b_raw = fit_logistic(X, y, balanced=False)
    assert b_bal == pytest.approx(0.0, abs=1e-4)
    assert b_raw == pytest.approx(np.log(y.mean() / (1 - y.mean())), abs=1e-3)
    w, b = fit_logistic(np.ones((3, 2)), [1, 1, 1])  # one class: zero weights
    assert not w.any() and b > 0


def test_binarize_and_attributes():
    y, t = binarize([0.1, 0.5, 0.9, 0.7])
    assert t == pytest.approx(0.6) and y.tolist() == [0, 0, 1, 1]
    assert binarize([1, 2, 3], 2)[0].tolist() == [0, 1, 1]
    res = {"scores": {"plausibility": 0.9, "alignment": 0.4, "aesthetics": 0.5, "overall": 0.6},
           "implausibility": np.zeros((4, 4), np.float32), "misalignment": np.full((4, 4), 0.75, np.float32),
           "misaligned_words": ["red"], "tagged_prompt": "a red_0 cat"}
    a = rahf_attributes(res)
    assert a["misalignment_area"] == 1.0 and a["implausibility_max"] == 0.0 and a["misaligned_frac"] == pytest.approx(1 / 3)


def test_learning_curve_and_plot(tmp_path):
    X, y = _linear_data(600)
    rng = np.random.default_rng(3)
    emb = np.c_[X[:, :2] + rng.normal(size=(600, 2)), rng.normal(size=(600, 6))]
    c = learning_curve(X[:400], y[:400], X[400:], y[400:], emb[:400], emb[400:], budgets=(25, 100, "all"), seeds=2)
    assert c["budgets"] == [25, 100, 400] and c["curves"]["cbm"][400]["mean"] > 0.98
    assert c["curves"]["coarse"][400]["mean"] < c["curves"]["cbm"][400]["mean"]
    assert "n=25" in format_curve_table(c)
    plot_curves(c, tmp_path / "c.png")
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    assert png.shape == (440, 660, 3)  # 6 × 4 inches at 110 dpi
    # each curve is drawn in its colour (matplotlib's tab:purple for the aggregator, black for coarse)
    for rgb in ((148, 103, 189), (0, 0, 0)):
        assert (np.abs(png - rgb).max(-1) <= 10).sum() > 200, rgb


def _tree_data(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    names = ["dull", "artifact", "cluttered", "x1", "x2", "x3"]
    A = {k: (rng.random(n) < 0.5).astype(int) for k in names}
    M = np.stack([A[k] for k in names], 1) * 2.0 - 1.0
    F = np.c_[M @ rng.normal(size=(6, 6)), rng.normal(size=(n, 10))] + 0.3 * rng.normal(size=(n, 16))
    tr, te = slice(0, 800), slice(800, None)
    return F[tr], {k: v[tr] for k, v in A.items()}, F[te], {k: v[te] for k, v in A.items()}


def test_controlled_experiment_sequential_with_intervals():
    """Features that reveal each attribute linearly; the target is a tree over three of them."""
    F, A, Fe, Ae = _tree_data()
    res = controlled_experiment(F, A, Fe, Ae, TREES["image"], budgets=(100, 400), seeds=2, replicates=200)
    assert res["training"] == "sequential" and res["capacity"] == "linear"
    iv = res["intervals"][100]  # at 400 the coarse model reaches the linear aggregator's ceiling
    for m, v in iv["models"].items():
        assert v["lo"] <= v["mean"] <= v["hi"]
    assert iv["diff"]["cbm-right"]["lo"] > 0 and iv["diff"]["cbm-mismatched"]["hi"] < 0
    lines = verdicts(res)
    assert any("100: cbm-right above coarse" in line for line in lines)
    assert not any("400: cbm-right" in line for line in lines)  # within noise: no verdict
    assert "cbm-right − coarse" in format_interval_table(res)
    # the cost axis: a CBM with m attributes gets budget / (1 + m) images (attribute cost 1), coarse all
    res = controlled_experiment(F, A, Fe, Ae, TREES["image"], budgets=(400,), seeds=1, axis="cost", replicates=50,
                                attribute_cost=1.0)
    assert res["rows"]["coarse"][400] == 400 and res["rows"]["cbm-right"][400] == 100
    assert res["rows"]["cbm-extra"][400] == 400 // 7 and res["rows"]["cbm-mismatched"][400] == 100


def test_paired_bootstrap_by_hand():
    y = np.array([0, 0, 1, 1])
    perfect, reverse = np.array([[0.0, 1, 2, 3]]), np.array([[3.0, 2, 1, 0]])
    out = paired_bootstrap({"coarse": reverse, "cbm": perfect}, y, replicates=200)
    # every resample with both classes: AUROC 1 vs 0, so the difference is exactly 1
    assert out["models"]["cbm"]["mean"] == 1.0 and out["models"]["coarse"]["mean"] == 0.0
    assert out["diff"]["cbm"]["lo"] == out["diff"]["cbm"]["hi"] == 1.0


def test_mlp_fits_a_tree_a_linear_probe_cannot():
    # XOR of two inputs: linear AUROC ~0.5, the MLP of the same API separates it
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 2))
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)
    lin = fit_probe(X, y, "linear", l2=1e-3)(X)[:, 0]
    mlp = fit_probe(X, y, "mlp", l2=1e-3, hidden=16)(X)[:, 0]
    assert abs(roc_auc(lin, y) - 0.5) < 0.1 and roc_auc(mlp, y) > 0.95
    with pytest.raises(ValueError, match="capacity"):
        fit_probe(X, y, "tree")


def test_cli_fit_and_apply_on_a_table(tmp_path, capsys):
    import argparse

    from rahf.cli.reward import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def main(argv):
        args = parser.parse_args(argv)
        return args.func(args)

    X, y = _linear_data(300)
    rows = [{"id": i, "a": r[0], "b": r[1], "c": r[2], "label": int(t)} for i, (r, t) in enumerate(zip(X, y))]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    np.save(tmp_path / "emb.npy", X[:, 2:])
    assert main(["cbm", "fit", "--table", str(tmp_path / "rows.jsonl"), "--features", "a,b,c", "--target", "label",
                 "--embeddings", str(tmp_path / "emb.npy"), "--budgets", "25,all", "--seeds", "2",
                 "--out", str(tmp_path / "out")]) == 0
    agg = Aggregator.load(tmp_path / "out" / "aggregator.json")
    assert agg.metrics["roc_auc_eval"] > 0.97 and agg.target["threshold"] == 0.5
    assert (tmp_path / "out" / "learning_curve.png").is_file()
    assert main(["cbm", "apply", "--model", str(tmp_path / "out" / "aggregator.json"), "--table",
                 str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "s.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == list(range(300))
    # every row's logit and probability by the aggregator's formula, from the saved file's numbers
    saved = json.loads((tmp_path / "out" / "aggregator.json").read_text())
    for o, r in zip(out, rows):
        z = saved["bias"] + sum(w * (r[f] - mu) / sd for f, mu, sd, w in
                                zip(saved["features"], saved["mean"], saved["scale"], saved["weights"]))
        assert o["cbm_logit"] == pytest.approx(z, rel=1e-9, abs=1e-9)
        assert o["cbm_prob"] == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-9, abs=1e-12)
    assert roc_auc([o["cbm_prob"] for o in out], y) > 0.97  # they separate the labels
