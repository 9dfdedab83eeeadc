"""Concept-bottleneck aggregator on known cases."""

import json

import numpy as np
import pytest

from rahf.reward.cbm import (Aggregator, TREES, binarize, class_weights, controlled_experiment, fit_aggregator, fit_logistic,
                      format_curve_table, learning_curve, plot_curves, rahf_attributes)
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
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_controlled_experiment_qualitative_result():
    """Features that reveal each attribute linearly; the target is a tree over three of them."""
    rng = np.random.default_rng(0)
    n = 1600
    names = ["dull", "artifact", "cluttered", "x1", "x2", "x3"]
    A = {k: (rng.random(n) < 0.5).astype(int) for k in names}
    M = np.stack([A[k] for k in names], 1) * 2.0 - 1.0
    F = np.c_[M @ rng.normal(size=(6, 6)), rng.normal(size=(n, 10))] + 0.7 * rng.normal(size=(n, 16))
    tr, te = slice(0, 1000), slice(1000, None)
    res = controlled_experiment(F[tr], {k: v[tr] for k, v in A.items()}, F[te], {k: v[te] for k, v in A.items()},
                                TREES["image"], budgets=(50, 200), seeds=2)
    m = {k: np.mean([v[b]["mean"] for b in res["budgets"]]) for k, v in res["curves"].items()}
    assert m["cbm-right"] > m["coarse"] and m["cbm-mismatched"] < m["coarse"] and m["cbm-mismatched"] < 0.65
    assert res["sets"]["cbm-extra"][:3] == ["dull", "artifact", "cluttered"]


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
    assert len(out) == 300 and out[0]["id"] == 0 and 0 <= out[0]["cbm_prob"] <= 1
