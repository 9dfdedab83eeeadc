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


def _cli():
    import argparse

    from rahf.cli.reward import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def main(argv):
        args = parser.parse_args(argv)
        return args.func(args)

    return main


def test_contributions_sum_to_the_logit_and_interventions():
    agg = Aggregator(["a", "b", "c"], mean=[1.0, 0.0, 5.0], scale=[2.0, 1.0, 0.5], weights=[1.5, 0.0, -2.0],
                     bias=0.25)
    X = np.array([[3.0, 7.0, 5.5], [1.0, -4.0, 4.0]])
    C = agg.contributions(X)
    # by hand: a: 1.5 * (3 - 1) / 2 = 1.5; b: weight 0; c: -2 * (5.5 - 5) / 0.5 = -2
    np.testing.assert_allclose(C, [[1.5, 0.0, -2.0], [0.0, 0.0, 4.0]])
    np.testing.assert_allclose(C.sum(1) + agg.bias, agg.decision_function(X))
    # a zero-weight attribute: any value changes nothing
    np.testing.assert_allclose(agg.decision_function(agg.intervene(X, {"b": 100.0})), agg.decision_function(X))
    # fixing c to its mean removes its term; fixing a to 5 makes its term 1.5 * 2 = 3
    np.testing.assert_allclose(agg.decision_function(agg.intervene(X, {"c": "mean"})), [1.75, 0.25])
    np.testing.assert_allclose(agg.decision_function(agg.intervene(X, {"a": 5.0})), [1.25, 7.25])
    assert X[0, 0] == 3.0  # the input is not modified
    with pytest.raises(KeyError, match="'zz'"):
        agg.intervene(X, {"zz": 1.0})


def test_join_column_by_uid():
    from rahf.reward.cbm import join_column

    rows = [{"uid": f"u{i}"} for i in range(50)]
    table = [{"uid": f"u{i}", "liked": 0.01 * i} for i in range(50)]
    rng = np.random.default_rng(0)
    shuffled = [table[i] for i in rng.permutation(50)]
    vals, counts = join_column(rows, shuffled, "liked")
    np.testing.assert_allclose(vals, [0.01 * i for i in range(50)])
    assert counts == {"joined": 50, "missing": 0, "non_numeric": 0}
    broken = [t for t in shuffled if t["uid"] != "u7"] + [{"uid": "extra", "liked": 1.0}]
    broken = [dict(t, liked="n/a") if t["uid"] == "u3" else t for t in broken]
    with pytest.raises(ValueError,
                       match=r"1 uids without a 'liked' value: 'u7'.*non-numeric 'liked' values: u3 \('n/a'\)"):
        join_column(rows, broken, "liked")
    vals, counts = join_column(rows, broken, "liked", skip=True)
    assert counts == {"joined": 48, "missing": 1, "non_numeric": 1}
    assert math.isnan(vals[3]) and math.isnan(vals[7]) and vals[8] == 0.08
    with pytest.raises(ValueError, match="'u1' appears more than once"):
        join_column(rows, table + [table[1]], "liked")


def test_correlated_pairs_warn():
    from rahf.reward.cbm import correlated_pairs

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=500)
    X = np.c_[a, b, -3 * a + 1, np.ones(500)]  # c is a perfect (negative) copy of a; d is constant
    pairs = correlated_pairs(X, ["a", "b", "c", "d"], 0.8)
    assert [(p, q) for p, q, _ in pairs] == [("a", "c")] and pairs[0][2] == pytest.approx(-1.0)
    assert correlated_pairs(X[:, :2], ["a", "b"]) == []


def test_bootstrap_weights_cover_planted_weights():
    from scipy.special import expit

    from rahf.reward.cbm import bootstrap_weights

    rng = np.random.default_rng(1)
    n = 4000
    X = rng.normal(size=(n, 3))
    y = (rng.random(n) < expit(1.0 * X[:, 0] - 0.5 * X[:, 1])).astype(int)  # x2 has no effect
    agg = fit_aggregator(X, y, ["x0", "x1", "x2"], l2=1e-5)
    iv = bootstrap_weights(X, y, agg, replicates=200, seed=0)["weights"]
    sd = X.std(0)  # standardised weights: the true weight times the column's sd
    for f, true in zip(("x0", "x1", "x2"), (1.0 * sd[0], -0.5 * sd[1], 0.0)):
        assert iv[f]["lo"] < true < iv[f]["hi"], (f, iv[f])
        assert iv[f]["lo"] <= iv[f]["estimate"] <= iv[f]["hi"]
        assert iv[f]["hi"] - iv[f]["lo"] < 0.25  # 4,000 rows: intervals about ±0.08
    assert iv["x0"]["lo"] > 0 > iv["x1"]["hi"]


