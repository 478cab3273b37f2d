import math

import numpy as np
import pytest

from kcm_cuda.evaluation import metrics as M


def test_accuracy_and_positive_rate():
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert M.positive_rate([1, 0, 0, 0]) == 0.25


def test_roc_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding creates ties
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert M.roc_auc(y, s) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_extremes_and_threshold_invariance():
    y = [0, 0, 1, 1]
    assert M.roc_auc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.roc_auc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    # a constant shift of the scores (a moved decision bias) leaves the AUC unchanged
    s = np.array([0.3, -1.0, 2.0, 0.5])
    assert M.roc_auc(y, s) == M.roc_auc(y, s + 7.0)


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_pearson_spearman():
    x = np.arange(10.0)
    assert M.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert M.spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert M.pearson(x, x**3) < 1.0
    assert math.isnan(M.pearson(x, np.ones(10)))
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert M.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same length"):
        M.accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="must not be empty"):
        M.accuracy([], [])


def test_classification_metrics_from_logits():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    out = M.classification_metrics([0, 1, 1, 1], logits)
    assert out["accuracy"] == 0.75
    assert out["positive_rate"] == 0.5
    assert out["roc_auc"] == 1.0
    assert out["true_positive_rate_of_labels"] == 0.75


def test_mean_std_stderr():
    r = M.mean_std_stderr([1.0, 2.0, 3.0])
    assert r["mean"] == 2.0 and r["n"] == 3
    assert r["std"] == pytest.approx(1.0)
    assert r["stderr"] == pytest.approx(1.0 / math.sqrt(3))
    assert M.mean_std_stderr([5.0])["stderr"] == 0.0


def test_squad_metrics_official_normalisation():
    assert M.squad_exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert M.squad_f1("in the year 1889", ["1889"]) == pytest.approx(0.5)  # P 1/3, R 1
    out = M.squad_metrics({"a": "Paris", "b": "London"}, {"a": ["Paris"], "b": ["Berlin"]})
    assert out == {"exact_match": 50.0, "f1": 50.0}
    with pytest.raises(ValueError, match="lack"):
        M.squad_metrics({}, {"a": ["x"]})


def test_paired_bootstrap_identical_and_shifted():
    from kcm_cuda.evaluation.analysis import paired_bootstrap

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    m = rng.normal(size=300) + 2 * y - 1
    same = paired_bootstrap(y, [m, m], [m], n_boot=50)
    assert same["accuracy_diff"] == 0 and same["accuracy_stderr"] == 0
    assert same["auc_diff"] == 0
    worse = paired_bootstrap(y, [m], [m + rng.normal(scale=3, size=300)], n_boot=50)
    assert worse["auc_diff"] > 0 and worse["auc_stderr"] > 0
