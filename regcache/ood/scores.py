"""Scores from logits (docs/design.md, "OOD metrics"), in float64 and log space; larger = more in-distribution. The scorers use them."""
from __future__ import annotations

import numpy as np


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


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
