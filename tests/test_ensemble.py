import json

import numpy as np
import pytest

from rahf.reward.ensemble import (ensemble_report, ensemble_rewards, mean_ensemble, read_reward_table, select_lambda,
                                  uncertainty_ensemble)
from rahf.reward.textnorm import textnorm


def test_mean_minus_lambda_std_by_hand():
    R = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    np.testing.assert_allclose(mean_ensemble(R), [2.0, 0.0, 2.0])
    # population std over the two models: |a - b| / 2
    np.testing.assert_allclose(uncertainty_ensemble(R, 0.5), [2.0 - 0.5 * 1.0, 0.0, 2.0])
    np.testing.assert_allclose(uncertainty_ensemble(R, 0.0), mean_ensemble(R))
    R3 = np.array([[0.0], [3.0], [6.0]])
    np.testing.assert_allclose(uncertainty_ensemble(R3, 1.0), [3.0 - np.sqrt(6.0)])


def test_ensemble_rewards_family():
    raw = np.array([[1.0, 0.0], [0.5, 0.2]])
    con = np.array([[[0.0, np.nan], [1.0, 1.0]], [[0.5, 0.1], [0.0, np.nan]]])
    out = ensemble_rewards(raw, con, tau=0.5, lams=(1.0,), names=["a", "b"])
    assert set(out) == {"a", "b", "mean", "mean-1std", "a+textnorm", "b+textnorm", "mean+textnorm", "mean-1std+textnorm"}
    tn = np.stack([textnorm(raw[0], con[0], 0.5), textnorm(raw[1], con[1], 0.5)])
    np.testing.assert_allclose(out["mean+textnorm"], tn.mean(0))
    np.testing.assert_allclose(out["mean-1std"], raw.mean(0) - raw.std(0))
    rep = ensemble_report(out, [1, 0], ks=(1,))
    assert rep["a"]["auroc"] == 1.0 and set(rep["a"]) == {"auroc", "auprc", "ap@1", "spearman", "kendall"}
    with pytest.raises(ValueError):
        ensemble_rewards(raw, con[:, :1])


def test_per_member_tau_and_select_lambda():
    raw = np.array([[1.0, 0.0], [0.5, 0.2]])
    con = np.array([[[0.0, np.nan], [1.0, 1.0]], [[0.5, 0.1], [0.0, np.nan]]])
    out = ensemble_rewards(raw, con, tau=[0.5, 2.0], names=["a", "b"])
    np.testing.assert_allclose(out["b+textnorm"], textnorm(raw[1], con[1], 2.0))
    with pytest.raises(ValueError, match="taus"):
        ensemble_rewards(raw, con, tau=[0.5])
    # rewards 2y and y: mean - lam*std = (1.5 - 0.5 lam) y, so lam=4 reverses the order
    y = np.array([1, 0, 1, 0, 0])
    lam, table = select_lambda(np.stack([2.0 * y, 1.0 * y]), y, [4.0, 0.0, 1.0], ks=(1,))
    assert lam == 0.0 and table == {4.0: 0.0, 0.0: 1.0, 1.0: 1.0}


def test_reward_tables(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"uid": "a", "reward": 1.5, "contrast_rewards": [0, 1]}\n{"uid": "b", "reward": -2}\n')
    assert read_reward_table(p) == {"a": (1.5, [0.0, 1.0]), "b": (-2.0, None)}
    p.write_text('{"uid": "a", "reward": 1}\n{"uid": "a", "reward": 2}\n')
    with pytest.raises(ValueError, match="r.jsonl:2: bad reward line|r.jsonl:2: duplicate"):
        read_reward_table(p)
    p.write_text('{"uid": "a"}\n')
    with pytest.raises(ValueError, match="r.jsonl:1"):
        read_reward_table(p)


def test_cli_ensemble_of_reward_tables(synth_root, tmp_path, capsys):
    from rahf.cli import main
    from rahf.data.format import read_manifest
    from rahf.schema import misaligned_words

    rows = {"a": [], "b": []}
    labels = {}
    for split in ("dev", "test"):
        for i, e in enumerate(read_manifest(synth_root / split)):
            y = int(not misaligned_words(e["tagged_prompt"]))
            labels[e["uid"]] = (split, y)
            # member a: 2y, member b: y; contrasts at 0 (TextNorm keeps the order); the first test pair has none
            none = split == "test" and i == 0
            rows["a"].append({"uid": e["uid"], "reward": 2.0 * y, **({} if none else {"contrast_rewards": [0.0]})})
            rows["b"].append({"uid": e["uid"], "reward": 1.0 * y, "contrast_rewards": [0.0, 0.0]})
    for m, rs in rows.items():
        (tmp_path / f"{m}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    out = tmp_path / "ens.json"
    assert main(["ensemble", "--members", f"A={tmp_path / 'a.jsonl'}", f"B={tmp_path / 'b.jsonl'}",
                 "--data", str(synth_root), "--lam", "4,0", "--tau", "1,0.1", "--ks", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    n_test = sum(s == "test" for s, _ in labels.values())
    assert res["names"] == ["A", "B"] and res["n"] == n_test and res["kept"] == n_test - 1
    assert res["choice"]["lambda"] == 0.0 and res["choice"]["tau"] == [1.0, 1.0]  # ties: the first listed
    m = res["metrics"]
    assert m["A"]["auroc"] == m["mean-0std"]["auroc"] == m["mean+textnorm"]["auroc"] == 1.0
    assert "1 excluded" in capsys.readouterr().out
    # a member without a reward for some pair names it
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["a"][1:]))
    with pytest.raises(SystemExit, match="no reward for 1 pairs"):
        main(["ensemble", "--members", str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl"), "--data", str(synth_root)])
