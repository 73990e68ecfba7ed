"""Scores and metrics against independent computations (scikit-learn, brute-force loops, numpy formulas)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp, softmax
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from regcache import ood


def brute_fpr95(id_s, ood_s, tpr=0.95):
    """Try every candidate threshold; keep the largest that accepts >= tpr of ID; count OOD at or above it."""
    best = None
    for t in sorted(set(id_s) | set(ood_s)):
        if np.mean(np.asarray(id_s) >= t) >= tpr:
            best = t
    return float(np.mean(np.asarray(ood_s) >= best))


def brute_fpr95_openood(id_s, ood_s, tpr=0.95):
    """OOD positive (OpenOOD since Aug 2023): flag scores at or below t; the smallest t flagging >= tpr of OOD;
    the fraction of ID flagged."""
    for t in sorted(set(id_s) | set(ood_s)):
        if np.mean(np.asarray(ood_s) <= t) >= tpr:
            return float(np.mean(np.asarray(id_s) <= t))


def sklearn_fpr95_openood(id_s, ood_s, tpr=0.95):
    """OpenOOD's own computation (evaluators/metrics.py, auc_and_fpr_recall): roc_curve with OOD as positive on -score.

    With every threshold kept: roc_curve's default drops collinear ROC points, and the point at 95% can be
    one of them (ID [1, 2], OOD eighteen 0s and [1, 2]: 0.5 exactly, 1.0 with the point dropped).
    """
    from sklearn.metrics import roc_curve

    fpr, tprs, _ = roc_curve(np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))], -np.r_[id_s, ood_s],
                             drop_intermediate=False)
    return float(fpr[np.argmax(tprs >= tpr)])


scores = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=60)  # small ints: many ties


@settings(max_examples=200, deadline=None)
@given(id_s=scores, ood_s=scores)
def test_metrics_match_brute_force_and_sklearn(id_s, ood_s):
    assert ood.fpr_at_tpr(id_s, ood_s) == pytest.approx(brute_fpr95(id_s, ood_s))
    assert ood.fpr_at_tpr_openood(id_s, ood_s) == pytest.approx(brute_fpr95_openood(id_s, ood_s))
    if len(set(id_s)) > 1 or len(set(ood_s)) > 1:  # roc_curve needs two distinct scores
        assert ood.fpr_at_tpr_openood(id_s, ood_s) == pytest.approx(sklearn_fpr95_openood(id_s, ood_s))
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    assert ood.auroc(id_s, ood_s) == pytest.approx(roc_auc_score(y, s))
    assert ood.ap_in(id_s, ood_s) == pytest.approx(average_precision_score(y, s))
    assert ood.ap_out(id_s, ood_s) == pytest.approx(average_precision_score(1 - y, -s))
    assert ood.aupr_in_openood(id_s, ood_s) == pytest.approx(openood_aupr(y, s))
    assert ood.aupr_out_openood(id_s, ood_s) == pytest.approx(openood_aupr(1 - y, -s))


def openood_aupr(positive, score):
    """OpenOOD's AUPR (evaluators/metrics.py): scikit-learn's auc(recall, precision) on precision_recall_curve, ID
    positive on the scores for AUPR_IN, OOD positive on the negated scores for AUPR_OUT (labels as fixed for #211)."""
    precision, recall, _ = precision_recall_curve(positive, score)
    return auc(recall, precision)


def test_ap_and_openood_aupr_on_constant_reversed_and_tied_scores():
    """Constant scores: AP is the prevalence, OpenOOD's trapezoid (1 + prevalence) / 2, 0.2 apart at 60% ID.
    Reversed (every OOD above every ID), two tied levels, perfect; each against scikit-learn."""
    cases = {"constant": ([1.0] * 6, [1.0] * 4), "reversed": ([0.0, 1.0, 2.0], [5.0, 6.0, 7.0, 8.0]),
             "tied": ([1.0] * 6 + [0.0] * 4, [1.0] * 4 + [0.0] * 6), "perfect": ([3.0, 4.0], [1.0, 2.0, 2.0])}
    for name, (id_s, ood_s) in cases.items():
        y, s = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s]
        got = [m(id_s, ood_s) for m in (ood.ap_in, ood.ap_out, ood.aupr_in_openood, ood.aupr_out_openood)]
        ref = [average_precision_score(y, s), average_precision_score(1 - y, -s), openood_aupr(y, s),
               openood_aupr(1 - y, -s)]
        np.testing.assert_allclose(got, ref, rtol=1e-12, err_msg=name)
    assert ood.ap_in(*cases["constant"]) == 0.6 and ood.aupr_in_openood(*cases["constant"]) == 0.8
    assert ood.ap_out(*cases["constant"]) == 0.4 and ood.aupr_out_openood(*cases["constant"]) == 0.7
    assert ood.aupr_in_openood(*cases["tied"]) - ood.ap_in(*cases["tied"]) == pytest.approx(0.14)
    assert ood.aupr_in_openood(*cases["perfect"]) == ood.ap_in(*cases["perfect"]) == 1.0
    assert set(ood.METRICS) == {"fpr95", "fpr95_openood", "auroc", "ap_in", "ap_out", "aupr_in_openood",
                                "aupr_out_openood"}


