"""Detection metrics (DESIGN §5): scores where larger means more in-distribution.

FPR@TPR95 (``fpr95``) follows Hendrycks & Gimpel and Liu et al.: ID is the positive class, the
threshold keeps 95% of ID samples (ties at the threshold are kept too), and the result is the
fraction of anomaly samples at or above it. OpenOOD v1.5 and pytorch-ood report the mirror image
(``fpr95_openood``): OOD is the positive class, the threshold catches 95% of OOD samples, and the
result is the fraction of ID samples flagged with them (OpenOOD issue #308). The two differ and are
never to be compared; AUROC is the same under either convention.
"""
from __future__ import annotations

import numpy as np


def _check(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(id_scores, dtype=np.float64).ravel(), np.asarray(ood_scores, dtype=np.float64).ravel()
    if not len(a) or not len(b):
        raise ValueError(f"need ID and OOD samples, got {len(a)} ID and {len(b)} OOD")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores contain NaN or inf")
    return a, b


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted by the largest threshold that keeps ``tpr`` of the ID samples."""
    a, b = _check(id_scores, ood_scores)
    k = int(np.ceil(tpr * len(a) - 1e-9))  # ID samples that must be kept
    threshold = np.sort(a)[::-1][max(k, 1) - 1]
    return float(np.mean(b >= threshold))


def fpr_at_tpr_openood(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """OOD positive: fraction of ID samples flagged by the threshold that flags ``tpr`` of the OOD samples
    (a sample is flagged when its score is at or below the threshold; ties are flagged too)."""
    a, b = _check(id_scores, ood_scores)
    return fpr_at_tpr(-b, -a, tpr)


def auroc(id_scores, ood_scores) -> float:
    """P(score_ID > score_OOD) + 0.5 P(tie): the Mann-Whitney statistic, ties averaged."""
    a, b = _check(id_scores, ood_scores)
    ranks = _average_ranks(np.concatenate([a, b]))
    return float((ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average rank per tie group
    return ranks


def average_precision(pos_scores, neg_scores) -> float:
    """Area under the step precision-recall curve (as scikit-learn's average_precision_score)."""
    p, n = _check(pos_scores, neg_scores)
    s = np.concatenate([p, n])
    y = np.r_[np.ones(len(p)), np.zeros(len(n))]
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct threshold
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision, recall = tp / (tp + fp), tp / len(p)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores, ood_scores) -> float:
    """ID as positive, ranked by score."""
    return average_precision(id_scores, ood_scores)


def aupr_out(id_scores, ood_scores) -> float:
    """OOD as positive, ranked by negated score."""
    return average_precision(-np.asarray(ood_scores, dtype=np.float64), -np.asarray(id_scores, dtype=np.float64))


METRICS = {"fpr95": fpr_at_tpr, "fpr95_openood": fpr_at_tpr_openood, "auroc": auroc, "aupr_in": aupr_in,
           "aupr_out": aupr_out}


def roc_points(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, for plotting; ID positive."""
    a, b = _check(id_scores, ood_scores)
    t = np.unique(np.concatenate([a, b]))[::-1]
    tpr = 1 - np.searchsorted(np.sort(a), t, side="left") / len(a)  # fraction of ID at or above t
    fpr = 1 - np.searchsorted(np.sort(b), t, side="left") / len(b)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]
