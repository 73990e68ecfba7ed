"""Scorers that read the logits alone."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from .fit import add_rows
from .scorers import Params, Scorer, register
from .scores import energy, max_logit, msp, softmax


@register
class MSP(Scorer):
    name = "msp"
    reference = "Hendrycks & Gimpel, ICLR 2017 (log max softmax; docs/design.md, 'OOD metrics')"

    def score(self, features, logits):
        return msp(logits)


@register
class Energy(Scorer):
    name = "energy"
    reference = "Liu et al., Energy-based OOD detection, NeurIPS 2020"
    class Params(Params):
        temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="softmax temperature")

    def score(self, features, logits):
        return energy(logits, self.args["temperature"])


@register
class MaxLogit(Scorer):
    name = "maxlogit"
    reference = "Hendrycks et al., Scaling OOD detection to real-world settings, ICML 2022"

    def score(self, features, logits):
        return max_logit(logits)


@register
class GEN(Scorer):
    """Negative generalized entropy of the M largest softmax probabilities: -sum p^g (1-p)^g."""

    name = "gen"
    reference = "Liu, Lochman & Zach, GEN, CVPR 2023"
    defaults = "OpenOOD v1.5"

    class Params(Params):
        gamma: float = Field(0.1, gt=0, allow_inf_nan=False, description="the entropy's exponent")
        M: int = Field(100, ge=1, description="the largest probabilities it sums over")

    def score(self, features, logits):
        p = np.sort(softmax(logits), axis=1)[:, ::-1][:, :self.args["M"]]
        g = self.args["gamma"]
        return -(p ** g * (1 - p) ** g).sum(1)


@register
class KLMatching(Scorer):
    """-min_k KL(p || d_k), d_k the mean posterior of the training rows the head predicts as k."""

    name = "klm"
    reference = "Hendrycks et al., Scaling OOD detection to real-world settings, ICML 2022"
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        c = len(head.bias)
        sums, counts = np.zeros((c, c)), np.zeros(c)
        for x, _ in bank.chunks():
            p = softmax(head(x))
            pred = p.argmax(1)
            add_rows(sums, pred, p)
            counts += np.bincount(pred, minlength=c)
        seen = counts > 0  # classes the head never predicts on the bank have no typical posterior
        self.log_d = np.log(np.maximum(sums[seen] / counts[seen, None], np.finfo(np.float64).tiny))
        return self

    def score(self, features, logits):
        p = softmax(logits)
        p_log_p = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1, keepdims=True)
        return -(p_log_p - p @ self.log_d.T).min(1)
