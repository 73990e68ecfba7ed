"""Scorers fitted on the training features: kNN, NNGuide, SHE, the Mahalanobis family, Residual, ViM."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from .fit import FitError, add_rows, l2_normalise, symmetric_eigh, symmetric_inverse, topk_similarities
from .scorers import Params, Scorer, register
from .scores import energy


def _row_norms(x: np.ndarray, chunk: int) -> np.ndarray:
    """L2 norms of the rows of a (float16) array, a chunk at a time in float32: no float32 copy of the whole bank."""
    return np.concatenate([np.linalg.norm(x[i:i + chunk].astype(np.float32), axis=1) for i in range(0, len(x), chunk)])


@register
class KNN(Scorer):
    """Negative distance from the L2-normalised feature to its k-th nearest L2-normalised training feature;
    exact, the bank streamed in chunks with a running top-k (on the bank's device)."""

    name = "knn"
    inputs = "features"
    reference = "Sun et al., OOD detection with deep nearest neighbors, ICML 2022"
    defaults = "OpenOOD v1.5"

    class Params(Params):
        k: int = Field(50, ge=1, description="neighbours: the score is minus the distance to the k-th")
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        self.bank = bank
        self.inv_norm = bank.memo("inv_norm", lambda: 1 / np.maximum(_row_norms(bank.stored(), bank.chunk), 1e-12))
        return self

    def score(self, features, logits):
        kth = topk_similarities(l2_normalise(features), self.bank.stored(), self.args["k"], self.inv_norm,
                                device=self.bank.device)[:, -1]
        return -np.sqrt(np.maximum(2 - 2 * kth.astype(np.float64), 0))


@register
class NNGuide(Scorer):
    """Energy × mean of the k largest similarities between the normalised feature and the training bank of
    normalised features scaled by their energy."""

    name = "nnguide"
    inputs = "features + head"
    reference = "Park, Jung & Teoh, Nearest neighbor guidance for OOD detection, ICCV 2023"
    defaults = "OpenOOD v1.5 (OpenOOD takes the first 1% of the training set, here the whole bank)"

    class Params(Params):
        k: int = Field(100, ge=1, description="neighbours whose mean guidance scales the confidence")
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        self.bank = bank
        self.guide = np.concatenate([energy(head(x)) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
                                     for x, _ in bank.chunks()])
        return self

    def score(self, features, logits):
        top = topk_similarities(l2_normalise(features), self.bank.stored(), self.args["k"], self.guide,
                                device=self.bank.device)
        return top.astype(np.float64).mean(1) * energy(self.head(features))


@register
class SHE(Scorer):
    """Inner product of the feature with the stored pattern (mean training feature of the rows the head
    classifies correctly) of its predicted class."""

    name = "she"
    inputs = "features + head"
    reference = "Zhang et al., OOD detection based on in-distribution data patterns memorization with modern " \
                "Hopfield energy (SHE), ICLR 2023"
    defaults = "OpenOOD v1.5 (inner product)"
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        c, d = head.weight.shape
        sums, counts = np.zeros((c, d)), np.zeros(c)
        all_sums, all_counts = np.zeros((c, d)), np.zeros(c)
        for x, y in bank.chunks():
            right = head(x).argmax(1) == y
            add_rows(sums, y[right], x[right])
            counts += np.bincount(y[right], minlength=c)
            add_rows(all_sums, y, x)
            all_counts += np.bincount(y, minlength=c)
        # a class with no correctly classified row falls back to the mean of all its rows (OpenOOD gives NaN,
        # pytorch-ood refuses); one without rows keeps a zero pattern
        fallback = counts == 0
        sums[fallback], counts[fallback] = all_sums[fallback], all_counts[fallback]
        self.patterns = sums / np.maximum(counts, 1)[:, None]
        return self

    def score(self, features, logits):
        return (features * self.patterns[self.head(features).argmax(1)]).sum(1)


def _min_distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """[N, K] squared Mahalanobis distances (x - m)^T P (x - m), for all classes at once."""
    xp = x @ precision
    return (xp * x).sum(1)[:, None] - 2 * xp @ means.T + ((means @ precision) * means).sum(1)


@register
class Mahalanobis(Scorer):
    """-min over classes of the squared Mahalanobis distance, class means and one shared covariance."""

    name = "mahalanobis"
    inputs = "features"
    reference = "Lee et al., A simple unified framework for detecting OOD samples and adversarial attacks, NeurIPS 2018"
    needs_bank = True
    normalise: ClassVar[bool] = False

    def fit(self, bank, head):
        super().fit(bank, head)
        m = bank.moments(self.normalise)
        self.means, self.precision = m.class_means, self._inverse(m.within_covariance(),
                                                                  f"class-centred covariance of {m.n} rows")
        return self

    def _inverse(self, cov: np.ndarray, what: str) -> np.ndarray:
        """The precision of ``cov``, inverted on its support (`symmetric_inverse`, pinvh's cutoff); a note
        when that support is smaller than the feature dimension (fewer rows than dimensions, or a degenerate bank)."""
        precision, rank = symmetric_inverse(cov)
        if rank < len(cov):
            self.note(f"{self.name}: {what} in {len(cov)} dimensions has rank {rank}: inverted on its "
                      f"{rank}-dimensional support (pinvh cutoff)")
        return precision

    def _prepare(self, x):
        return l2_normalise(x) if self.normalise else x

    def score(self, features, logits):
        return -_min_distance(self._prepare(features), self.means, self.precision).min(1)


@register
class MahalanobisPP(Mahalanobis):
    """Mahalanobis on L2-normalised features (fit and queries)."""

    name = "mahalanobis_pp"
    reference = "Mueller & Hein, Mahalanobis++: improving OOD detection via feature normalization, ICML 2025"
    normalise = True


@register
class RMDS(Mahalanobis):
    """Relative Mahalanobis: -min over classes of (class distance - distance to the one background Gaussian)."""

    name = "rmds"
    inputs = "features"
    reference = "Ren et al., A simple fix to Mahalanobis distance for improving near-OOD detection, 2021"

    def fit(self, bank, head):
        super().fit(bank, head)
        m = bank.moments()
        self.mean = m.mean[None, :]
        self.background = self._inverse(m.covariance(), f"covariance of {m.n} rows about their mean")
        return self

    def score(self, features, logits):
        return -(_min_distance(features, self.means, self.precision)
                 - _min_distance(features, self.mean, self.background)).min(1)


class _Subspace(Scorer):
    """The norm of the feature's residual outside the principal subspace of the training features, taken
    about the head's origin -pinv(W) b; ``dim`` 0 = the ViM paper's rule (1000 for D ≥ 2048, 512 for
    D ≥ 768, else D / 2).

    The subspace is the top ``dim`` eigenvectors of the second moment about the origin. Where the training rows
    span fewer than ``dim`` directions (rank by pinvh's cutoff; a bank of fewer rows than ``dim``), the rest of
    it would be an arbitrary basis of rounding noise and the scores with it, so the fit refuses and names the
    largest ``dim`` that is determined. (The origin uses numpy's pinv of the head's weight as OpenOOD does: a
    trained head is of full rank, and nothing here is a covariance.)"""

    reference = "Wang et al., ViM: out-of-distribution with virtual-logit matching, CVPR 2022"
    class Params(Params):
        dim: int = Field(0, ge=0, description="principal subspace dimension; 0: the ViM paper's rule")

    needs_bank = True
    residual_needed: ClassVar[bool] = False  # ViM divides by the training rows' mean residual

    def fit(self, bank, head):
        super().fit(bank, head)
        d = head.weight.shape[1]
        dim = self.args["dim"] or (1000 if d >= 2048 else 512 if d >= 768 else d // 2)
        if not 0 < dim < d:
            raise FitError(f"{self.name}.dim={dim} must lie between 1 and the feature dimension - 1 ({d - 1})")
        self.origin = -np.linalg.pinv(head.weight) @ head.bias
        m = bank.moments()
        _, vectors, support = symmetric_eigh(m.second_moment_about(self.origin))  # ascending eigenvalues
        rank, most = int(support.sum()), int(support.sum()) - self.residual_needed
        if dim > most:
            why = ("every training row would have a residual of rounding noise, and alpha divides by their mean"
                   if self.residual_needed and dim == rank else
                   f"the rest of a {dim}-dimensional principal subspace would be rounding noise")
            fix = (f"pass {self.name}.dim={most} or less" if most >= 1 else
                   "no dimension is determined (constant or nearly constant training features): the scorer cannot "
                   "fit on this training set")
            raise FitError(f"{self.name}.dim={dim}: the {m.n} training rows span {rank} dimensions about the "
                           f"head's origin (pinvh cutoff): {why}; {fix}")
        self.null = vectors[:, : d - dim]  # the least-varying directions
        return self

    def residual(self, x: np.ndarray) -> np.ndarray:
        return np.linalg.norm((x - self.origin) @ self.null, axis=1)


@register
class Residual(_Subspace):
    name = "residual"
    inputs = "features"

    def score(self, features, logits):
        return -self.residual(features)


@register
class ViM(_Subspace):
    """Energy minus alpha × the residual norm, alpha = mean max logit / mean residual norm on the bank."""

    name = "vim"
    inputs = "features + head"
    residual_needed = True

    def fit(self, bank, head):
        super().fit(bank, head)
        top = res = 0.0
        for x, _ in bank.chunks():
            top, res = top + head(x).max(1).sum(), res + self.residual(x).sum()
        self.alpha = top / res
        return self

    def score(self, features, logits):
        return energy(self.head(features)) - self.alpha * self.residual(features)