def test_fpr95_openood_keeps_a_collinear_roc_point():
    """The case hypothesis found: the 95% point lies on a straight stretch of the ROC curve."""
    id_s, ood_s = [1.0, 2.0], [0.0] * 18 + [1.0, 2.0]
    assert ood.fpr_at_tpr_openood(id_s, ood_s) == brute_fpr95_openood(id_s, ood_s) == 0.5


def test_fpr95_hand_made_cases():
    id_s = np.arange(1, 21, dtype=float)             # 20 ID scores 1..20; keep 19 -> threshold 2
    assert ood.fpr_at_tpr(id_s, [0, 1, 2, 3]) == 0.5  # 2 and 3 are at or above
    assert ood.fpr_at_tpr(id_s, [1.5]) == 0.0
    assert ood.fpr_at_tpr(np.ones(10), [1.0, 0.0]) == 0.5  # all tied: threshold 1 keeps every ID
    assert ood.fpr_at_tpr(id_s, [100.0]) == 1.0            # a single anomaly sample


def test_the_two_fpr95_conventions_differ():
    """ID 1..20, OOD 0..3: ID-positive keeps 19 ID (threshold 2) and accepts 2 of 4 OOD; OOD-positive flags
    all OOD at threshold 3 (the smallest catching >= 95%) and so flags the 3 ID scores 1, 2, 3."""
    id_s = np.arange(1, 21, dtype=float)
    assert ood.fpr_at_tpr(id_s, [0, 1, 2, 3]) == 0.5
    assert ood.fpr_at_tpr_openood(id_s, [0, 1, 2, 3]) == 3 / 20


