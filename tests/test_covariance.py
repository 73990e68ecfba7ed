"""Covariance-based scorers' statistics against brute-force computations."""
from __future__ import annotations

import numpy as np

from regcache.ood.fit import Bank


def bank_of(n_per: int, k: int, d: int, offset: float, seed: int):
    """Gaussian classes (unit within-class spread) whose centres lie ``offset`` apart per dimension."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * offset
    y = np.repeat(np.arange(k), n_per)
    return centres, y, centres[y] + rng.normal(size=(len(y), d)), rng


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
