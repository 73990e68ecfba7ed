"""Covariance-based scorers (Mahalanobis, Mahalanobis++, RMDS, Residual, ViM) against scikit-learn, scipy and
brute-force loops on banks with fewer rows than dimensions (N - K < D: few-shot and small-class banks) and with
many more (N >> D), chunked; and the rank-deficient case where numpy's pinv default made Mahalanobis near chance.

References: class means by a loop over classes; precisions from scikit-learn's EmpiricalCovariance (scipy's
pinvh underneath) on the explicitly centred rows; ranks from numpy's matrix_rank of those rows (a general-position
bank of N rows and K classes has class-centred rank min(N - K, D) exactly); principal subspaces from an SVD.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from regcache import ood
from regcache.ood.fit import Bank


@pytest.fixture(autouse=True)
def one_thread():
    """Small eigendecompositions and index_adds on one thread: on a shared 2-core machine the thread pools of
    BLAS and torch oversubscribe it and these tests ran 16x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def bank_of(n_per: int, k: int, d: int, offset: float, seed: int):
    """Gaussian classes (unit within-class spread) whose centres lie ``offset`` apart per dimension."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * offset
    y = np.repeat(np.arange(k), n_per)
    return centres, y, centres[y] + rng.normal(size=(len(y), d)), rng


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fit(name, x, y, head=None, chunk=16, **args):
    head = head or ood.Linear(np.zeros((1, x.shape[1])), np.zeros(1))
    return ood.make(name, **args).fit(Bank.from_array(x, y, chunk=chunk), head)


def ref_mahalanobis(x, y, q):
    """-min over classes of (q - m_c)^T P (q - m_c), P = EmpiricalCovariance's precision of the class-centred rows."""
    means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
    precision = EmpiricalCovariance(assume_centered=True).fit(x - means[np.searchsorted(np.unique(y), y)]).precision_
    return -np.min([np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in means], axis=0)


def ref_rmds(x, y, q):
    """Relative Mahalanobis: class distances minus the distance to the one Gaussian of all rows (its own location)."""
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    precision = EmpiricalCovariance(assume_centered=True).fit(x - means[np.searchsorted(classes, y)]).precision_
    bg = EmpiricalCovariance(assume_centered=False).fit(x)
    background = np.einsum("nd,de,ne->n", q - bg.location_, bg.precision_, q - bg.location_)
    return -np.min([np.einsum("nd,de,ne->n", q - m, precision, q - m) - background for m in means], axis=0)


# (rows per class, classes, dimensions): N - K < D (few-shot, small classes) and N >> D
SHAPES = [(3, 4, 40), (6, 5, 64), (20, 5, 200), (27, 4, 384), (200, 3, 12), (60, 6, 30)]


@pytest.mark.parametrize("n_per,k,d", SHAPES)
@pytest.mark.parametrize("offset", [1.0, 10.0])
def test_mahalanobis_family_against_sklearn(n_per, k, d, offset):
    """Scores to 1e-6 of the reference, and the rank each fitted scorer reports equals the true rank."""
    for seed in range(2):
        _, y, x, rng = bank_of(n_per, k, d, offset, seed)
        q = x[rng.integers(0, len(x), 20)] + rng.normal(size=(20, d)) * rng.uniform(0.1, 3)
        n = len(x)
        for name, xx, qq, ref in (("mahalanobis", x, q, ref_mahalanobis), ("mahalanobis_pp", unit(x), unit(q),
                                                                           ref_mahalanobis)):
            sc = fit(name, x, y)
            np.testing.assert_allclose(sc.score(q, None), ref(xx, y, qq), rtol=1e-6, err_msg=name)
            centred = xx - np.stack([xx[y == c].mean(0) for c in range(k)])[y]
            rank = np.linalg.matrix_rank(centred)
            assert rank == min(n - k, d)
            assert rank == scipy.linalg.pinvh(centred.T @ centred / n, return_rank=True)[1]
            if rank < d:
                assert sc.notes == [f"{name}: class-centred covariance of {n} rows in {d} dimensions has rank "
                                    f"{rank}: inverted on its {rank}-dimensional support (pinvh cutoff)"]
            else:
                assert sc.notes == []
        sc = fit("rmds", x, y)
        np.testing.assert_allclose(sc.score(q, None), ref_rmds(x, y, q), rtol=1e-6)
        total = min(n - 1, d)
        assert np.linalg.matrix_rank(x - x.mean(0)) == total
        expected = ([f"rmds: class-centred covariance of {n} rows in {d} dimensions has rank {n - k}: inverted on "
                     f"its {n - k}-dimensional support (pinvh cutoff)"] if n - k < d else []) + \
                   ([f"rmds: covariance of {n} rows about their mean in {d} dimensions has rank {total}: inverted on "
                     f"its {total}-dimensional support (pinvh cutoff)"] if total < d else [])
        assert sc.notes == expected


def test_rank_deficiency_is_logged(caplog):
    _, y, x, _ = bank_of(3, 4, 40, 1.0, 0)
    with caplog.at_level(logging.WARNING, logger="regcache"):
        sc = fit("mahalanobis", x, y)
    assert sc.notes and [r.getMessage() for r in caplog.records] == sc.notes
    assert ood.make("mahalanobis").notes == [] and fit("msp", x, y).notes == []
    sc.fit(Bank.from_array(np.random.default_rng(1).normal(size=(100, 5)), np.zeros(100, int)), sc.head)
    assert sc.notes == []  # a second fit starts afresh