def test_cli_fit_with_target_file_baseline_intervals_and_apply_interventions(tmp_path, capsys):
    main = _cli()
    rng = np.random.default_rng(0)
    n = 400
    a, b = rng.normal(size=n), rng.normal(size=n)
    liked = 2 * a - b + 0.5 * rng.normal(size=n)
    rows = [{"uid": f"r{i}", "a": a[i], "b": b[i], "a_copy": a[i] * 2 + 1, "noise": rng.normal(),
             "other_model": a[i]} for i in range(n)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # the target in a CSV of its own, in shuffled order, with a row the table does not have
    import csv

    with open(tmp_path / "target.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "liked"])
        for i in rng.permutation(n):
            w.writerow([f"r{i}", liked[i]])
        w.writerow(["not-a-row", 1.0])
    out = tmp_path / "out"
    argv = ["cbm", "fit", "--table", str(tmp_path / "rows.jsonl"), "--features", "a,b,a_copy,noise", "--target",
            "liked", "--target-file", str(tmp_path / "target.csv"), "--baseline", "other_model", "--budgets", "all",
            "--seeds", "1", "--weight-replicates", "50", "--replicates", "200", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr()
    assert "a ~ a_copy: r = +1.000" in text.out and "warning: attributes a and a_copy" in text.err
    saved = json.loads((out / "aggregator.json").read_text())
    m = saved["metrics"]
    assert m["correlated_pairs"][0]["a"] == "a" and m["correlated_pairs"][0]["b"] == "a_copy"
    # the target joined by uid: liked = 2a - b + noise is well predicted from a and b
    assert m["roc_auc_eval"] > 0.9 and m["plcc_eval"] > 0.85
    base = m["baselines"]["other_model"]  # a alone: worse than the aggregator on the same eval rows
    assert base["roc_auc_eval"] < m["roc_auc_eval"] and base["minus_aggregator"]["hi"] < 0
    assert "baseline: other_model" in text.out
    wi = saved["weight_intervals"]["weights"]
    assert set(wi) == {"a", "b", "a_copy", "noise"} and wi["b"]["hi"] < 0
    for f, w in zip(saved["features"], saved["weights"]):
        assert wi[f]["estimate"] == pytest.approx(w)
    # a target file missing a row: a clear error naming it, or skip-and-count
    lines = (tmp_path / "target.csv").read_text().splitlines()
    (tmp_path / "t2.csv").write_text("\n".join(line for line in lines if not line.startswith("r5,")) + "\n")
    argv2 = [x if x != str(tmp_path / "target.csv") else str(tmp_path / "t2.csv") for x in argv]
    with pytest.raises(SystemExit, match="'r5'"):
        main(argv2)
    assert main(argv2 + ["--skip-missing", "--out", str(tmp_path / "out2")]) == 0
    m2 = json.loads((tmp_path / "out2" / "aggregator.json").read_text())["metrics"]
    assert m2["n_fit"] + m2["n_eval"] == n - 1
    assert sum(c["missing"] for c in m2["target_join"].values()) == 1

    # apply: contributions + intercept sum to the logit; interventions
    model = str(out / "aggregator.json")
    assert main(["cbm", "apply", "--model", model, "--table", str(tmp_path / "rows.jsonl"), "--out",
                 str(tmp_path / "s.jsonl"), "--set", "b=0", "--set", "noise=mean"]) == 0
    res = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    agg = Aggregator.load(model)
    wb = dict(zip(agg.features, agg.weights))
    j = agg.features.index("b")
    for o, r in zip(res, rows):
        assert sum(o["contributions"].values()) + o["cbm_intercept"] == pytest.approx(o["cbm_logit"], abs=1e-9)
        assert o["cbm_prob"] == o["cbm_prob_before"] == pytest.approx(1 / (1 + math.exp(-o["cbm_logit"])))
        # after: b's term becomes w_b * (0 - mean_b) / scale_b and noise's term 0
        z_after = (o["cbm_logit"] - o["contributions"]["b"] - o["contributions"]["noise"]
                   + wb["b"] * (0 - agg.mean[j]) / agg.scale[j])
        assert o["cbm_logit_after"] == pytest.approx(z_after, abs=1e-9)
        assert o["cbm_prob_change"] == pytest.approx(o["cbm_prob_after"] - o["cbm_prob_before"], abs=1e-12)
    with pytest.raises(SystemExit, match="zz"):
        main(["cbm", "apply", "--model", model, "--table", str(tmp_path / "rows.jsonl"), "--set", "zz=1"])


@pytest.mark.slow  # scores/renders a synth dataset: seconds
def test_cli_fit_on_a_checkpoint_reports_its_own_head(synth_root, ckpt, tmp_path, capsys):
    main = _cli()
    assert main(["cbm", "fit", "--checkpoint", str(ckpt), "--data", str(synth_root), "--split", "train",
                 "--eval-split", "dev", "--target", "overall", "--budgets", "all", "--seeds", "1",
                 "--weight-replicates", "20", "--replicates", "100", "--out", str(tmp_path / "o")]) == 0
    saved = json.loads((tmp_path / "o" / "aggregator.json").read_text())
    assert "overall" not in saved["features"]  # the head is the baseline, not an attribute
    base = saved["metrics"]["baselines"]["overall"]
    ev = [json.loads(line) for line in (tmp_path / "o" / "attributes_eval.jsonl").read_text().splitlines()]
    y = np.array([r["true_overall"] for r in ev]) >= saved["target"]["threshold"]
    assert base["roc_auc_eval"] == pytest.approx(roc_auc([r["overall"] for r in ev], y.astype(int)))
    assert "baseline: overall" in capsys.readouterr().out


def test_synth_arrays_cache(synth_root, tmp_path):
    from rahf.data.format import read_manifest
    from rahf.reward.cbm import SYNTH_ATTRIBUTES, synth_arrays, synth_cache_key

    entries = read_manifest(synth_root / "test")[:6]
    F0, A0, s0 = synth_arrays(synth_root, "test", entries)
    assert s0 == "off" and F0.shape == (6, 228) and set(A0) == set(SYNTH_ATTRIBUTES)
    F1, A1, s1 = synth_arrays(synth_root, "test", entries, cache_dir=tmp_path)
    F2, A2, s2 = synth_arrays(synth_root, "test", entries, cache_dir=tmp_path)
    assert (s1, s2) == ("miss", "hit")
    np.testing.assert_array_equal(F2, F0)
    for n in SYNTH_ATTRIBUTES:
        np.testing.assert_array_equal(A2[n], A0[n])
    # the key changes with anything the arrays depend on: a new file, never a stale read
    k = synth_cache_key(synth_root, "test", entries, 0.55, True)
    assert synth_cache_key(synth_root, "test", entries, 0.9, True) != k
    assert synth_cache_key(synth_root, "test", entries[:5], 0.55, True) != k
    edited = [dict(e, tagged_prompt=e["tagged_prompt"] + " x") if i == 0 else e for i, e in enumerate(entries)]
    assert synth_cache_key(synth_root, "test", edited, 0.55, True) != k
    _, A3, s3 = synth_arrays(synth_root, "test", entries, aesthetics_threshold=0.0, features=False, cache_dir=tmp_path)
    assert s3 == "miss" and A3["aesthetic"].all() and len(list(tmp_path.glob("test-*.npz"))) == 2


@pytest.mark.slow  # scores/renders a synth dataset: seconds
def test_cli_experiment_reads_its_cache(synth_root, tmp_path, capsys):
    main = _cli()
    argv = ["cbm", "experiment", "--data", str(synth_root), "--eval-split", "dev", "--budgets", "32,all", "--seeds",
            "2", "--cost-budgets", "", "--replicates", "50", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "cache miss" in capsys.readouterr().err and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert err.count("cache hit") == 2 and "cache miss" not in err
    # the cached arrays give the same experiment, number for number
    assert (tmp_path / "a" / "experiment.md").read_text() == (tmp_path / "b" / "experiment.md").read_text()
    res = json.loads((tmp_path / "b" / "experiment.json").read_text())
    assert res["l2_features"] == 1.0 and res["axes"]["images"]["budgets"] == [32, 64]
