"""Detection metrics (docs/design.md, "OOD metrics"): scores where larger means more in-distribution.

FPR@TPR95 (``fpr95``) follows Hendrycks & Gimpel and Liu et al.: ID is the positive class, the threshold
keeps 95% of ID samples (ties at the threshold are kept too), and the result is the fraction of anomaly
samples at or above it. ``fpr95_openood`` is the mirror image: OOD is the positive class, the threshold
catches 95% of OOD samples, and the result is the fraction of ID samples flagged with them. That is what
pytorch-ood 0.4 reports (metrics.FPRAtTPR) and what OpenOOD's openood/evaluators/metrics.py computes since
``auc_and_fpr_recall`` ("following convention in ML we treat OOD as positive": ``roc_curve(ood_indicator,
-conf)``, the first point with TPR >= 0.95; at commits 873e8c29 and a59cdac4, the latest seen), which its
maintainers call the v1.5 convention (OpenOOD issue #206, Nov 2023). OpenOOD's code before it took ID as
positive, as ``fpr95`` does (v1.0's ``fpr_recall``, commit 00611f1a; then the same through ``roc_curve``);
as far as its issues show, the switch fell in August 2023 (#177, Aug 24: the leaderboard's FPR changed since
Aug 7). The two differ and are never to be compared; AUROC is the same under either convention.

AUPR: ``ap_in``/``ap_out`` are average precision (scikit-learn's average_precision_score, the step area under
the precision-recall curve); ``aupr_in_openood``/``aupr_out_openood`` are OpenOOD's trapezoid area,
``auc(recall, precision)`` of ``precision_recall_curve``, which draws straight lines between the curve's
points and so is not AP (constant scores: (1 + prevalence) / 2 against AP's prevalence). OpenOOD's AUPR_IN takes ID as positive on the scores and AUPR_OUT OOD as positive on
the negated scores (a59cdac4; v1.0 ranked by 1 - conf, the same order), except its ``auc_and_fpr_recall``
versions before the fix of issue #211 (Dec 2023; 873e8c29), which computed each under the other's label:
their AUPR_IN is our ``aupr_out_openood`` and the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
    precision, recall = _pr_points(pos_scores, neg_scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _pr_points(pos_scores, neg_scores) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct threshold, from the highest score down."""
    p, n = _check(pos_scores, neg_scores)
    s = np.concatenate([p, n])
    y = np.r_[np.ones(len(p)), np.zeros(len(n))]
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct threshold
    tp = np.cumsum(y)[last]
    return tp / (last + 1), tp / len(p)


def ap_in(id_scores, ood_scores) -> float:
    """Average precision, ID positive, ranked by score: scikit-learn's average_precision_score, the step area under
    the precision-recall curve (not the trapezoid OpenOOD reports as AUPR_IN: `aupr_in_openood`)."""
    return average_precision(id_scores, ood_scores)


def ap_out(id_scores, ood_scores) -> float:
    """Average precision, OOD positive, ranked by negated score."""
    return average_precision(-np.asarray(ood_scores, dtype=np.float64), -np.asarray(id_scores, dtype=np.float64))


def trapezoid_pr_area(pos_scores, neg_scores) -> float:
    """Trapezoid-rule area under the precision-recall curve, the curve being scikit-learn's precision_recall_curve
    (a point per distinct threshold, from the highest, plus recall 0 at precision 1): ``auc(recall, precision)``.

    The trapezoid joins the points by straight lines, which the curve is not (precision between two thresholds is
    not linear in recall), so it is not average precision, above or below it: constant scores give
    (1 + prevalence) / 2 against AP's prevalence, and a tie group interpolates across its whole recall step.
    """
    precision, recall = _pr_points(pos_scores, neg_scores)
    precision, recall = np.r_[1.0, precision], np.r_[0.0, recall]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def aupr_in_openood(id_scores, ood_scores) -> float:
    """OpenOOD's AUPR_IN: ID positive, scores as they are (larger = ID), trapezoid area (`trapezoid_pr_area`); in
    its evaluators/metrics.py, ``auc(recall, precision)`` of ``precision_recall_curve(1 - ood_indicator, conf)``."""
    return trapezoid_pr_area(id_scores, ood_scores)


def aupr_out_openood(id_scores, ood_scores) -> float:
    """OpenOOD's AUPR_OUT: OOD positive, negated scores (``precision_recall_curve(ood_indicator, -conf)``),
    trapezoid area. (OpenOOD versions of Aug-Dec 2023 swapped the two labels: see the module docstring.)"""
    return trapezoid_pr_area(-np.asarray(ood_scores, dtype=np.float64), -np.asarray(id_scores, dtype=np.float64))


@dataclass(frozen=True)
class Metric:
    """One detection metric: the function of (ID scores, OOD scores), its label in reports (the two FPR95
    conventions never share one) and its definition (docs/ood.md's table is made from these)."""

    fn: Callable[[Any, Any], float]
    label: str
    definition: str

    def __call__(self, id_scores, ood_scores) -> float:
        return self.fn(id_scores, ood_scores)


METRICS: dict[str, Metric] = {
    "fpr95": Metric(fpr_at_tpr, "FPR95↓", "ID positive: the threshold keeps 95% of ID samples (ties at it kept "
                                          "too); the fraction of OOD samples at or above it"),
    "fpr95_openood": Metric(fpr_at_tpr_openood, "FPR95-OpenOOD↓", "OOD positive: the threshold catches 95% of OOD; "
                                                                   "the fraction of ID flagged with them"),
    "auroc": Metric(auroc, "AUROC↑", "the same under either convention (ties count half)"),
    "ap_in": Metric(ap_in, "AP-in↑", "average precision (scikit-learn's `average_precision_score`), ID positive"),
    "ap_out": Metric(ap_out, "AP-out↑", "average precision, OOD positive"),
    "aupr_in_openood": Metric(aupr_in_openood, "AUPR-in-OpenOOD↑", "OpenOOD's trapezoid area, `auc(recall, "
                              "precision)` of `precision_recall_curve`, ID positive: straight lines between the "
                              "curve's points, so not AP (constant scores give (1 + prevalence)/2 against AP's "
                              "prevalence)"),
    "aupr_out_openood": Metric(aupr_out_openood, "AUPR-out-OpenOOD↑", "the same, OOD positive"),
}


def roc_points(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, for plotting; ID positive."""
    a, b = _check(id_scores, ood_scores)
    t = np.unique(np.concatenate([a, b]))[::-1]
    tpr = 1 - np.searchsorted(np.sort(a), t, side="left") / len(a)  # fraction of ID at or above t
    fpr = 1 - np.searchsorted(np.sort(b), t, side="left") / len(b)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]