def test_mahalanobis_on_a_rank_deficient_bank_is_not_chance():
    """108 rows of 4 classes in 384 dimensions (ViT-S/14's width), ID queries from the classes, OOD queries the
    same shifted off them: the sklearn/pinvh reference separates them almost perfectly; numpy's pinv default
    kept rounding-noise eigenvalues (~1e-15 relative) and weighted them by ~1e15, which gave chance (AUROC 0.509
    for both Mahalanobis and RMDS, where the references give 0.9996 and 0.246)."""
    centres, y, x, rng = bank_of(27, 4, 384, 1.0, 0)
    idq = centres[rng.integers(0, 4, 300)] + rng.normal(size=(300, 384))
    shift = rng.normal(size=384)
    oodq = centres[rng.integers(0, 4, 300)] + rng.normal(size=(300, 384)) + 20 * shift / np.linalg.norm(shift)
    labels = np.r_[np.ones(300), np.zeros(300)]
    for name, ref in (("mahalanobis", ref_mahalanobis(x, y, np.r_[idq, oodq])),
                      ("rmds", ref_rmds(x, y, np.r_[idq, oodq]))):
        expected = roc_auc_score(labels, ref)
        assert expected > 0.99 or name == "rmds"  # RMDS subtracts the background's view of the shift: 0.25 here
        sc = fit(name, x, y, chunk=16)
        assert ood.auroc(sc.score(idq, None), sc.score(oodq, None)) == pytest.approx(expected, abs=1e-12), name


def test_within_class_scatter_has_no_cancellation():
    """Class means 100x the within-class spread: a one-pass scatter about one reference point loses ~1e-11 of
    the within-class covariance to cancellation, above pinvh's cutoff (D·eps ≈ 4e-14 of the largest eigenvalue),
    so rounding noise became 'support'. Against the explicitly centred rows, to float64 rounding."""
    _, y, x, _ = bank_of(20, 5, 200, 100.0, 0)
    m = Bank.from_array(x, y, chunk=16).moments()
    centred = x - np.stack([x[y == c].mean(0) for c in range(5)])[y]
    ref = centred.T @ centred / len(x)
    assert np.abs(m.within_covariance() - ref).max() <= 1e-13 * np.abs(ref).max()
    total = (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)
    assert np.abs(m.covariance() - total).max() <= 1e-13 * np.abs(total).max()
    origin = np.full(200, -3.0)
    about = (x - origin).T @ (x - origin) / len(x)
    assert np.abs(m.second_moment_about(origin) - about).max() <= 1e-13 * np.abs(about).max()
    sc = fit("mahalanobis", x, y, chunk=16)
    assert "has rank 95:" in sc.notes[0]


def ref_residual(x, w, b, dim, q):
    origin = -np.linalg.pinv(w) @ b
    principal = np.linalg.svd(x - origin, full_matrices=False)[2][:dim].T
    return np.linalg.norm((q - origin) - (q - origin) @ principal @ principal.T, axis=1)


@pytest.mark.parametrize("n_per,k,d,dim", [(200, 3, 12, 6), (10, 4, 64, 30), (3, 4, 40, 11)])
def test_subspace_scorers_against_an_svd(n_per, k, d, dim):
    """Residual and ViM where the principal ``dim``-subspace is determined and leaves the training rows a
    residual (rank of the rows about the head's origin > dim), N < D included."""
    _, y, x, rng = bank_of(n_per, k, d, 1.0, 0)
    w, b = rng.normal(size=(k, d)), rng.normal(size=k)
    q = rng.normal(size=(15, d)) * 2
    res = ref_residual(x, w, b, dim, q)
    np.testing.assert_allclose(-fit("residual", x, y, ood.Linear(w, b), dim=dim).score(q, None), res, rtol=1e-7)
    alpha = (x @ w.T + b).max(1).sum() / ref_residual(x, w, b, dim, x).sum()
    np.testing.assert_allclose(fit("vim", x, y, ood.Linear(w, b), dim=dim).score(q, None),
                               logsumexp(q @ w.T + b, axis=1) - alpha * res, rtol=1e-7)


@pytest.mark.parametrize("name", ["residual", "vim"])
def test_subspace_scorers_refuse_an_undetermined_subspace(name):
    """108 rows in 384 dimensions span at most 108 directions about the origin: a principal subspace of the
    default 192 would be completed by rounding noise (any basis of the null space), so the fit refuses."""
    _, y, x, rng = bank_of(27, 4, 384, 1.0, 0)
    head = ood.Linear(rng.normal(size=(4, 384)), rng.normal(size=4))
    rank = np.linalg.matrix_rank(x + np.linalg.pinv(head.weight) @ head.bias)
    assert rank == 108
    with pytest.raises(ood.FitError, match=re.escape(f"{name}.dim=192: the 108 training rows span {rank} dimensions")):
        fit(name, x, y, head)
    fit(name, x, y, head, dim=rank - 1)


def test_residual_on_the_whole_span_and_vim_refusing_it():
    """dim = the rank: the principal subspace is the rows' span, determined, so Residual scores are the distance to
    it; but every training residual is then rounding noise, and ViM's alpha (mean max logit / mean training
    residual) would divide by it, so ViM refuses."""
    _, y, x, rng = bank_of(3, 4, 40, 1.0, 0)
    w, b = rng.normal(size=(4, 40)), rng.normal(size=4)
    q = rng.normal(size=(15, 40)) * 2
    np.testing.assert_allclose(-fit("residual", x, y, ood.Linear(w, b), dim=12).score(q, None),
                               ref_residual(x, w, b, 12, q), rtol=1e-7)
    with pytest.raises(ood.FitError, match=re.escape("vim.dim=12: the 12 training rows span 12 dimensions")):
        fit("vim", x, y, ood.Linear(w, b), dim=12)
