"""The scorer registry: every post-hoc OOD scorer behind one protocol, registered by name (as timm registers models).

A scorer is made with its hyperparameters (`make("react", percentile=0.9)`), fitted once per head on
the training bank (`fit(bank, head)`, streamed: see `fit.py`), and then scores query chunks
(`score(features, logits)`, float64, larger = more in-distribution). Scorers that need no training
statistics ignore the bank. Defaults are OpenOOD v1.5's ImageNet settings where it has the method,
else the paper's; each class says which.

ReAct, ASH, SCALE and DICE were designed for non-negative post-ReLU features. They are implemented
here as published; on signed LayerNorm features (ViT) clipping, pruning and the sum-based scalings act
on signed values, which the README discusses and measures.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .fit import Bank, FitError, add_rows, l2_normalise, quantile, topk_similarities
from .scores import energy, max_logit, msp, softmax


@dataclass
class Linear:
    """The linear head a scorer works with: ``logits = x @ weight.T + bias`` (float64)."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        self.weight, self.bias = np.asarray(self.weight, np.float64), np.asarray(self.bias, np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


class Scorer:
    """One OOD scorer. Subclasses set ``name``, ``reference``, ``defaults`` (where the defaults come from)
    and ``params`` (hyperparameters with default values), and implement ``score``; those that need
    training statistics set ``needs_bank`` and implement ``fit``."""

    name: ClassVar[str]
    reference: ClassVar[str]
    defaults: ClassVar[str] = "the paper"
    params: ClassVar[dict[str, Any]] = {}
    limits: ClassVar[dict[str, tuple[float, float]]] = {}  # param -> [low, high) it must lie in
    needs_bank: ClassVar[bool] = False
    inputs: ClassVar[str] = "logits"  # what it reads, for `regcache scorers`

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise ValueError(f"scorer {self.name} has no hyperparameter {unknown[0]!r} (it has: {known})")
        self.args = {k: _cast(self.name, k, params.get(k, d), d) for k, d in self.params.items()}
        for k, (lo, hi) in self.limits.items():
            if not lo <= self.args[k] < hi:
                raise ValueError(f"{self.name}.{k}={self.args[k]}: must lie in [{lo}, {hi})")
        self.head: Linear | None = None

    def fit(self, bank: Bank | None, head: Linear) -> "Scorer":
        """Training statistics from ``bank`` (read in chunks); the base class only keeps the head."""
        if self.needs_bank and bank is None:
            raise FitError(f"scorer {self.name} needs the training features")
        self.head = head
        return self

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Scores of a chunk of queries (float64 features and the head's logits); larger = more in-distribution."""
        raise NotImplementedError


def _cast(scorer: str, key: str, value: Any, default: Any) -> Any:
    """A hyperparameter in its default's type (values from the command line arrive as text)."""
    kind = type(default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{scorer}.{key}={value!r}: expected a {kind.__name__}") from None


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    if cls.name in SCORERS:
        raise ValueError(f"scorer {cls.name!r} registered twice")
    SCORERS[cls.name] = cls
    return cls


def resolve(names: Sequence[str]) -> list[str]:
    """Scorer names in order, ``all`` expanded to every registered scorer; unknown names refused."""
    out: list[str] = []
    for n in names:
        for m in (SCORERS if n == "all" else [n]):
            if m not in SCORERS:
                raise ValueError(f"unknown scorer {m!r}; known: {', '.join(SCORERS)} (or all)")
            if m not in out:
                out.append(m)
    return out


def parse_args(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["react.percentile=0.9", …]`` → ``{"react": {"percentile": "0.9"}}``; names checked, values cast by `make`."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        scorer, dot, param = key.strip().partition(".")
        if not (eq and dot and scorer and param):
            raise ValueError(f"scorer argument {item!r}: expected SCORER.PARAM=VALUE, e.g. react.percentile=0.9")
        if scorer not in SCORERS:
            raise ValueError(f"scorer argument {item!r}: unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
        if param not in SCORERS[scorer].params:
            raise ValueError(f"scorer argument {item!r}: {scorer} has no hyperparameter {param!r} "
                             f"(it has: {', '.join(SCORERS[scorer].params) or 'none'})")
        out.setdefault(scorer, {})[param] = value.strip()
    return out


def make(name: str, **params: Any) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name](**params)


# =========================================================================== from logits

@register
class MSP(Scorer):
    name = "msp"
    reference = "Hendrycks & Gimpel, ICLR 2017 (log max softmax, DESIGN §5)"

    def score(self, features, logits):
        return msp(logits)


@register
class Energy(Scorer):
    name = "energy"
    reference = "Liu et al., Energy-based OOD detection, NeurIPS 2020"
    params = {"temperature": 1.0}
    limits = {"temperature": (1e-12, np.inf)}

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
    defaults = "OpenOOD v1.5 (gamma 0.1, M 100)"
    params = {"gamma": 0.1, "M": 100}
    limits = {"gamma": (1e-12, np.inf), "M": (1, np.inf)}

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


# =========================================================================== from features and the head
# Each reshapes the penultimate features (or the head) and takes the energy of the new logits.

def _keep_top(x: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask of each row's k = D - round(D * percentile) largest values, k), as ASH and SCALE define it."""
    d = x.shape[1]
    k = d - int(np.round(d * percentile))
    if k < 1:
        raise ValueError(f"percentile {percentile} keeps no feature of {d}")
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
    defaults = "OpenOOD v1.5 and the paper (90th percentile)"
    params = {"percentile": 0.90}
    limits = {"percentile": (0.0, 1.0)}
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        self.threshold = bank.memo(("quantile", self.args["percentile"]), lambda: quantile(bank, self.args["percentile"]))
        return self

    def shape(self, x):
        return np.minimum(x, self.threshold)


class _ASH(_Shaping):
    reference = "Djurisic et al., Extremely simple activation shaping (ASH), ICLR 2023"
    defaults = "OpenOOD v1.5 (percentile 90)"
    params = {"percentile": 0.90}
    limits = {"percentile": (0.0, 1.0)}


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
    defaults = "OpenOOD v1.5 (percentile 85)"
    params = {"percentile": 0.85}
    limits = {"percentile": (0.0, 1.0)}

    def shape(self, x):
        mask = _keep_top(x, self.args["percentile"])[0]
        return x * np.exp(x.sum(1, keepdims=True) / np.where(mask, x, 0.0).sum(1, keepdims=True))


@register
class DICE(_Shaping):
    """Energy of the head with the weights whose contribution (training mean × weight) is at or below the
    p-quantile of all contributions zeroed."""

    name = "dice"
    reference = "Sun & Li, DICE: leveraging sparsification for OOD detection, ECCV 2022"
    defaults = "OpenOOD v1.5 (p 0.9; the paper uses 0.7 on ImageNet)"
    params = {"p": 0.90}
    limits = {"p": (0.0, 1.0)}
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
    params = {"temperature": 1.0}
    limits = {"temperature": (1e-12, np.inf)}

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
    defaults = "OpenOOD v1.5 (alpha 1e-4)"
    params = {"alpha": 1e-4}
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        self.mean = bank.moments().mean
        return self

    def score(self, features, logits):
        c = features - self.mean
        w = self.head.weight[self.head(features).argmax(1)]
        return (c * w).sum(1) / np.linalg.norm(c, axis=1) + self.args["alpha"] * np.abs(features).sum(1)


# =========================================================================== from features and training statistics

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
    defaults = "OpenOOD v1.5 (k 50)"
    params = {"k": 50}
    limits = {"k": (1, np.inf)}
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
    defaults = "OpenOOD v1.5 (k 100; OpenOOD takes the first 1% of the training set, here the whole bank)"
    params = {"k": 100}
    limits = {"k": (1, np.inf)}
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
        self.means, self.precision = m.class_means, np.linalg.pinv(m.within_covariance(), hermitian=True)
        return self

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
        self.mean, self.background = m.mean[None, :], np.linalg.pinv(m.covariance(), hermitian=True)
        return self

    def score(self, features, logits):
        return -(_min_distance(features, self.means, self.precision)
                 - _min_distance(features, self.mean, self.background)).min(1)


class _Subspace(Scorer):
    """The norm of the feature's residual outside the principal subspace of the training features, taken
    about the head's origin -pinv(W) b; ``dim`` 0 = the ViM paper's rule (1000 for D ≥ 2048, 512 for
    D ≥ 768, else D / 2)."""

    reference = "Wang et al., ViM: out-of-distribution with virtual-logit matching, CVPR 2022"
    params = {"dim": 0}
    needs_bank = True

    def fit(self, bank, head):
        super().fit(bank, head)
        d = head.weight.shape[1]
        dim = self.args["dim"] or (1000 if d >= 2048 else 512 if d >= 768 else d // 2)
        if not 0 < dim < d:
            raise ValueError(f"{self.name}.dim={dim} must lie between 1 and the feature dimension - 1 ({d - 1})")
        self.origin = -np.linalg.pinv(head.weight) @ head.bias
        _, vectors = np.linalg.eigh(bank.moments().second_moment_about(self.origin))  # ascending eigenvalues
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

    def fit(self, bank, head):
        super().fit(bank, head)
        top = res = 0.0
        for x, _ in bank.chunks():
            top, res = top + head(x).max(1).sum(), res + self.residual(x).sum()
        self.alpha = top / res
        return self

    def score(self, features, logits):
        return energy(self.head(features)) - self.alpha * self.residual(features)
