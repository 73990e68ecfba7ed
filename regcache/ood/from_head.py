"""Scorers that read the features and the linear head (ReAct, ASH, SCALE, DICE, fDBD, GradNorm, NCI, …)."""
from __future__ import annotations

import numpy as np
from pydantic import Field

from .fit import FitError, quantile
from .scorers import Linear, Params, Scorer, register
from .scores import energy, softmax


# Each reshapes the penultimate features (or the head) and takes the energy of the new logits.

def _keep_top(x: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask of each row's k = D - round(D * percentile) largest values, k), as ASH and SCALE define it."""
    d = x.shape[1]
    k = d - int(np.round(d * percentile))
    if k < 1:
        raise FitError(f"percentile {percentile} keeps no feature of the {d} (a percentile for wider features)")
    idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
    mask = np.zeros(x.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask, k


class _Shaping(Scorer):
    """Energy of the head on reshaped features; subclasses define ``shape``."""

    inputs = "features + head"

    def shape(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(self, features, logits):
        return energy(self.head(self.shape(features)))


@register
class ReAct(_Shaping):
    """Clip features at the ``percentile`` quantile of all training activations, then energy."""

    name = "react"
    reference = "Sun, Guo & Li, ReAct, NeurIPS 2021"
    defaults = "OpenOOD v1.5 and the paper"

    class Params(Params):
        percentile: float = Field(0.90, ge=0, lt=1, description="clip at this quantile of the bank's activations")
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        self.threshold = bank.memo(("quantile", self.args["percentile"]), lambda: quantile(bank, self.args["percentile"]))
        return self

    def shape(self, x):
        return np.minimum(x, self.threshold)


class _ASH(_Shaping):
    reference = "Djurisic et al., Extremely simple activation shaping (ASH), ICLR 2023"
    defaults = "OpenOOD v1.5"

    class Params(Params):
        percentile: float = Field(0.90, ge=0, lt=1, description="the fraction of each row's features pruned")


@register
class ASHP(_ASH):
    """ASH-P: zero all but each row's top (1 - percentile) features."""

    name = "ash_p"

    def shape(self, x):
        return np.where(_keep_top(x, self.args["percentile"])[0], x, 0.0)


@register
class ASHB(_ASH):
    """ASH-B: the kept features all set to (sum of the row) / k."""

    name = "ash_b"

    def shape(self, x):
        mask, k = _keep_top(x, self.args["percentile"])
        return np.where(mask, x.sum(1, keepdims=True) / k, 0.0)


@register
class ASHS(_ASH):
    """ASH-S: the kept features scaled by exp(sum of the row / sum of the kept)."""

    name = "ash_s"

    def shape(self, x):
        mask = _keep_top(x, self.args["percentile"])[0]
        kept = np.where(mask, x, 0.0)
        return kept * np.exp(x.sum(1, keepdims=True) / kept.sum(1, keepdims=True))


@register
class SCALE(_Shaping):
    """All features scaled by exp(sum of the row / sum of its top (1 - percentile) features); nothing pruned."""

    name = "scale"
    reference = "Xu et al., Scaling for training time and post-hoc OOD detection enhancement (SCALE), ICLR 2024"
    defaults = "OpenOOD v1.5"

    class Params(Params):
        percentile: float = Field(0.85, ge=0, lt=1, description="the fraction of each row's features below the "
                                                                "scaling threshold")

    def shape(self, x):
        mask = _keep_top(x, self.args["percentile"])[0]
        return x * np.exp(x.sum(1, keepdims=True) / np.where(mask, x, 0.0).sum(1, keepdims=True))


@register
class DICE(_Shaping):
    """Energy of the head with the weights whose contribution (training mean × weight) is at or below the
    p-quantile of all contributions zeroed."""

    name = "dice"
    reference = "Sun & Li, DICE: leveraging sparsification for OOD detection, ECCV 2022"
    defaults = "OpenOOD v1.5 (the paper uses p 0.7 on ImageNet)"

    class Params(Params):
        p: float = Field(0.90, ge=0, lt=1, description="the fraction of the head's weight-times-mean contributions "
                                                       "dropped")
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        contrib = bank.moments().mean[None, :] * head.weight
        self.masked = Linear(np.where(contrib > np.quantile(contrib, self.args["p"]), head.weight, 0.0), head.bias)
        return self

    def score(self, features, logits):
        return energy(self.masked(features))


@register
class FDBD(Scorer):
    """Mean distance to the decision boundaries of the predicted class, over the distance to the training mean."""

    name = "fdbd"
    inputs = "features + head"
    reference = "Liu & Qin, Fast decision boundary based OOD detector (fDBD), ICML 2024"
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        self.mean = bank.moments().mean
        w = head.weight
        sq = (w * w).sum(1)
        self.gaps = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * w @ w.T, 0.0))  # ||w_p - w_c||
        np.fill_diagonal(self.gaps, 1.0)  # the predicted class's own term is 0 / 1
        return self

    def score(self, features, logits):
        z = self.head(features)
        pred = z.argmax(1)
        boundary = (np.abs(z - z[np.arange(len(z)), pred][:, None]) / self.gaps[pred]).sum(1)
        dist = np.maximum(np.linalg.norm(features - self.mean, axis=1), 1e-8)
        return boundary / ((z.shape[1] - 1) * dist)


@register
class GradNorm(Scorer):
    """L1 norm of the gradient of KL(uniform || softmax(z / T)) with respect to the head's weight, in closed
    form: sum_c |p_c - 1/C| · ||x||_1 (no backward pass; the weight gradient is the outer product)."""

    name = "gradnorm"
    inputs = "features + head"
    reference = "Huang, Geng & Li, On the importance of gradients for detecting distributional shifts, NeurIPS 2021"
    class Params(Params):
        temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="softmax temperature")

    def score(self, features, logits):
        z = self.head(features)
        p = softmax(z / self.args["temperature"])
        return np.abs(p - 1.0 / z.shape[1]).sum(1) * np.abs(features).sum(1) / self.args["temperature"]


@register
class NCI(Scorer):
    """Projection of the centred feature on the predicted class's weight, plus alpha × its L1 norm."""

    name = "nci"
    inputs = "features + head"
    reference = "Liu & Qin, Detecting OOD through the lens of neural collapse (NCI), CVPR 2025"
    defaults = "OpenOOD v1.5"

    class Params(Params):
        alpha: float = Field(1e-4, allow_inf_nan=False, description="weight of the feature-norm term")
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        self.mean = bank.moments().mean
        return self

    def score(self, features, logits):
        c = features - self.mean
        w = self.head.weight[self.head(features).argmax(1)]
        return (c * w).sum(1) / np.linalg.norm(c, axis=1) + self.args["alpha"] * np.abs(features).sum(1)
