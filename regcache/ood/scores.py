"""OOD scores (DESIGN §5): from logits, and from features with training statistics. Larger = more in-distribution."""
from __future__ import annotations

import numpy as np


# --------------------------------------------------------------------------- logit scores


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def msp(z: np.ndarray) -> np.ndarray:
    """Maximum softmax probability, in log space: ``log max softmax(z) = -log1p(sum_{j != argmax} e^(z_j - max z))``.

    Monotone in the MSP, so every metric is the MSP's; but where the probability would round to
    1.0 (float64 saturates at a logit gap of about 37), confident samples keep distinct scores
    instead of becoming ties.
    """
    z = np.asarray(z, dtype=np.float64)
    rows, top = np.arange(len(z)), z.argmax(axis=1)
    rest = np.exp(z - z[rows, top][:, None])
    rest[rows, top] = 0.0
    return -np.log1p(rest.sum(axis=1))


def energy(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy, ``T * logsumexp(z / T)``."""
    return temperature * _logsumexp(np.asarray(z, dtype=np.float64) / temperature)


def max_logit(z: np.ndarray) -> np.ndarray:
    return np.asarray(z, dtype=np.float64).max(axis=1)


LOGIT_SCORES = {"msp": msp, "energy": energy, "maxlogit": max_logit}


# --------------------------------------------------------------------------- feature-space scores


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_score(train: np.ndarray, test: np.ndarray, k: int = 50, chunk: int = 4096) -> np.ndarray:
    """Negative distance from each L2-normalised test feature to its k-th nearest training feature (Sun et al.)."""
    import torch

    bank = torch.from_numpy(_normalise(train))
    k = min(k, len(bank))
    out = []
    for part in np.array_split(_normalise(test), max(1, int(np.ceil(len(test) / chunk)))):
        sims = torch.from_numpy(part) @ bank.T
        kth = sims.topk(k, dim=1).values[:, -1]
        out.append(-torch.sqrt(torch.clamp(2 - 2 * kth, min=0)).numpy())
    return np.concatenate(out).astype(np.float64)


class Mahalanobis:
    """Class-conditional Gaussians with one shared covariance (Lee et al.); score = -min_c distance²."""

    def __init__(self, train: np.ndarray, labels: np.ndarray):
        x = np.asarray(train, dtype=np.float64)
        classes = np.unique(labels)
        self.means = np.stack([x[labels == c].mean(0) for c in classes])
        centred = x - self.means[np.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(x)
        self.precision = np.linalg.pinv(cov, hermitian=True)

    def score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        # (x-m)^T P (x-m) = x^T P x - 2 x^T P m + m^T P m, for all classes at once
        xp = x @ self.precision
        d = (xp * x).sum(1)[:, None] - 2 * xp @ self.means.T + ((self.means @ self.precision) * self.means).sum(1)
        return -d.min(axis=1)


class ViM:
    """Virtual-logit matching (Wang et al., 2022): energy minus the scaled norm of the feature's residual
    outside the principal subspace of the training features, taken about the head's origin -pinv(W) b."""

    def __init__(self, train: np.ndarray, weight: np.ndarray, bias: np.ndarray, dim: int | None = None):
        x = np.asarray(train, dtype=np.float64)
        d = x.shape[1]
        self.dim = dim or (1000 if d >= 2048 else 512 if d >= 768 else d // 2)  # the paper's rule
        self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.origin = -np.linalg.pinv(self.weight) @ self.bias
        centred = x - self.origin
        _, vectors = np.linalg.eigh(centred.T @ centred / len(x))  # ascending eigenvalues
        self.null = vectors[:, : d - self.dim]                     # the least-varying directions
        logits = x @ self.weight.T + self.bias
        self.alpha = logits.max(1).sum() / self._residual(x).sum()

    def _residual(self, x: np.ndarray) -> np.ndarray:
        return np.linalg.norm((x - self.origin) @ self.null, axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return energy(x @ self.weight.T + self.bias) - self.alpha * self._residual(x)