def test_empty_and_non_finite_scores_are_errors():
    with pytest.raises(ValueError, match="need ID and OOD"):
        ood.auroc([1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        ood.fpr_at_tpr([1.0, np.nan], [0.0])


def test_logit_scores_match_numpy_formulas():
    z = np.random.default_rng(0).normal(size=(50, 7)) * 30  # large logits: stability matters
    np.testing.assert_allclose(np.exp(ood.msp(z)), softmax(z, axis=1).max(1), rtol=1e-12)
    np.testing.assert_allclose(ood.energy(z), logsumexp(z, axis=1), rtol=1e-12)
    np.testing.assert_allclose(ood.energy(z, temperature=2.0), 2 * logsumexp(z / 2, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(ood.max_logit(z), z.max(1))


def test_msp_keeps_confident_samples_apart():
    """Log MSP against 400-digit arithmetic: logit gaps of 20..700 (where float64 softmax gives exactly 1.0)
    stay distinct and ordered, and ties at the maximum are counted."""
    import mpmath

    gaps = np.array([0.5, 5.0, 20.0, 40.0, 80.0, 300.0, 700.0])
    z = np.stack([np.r_[g, 0.0, -1.0, -3.0] for g in gaps] + [np.array([2.0, 2.0, 0.0, 0.0])])
    with mpmath.workdps(400):  # 1 - e^-700 needs over 304 digits
        ref = [float(mpmath.log(max(mpmath.exp(v) for v in row) / mpmath.fsum(mpmath.exp(v) for v in row)))
               for row in z.tolist()]
    np.testing.assert_allclose(ood.msp(z), ref, rtol=1e-12, atol=0)
    assert softmax(z[3:7], axis=1).max(1).tolist() == [1.0] * 4  # what the probability itself would give
    assert (np.diff(ood.msp(z[:7])) > 0).all()
    y = np.r_[np.ones(3), np.zeros(3)]  # three confident ID samples against three less confident anomalies
    assert ood.auroc(ood.msp(z[4:7]), ood.msp(z[1:4])) == roc_auc_score(y, np.r_[-1 / gaps[4:7], -1 / gaps[1:4]])


def test_roc_points_end_at_one_and_match_auroc():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    fpr, tpr = ood.roc_points(a, b)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(ood.auroc(a, b))


def fitted(name, train, labels, head=None, **args):
    head = head or ood.Linear(np.zeros((1, train.shape[1])), np.zeros(1))
    return ood.make(name, **args).fit(ood.Bank.from_array(train, labels, chunk=13), head)


def test_knn_and_mahalanobis_against_brute_force():
    rng = np.random.default_rng(2)
    train, labels = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    test = rng.normal(size=(9, 5))
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    knn = fitted("knn", train, labels, k=4).score(test, None)
    for i, x in enumerate(n(test)):
        d = np.sort(np.linalg.norm(n(train) - x, axis=1))
        assert knn[i] == pytest.approx(-d[3], abs=1e-5)
    maha = fitted("mahalanobis", train, labels).score(test, None)
    means = [train[labels == c].mean(0) for c in range(3)]
    cov = sum(np.outer(x - means[c], x - means[c]) for x, c in zip(train, labels)) / len(train)
    inv = np.linalg.inv(cov)
    for i, x in enumerate(test):
        assert maha[i] == pytest.approx(-min((x - m) @ inv @ (x - m) for m in means), rel=1e-6)


def test_vim_against_a_direct_svd_computation():
    rng = np.random.default_rng(3)
    # training features that live mostly in 6 of 10 dimensions
    basis = np.linalg.qr(rng.normal(size=(10, 10)))[0]
    train = (rng.normal(size=(300, 6)) * 3) @ basis[:, :6].T + rng.normal(size=(300, 10)) * 0.1
    w, b = rng.normal(size=(4, 10)), rng.normal(size=4)
    vim = fitted("vim", train, np.zeros(300, int), ood.Linear(w, b), dim=6)
    origin = -np.linalg.pinv(w) @ b
    _, _, vt = np.linalg.svd(train - origin, full_matrices=False)
    principal = vt[:6].T  # top right-singular vectors = top eigenvectors of the covariance
    residual = lambda x: np.linalg.norm((x - origin) - (x - origin) @ principal @ principal.T, axis=1)  # noqa: E731
    alpha = (train @ w.T + b).max(1).sum() / residual(train).sum()
    test = rng.normal(size=(5, 10))
    np.testing.assert_allclose(vim.score(test, None), logsumexp(test @ w.T + b, axis=1) - alpha * residual(test),
                               rtol=1e-8)
    # moving a point off the training subspace lowers its score
    inside = train[:1]
    outside = inside + 5 * basis[:, 8]
    assert vim.score(outside, None)[0] < vim.score(inside, None)[0]
