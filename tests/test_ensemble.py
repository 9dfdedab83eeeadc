import numpy as np
import pytest

from rahf.reward.ensemble import ensemble_report, ensemble_rewards, mean_ensemble, uncertainty_ensemble
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
