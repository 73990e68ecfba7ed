"""Fitting on the training bank a chunk at a time: the statistics feature scorers need, never the bank in float64.

At ImageNet scale the bank (1.28M × 1024 float16) is 2.6 GB; a float64 copy would be 10.5 GB and a
query × bank similarity block tens of GB. So every statistic here is accumulated over chunks of rows
(means and D × D moments in float64, exact quantiles by counting float16 values or by histogram
refinement), k-NN keeps the bank once in its stored dtype and searches it exactly in chunks with a
running top-k merge, and a `Bank` memoises each statistic so that scorers sharing one (Mahalanobis,
RMDS, ViM, Residual, DICE, fDBD, NCI all use `moments`) read the bank once for it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


class FitError(ValueError):
    """A bank a scorer cannot fit on (too few rows for k, non-finite rows, …)."""


@dataclass
class Bank:
    """Training rows for fitting: ``read(rows)`` gives features [len(rows), D] in their stored dtype.

    ``device`` is where the k-NN search runs ('cpu', 'cuda', …). ``name`` is used in errors.
    """

    read: Callable[[np.ndarray], np.ndarray]
    labels: np.ndarray
    chunk: int = 16384
    device: str = "cpu"
    name: str = "training bank"
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_array(cls, x: np.ndarray, labels: np.ndarray, **kw) -> "Bank":
        x = np.asarray(x).reshape(len(x), -1)
        return cls(lambda rows: x[rows], np.asarray(labels), **kw)

    def __len__(self) -> int:
        return len(self.labels)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row positions, features in the stored dtype) of consecutive blocks of at most ``chunk`` rows."""
        if not len(self):
            raise FitError(f"{self.name} has no rows")
        for i in range(0, len(self), self.chunk):
            rows = np.arange(i, min(i + self.chunk, len(self)))
            yield rows, np.asarray(self.read(rows))

    def chunks(self, dtype=np.float64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features in ``dtype``, labels) of consecutive blocks of at most ``chunk`` rows."""
        for rows, x in self.blocks():
            yield x.astype(dtype, copy=False), self.labels[rows]

    def memo(self, key, compute: Callable[[], object]):
        """``compute()`` once per bank and key: scorers that need the same statistic share one pass."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def dtype(self) -> np.dtype:
        """The dtype the bank is stored in (float16 for a default cache)."""
        return np.asarray(self.read(np.arange(min(1, len(self))))).dtype

    def moments(self, normalise: bool = False) -> "Moments":
        return self.memo(("moments", normalise), lambda: Moments.of(self, normalise))

    def stored(self) -> np.ndarray:
        """The whole bank in its stored dtype (float16 for a default cache: the bank's own bytes), for k-NN;
        filled chunk by chunk into one array (no list of chunks to concatenate, which would double it)."""
        def fill() -> np.ndarray:
            out = None
            for rows, x in self.blocks():
                if out is None:
                    out = np.empty((len(self), x.shape[1]), x.dtype)
                out[rows] = x
            return out
        return self.memo("stored", fill)


BankSource = Callable[[Sequence[str], str], Bank]  # (feature combination, device) -> the training bank


def add_rows(target: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``target[index[i]] += values[i]`` for every i, in place (numpy's add.at is far slower)."""
    import torch  # here, so that validating scorer names (settings) loads no torch

    torch.from_numpy(target).index_add_(0, torch.from_numpy(np.asarray(index, np.int64)),
                                        torch.from_numpy(np.ascontiguousarray(values, target.dtype)))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Moments:
    """Counts, means and the within-class scatter of the bank, accumulated in float64 in one pass, per class and
    overall; the total covariance and second moments are derived from them.

    The within-class scatter is summed about each chunk's own class means and the chunks merged with Chan et
    al.'s update (a rank-one term per class from the difference of means), never as a scatter about one point
    minus the means' outer products: that subtraction loses ~eps x (between / within spread) of the result to
    cancellation (2e-11 relative with classes 100 spreads apart), which on a rank-deficient bank lands above
    the rank cutoff of `symmetric_inverse` and turns rounding noise into inverted directions."""

    classes: np.ndarray   # class ids present, ascending
    counts: np.ndarray    # rows per class
    ref: np.ndarray       # [D], the first chunk's mean: sums are taken about it, against cancellation
    sums: np.ndarray      # [K, D] per-class sums of (x - ref)
    within: np.ndarray    # [D, D] sum over rows of (x - m_y)(x - m_y)^T, m_y the row's class mean

    @classmethod
    def of(cls, bank: Bank, normalise: bool = False) -> "Moments":
        ref = sums = within = counts = None
        for x, y in bank.chunks():
            if normalise:
                x = l2_normalise(x)
            if ref is None:
                ref, d, k = x.mean(0), x.shape[1], int(bank.labels.max()) + 1
                sums, within, counts = np.zeros((k, d)), np.zeros((d, d)), np.zeros(k, np.int64)
            xc = x - ref
            present, inverse, n = np.unique(y, return_inverse=True, return_counts=True)
            chunk_sums = np.zeros((len(present), xc.shape[1]))
            add_rows(chunk_sums, inverse, xc)
            chunk_means = chunk_sums / n[:, None]
            r = xc - chunk_means[inverse]
            within += r.T @ r
            before = counts[present]
            seen = before > 0  # Chan's merge: n_a n_b / (n_a + n_b) (mean_b - mean_a)(mean_b - mean_a)^T per class
            if seen.any():
                delta = chunk_means[seen] - sums[present[seen]] / before[seen, None]
                weight = before[seen] * n[seen] / (before[seen] + n[seen])
                within += (delta * weight[:, None]).T @ delta
            sums[present] += chunk_sums
            counts[present] += n
        classes = np.flatnonzero(counts)
        return cls(classes, counts[classes], ref, sums[classes], within)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def class_means(self) -> np.ndarray:
        return self.ref + self.sums / self.counts[:, None]

    @property
    def mean(self) -> np.ndarray:
        return self.ref + self.sums.sum(0) / self.n

    def within_covariance(self) -> np.ndarray:
        """Shared within-class covariance: sum over classes of the scatter about each class mean, divided by N."""
        return self.within / self.n

    def covariance(self) -> np.ndarray:
        """Total covariance (divided by N): within-class plus between-class, a sum of two PSD terms."""
        between = self.sums / self.counts[:, None] - self.sums.sum(0) / self.n  # class means minus the mean
        return (self.within + (between * self.counts[:, None]).T @ between) / self.n

    def second_moment_about(self, origin: np.ndarray) -> np.ndarray:
        """(1/N) sum (x - origin)(x - origin)^T."""
        d = self.mean - origin
        return self.covariance() + np.outer(d, d)


def symmetric_eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eigenvalues ascending, eigenvectors, support mask) of a symmetric matrix. The support is the eigenvalues
    whose magnitude exceeds max(a.shape) · eps · the largest magnitude: scipy.linalg.pinvh's default cutoff, and
    so scikit-learn's EmpiricalCovariance.precision_ and OpenOOD's. numpy's pinv keeps anything above 1e-15
    relative, and so inverts the rounding noise (~1e-15 to 1e-14) of a rank-deficient covariance."""
    w, v = np.linalg.eigh(a)
    return w, v, np.abs(w) > max(a.shape) * np.finfo(a.dtype).eps * np.abs(w).max(initial=0.0)


def symmetric_inverse(a: np.ndarray) -> tuple[np.ndarray, int]:
    """(pseudo-inverse, rank) of a symmetric matrix inverted on its support only (`symmetric_eigh`): a
    rank-deficient covariance (fewer rows than dimensions) is inverted on the directions the rows span, and a
    component outside them adds nothing to a Mahalanobis distance."""
    w, v, keep = symmetric_eigh(a)
    return (v[:, keep] / w[keep]) @ v[:, keep].T, int(keep.sum())


def quantile(bank: Bank, q: float, bins: int = 65536, exact_below: int = 1 << 22) -> float:
    """``np.quantile(every value of the bank, q)`` (linear interpolation), exact, without holding the values.

    A float16 bank (the default cache dtype) has at most 65,536 distinct values: one pass counts each.
    Otherwise one pass finds the range, and histogram passes narrow it, for each of the two order statistics,
    to the bin that holds it, until it holds at most ``exact_below`` values; a last pass counts those.

    Every pass also counts the values at the two ends of each range, and when the tie at an end covers the
    order statistic that value is taken at once, as np.quantile takes it: post-ReLU features (~95% exact
    zeros, the minimum) need one pass. Without this a tie of more than ``exact_below`` values could never be
    narrowed below the threshold: the range shrank towards it for ~68 passes until np.histogram got
    decreasing bin edges (and two order statistics on either side of a tie kept one range that never
    shrank). A range too narrow to split (a few floats apart) is counted value by value.
    """
    if bank.dtype == np.float16:
        return _float16_quantile(bank, q)
    (whole,) = _Scan.of(bank, [None])
    pos = q * (whole.inside - 1)
    ks = sorted({int(np.floor(pos)), min(int(np.floor(pos)) + 1, whole.inside - 1)})
    # per order statistic: values below its range, the range [a, b], and the last pass's scan of that range
    open_ = {k: (0, whole.lo, whole.hi, whole) for k in ks}
    found: dict[int, float] = {}
    left: dict[int, tuple[int, float, float]] = {}  # to count value by value
    while open_:
        narrowed = {}
        for k, (below, a, b, scan) in open_.items():
            if (tie := scan.tie(below, k)) is not None:
                found[k] = tie
                continue
            if scan.counts is not None and scan.inside > exact_below:  # the bin that holds rank k
                i = int(np.searchsorted(below + np.cumsum(scan.counts), k, "right"))
                below, a, b = below + int(scan.counts[:i].sum()), scan.edges[i], scan.edges[i + 1]
            edges = np.linspace(a, b, bins + 1)
            if scan.inside <= exact_below or not (np.diff(edges) > 0).all():
                left[k] = (below, a, b)
            else:
                narrowed[k] = (below, a, b, edges)
        ranges = {(a, b): edges for _, a, b, edges in narrowed.values()}  # both in one bin: one scan of it
        scans = dict(zip(ranges, _Scan.of(bank, list(ranges.values())))) if ranges else {}
        open_ = {k: (below, a, b, scans[a, b]) for k, (below, a, b, _) in narrowed.items()}
    counted = {r: _distinct(bank, *r) for r in dict.fromkeys((a, b) for _, a, b in left.values())}
    for k, (below, a, b) in left.items():
        values, cum = counted[a, b]
        found[k] = float(values[np.searchsorted(cum, k - below, "right")])
    return _lerp(found[ks[0]], found[ks[-1]], pos - np.floor(pos))


@dataclass
class _Scan:
    """The values of the bank in [edges[0], edges[-1]] (all of them when edges is None): how many, the smallest
    and largest and how many equal each, and their histogram over ``edges``."""

    edges: np.ndarray | None
    counts: np.ndarray | None
    inside: int = 0
    lo: float = np.inf
    n_lo: int = 0
    hi: float = -np.inf
    n_hi: int = 0

    @classmethod
    def of(cls, bank: Bank, edges: list[np.ndarray | None]) -> "list[_Scan]":
        """One pass over the bank scanning every range in ``edges``."""
        scans = [cls(e, None if e is None else np.zeros(len(e) - 1, np.int64)) for e in edges]
        for x, _ in bank.chunks(np.float64):
            for s in scans:
                s.add(x.ravel())
        return scans

    def add(self, v: np.ndarray) -> None:
        if self.edges is not None:
            v = v[(v >= self.edges[0]) & (v <= self.edges[-1])]
            self.counts += np.histogram(v, self.edges)[0]
        if not v.size:
            return
        self.inside += v.size
        lo, hi = v.min(), v.max()
        if lo < self.lo:
            self.lo, self.n_lo = lo, 0
        if hi > self.hi:
            self.hi, self.n_hi = hi, 0
        self.n_lo += int((v == self.lo).sum())
        self.n_hi += int((v == self.hi).sum())

    def tie(self, below: int, k: int) -> float | None:
        """The value of rank ``k`` when the tie at the smallest or largest value here covers it (the values here
        hold ranks below .. below + inside - 1), else None."""
        if k < below + self.n_lo:
            return float(self.lo)
        if k >= below + self.inside - self.n_hi:
            return float(self.hi)
        return None


def _distinct(bank: Bank, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values in [a, b] ascending, cumulative counts): the last pass, over a range that holds few
    values, or few distinct ones."""
    values, counts = np.empty(0), np.empty(0, np.int64)
    for x, _ in bank.chunks(np.float64):
        v = x.ravel()
        u, c = np.unique(v[(v >= a) & (v <= b)], return_counts=True)
        values, inverse = np.unique(np.r_[values, u], return_inverse=True)
        counts = np.bincount(inverse, np.r_[counts, c], minlength=len(values)).astype(np.int64)
    return values, np.cumsum(counts)


def _float16_quantile(bank: Bank, q: float) -> float:
    counts = np.zeros(1 << 16, np.int64)
    for _, x in bank.blocks():
        counts += np.bincount(np.ascontiguousarray(x).view(np.uint16).ravel(), minlength=1 << 16)
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    seen = np.flatnonzero(counts)  # finite values only: the bank was checked
    order = np.argsort(values[seen], kind="stable")
    values, cum = values[seen][order], np.cumsum(counts[seen][order])
    pos = q * (cum[-1] - 1)
    k = int(np.floor(pos))
    lower, upper = values[np.searchsorted(cum, k, "right")], values[np.searchsorted(cum, min(k + 1, cum[-1] - 1), "right")]
    return _lerp(lower, upper, pos - k)


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's linear interpolation between order statistics, to the last bit (``np.quantile``'s _lerp)."""
    return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)


def topk_similarities(queries: np.ndarray, bank: np.ndarray, k: int, scale: np.ndarray | None = None,
                      device: str = "cpu", chunk: int = 16384, query_chunk: int = 2048) -> np.ndarray:
    """[Q, k] largest values of ``queries @ (scale[:, None] * bank).T``, descending, in float32; exact.

    The bank is read once, ``chunk`` rows at a time (moved to ``device`` and made float32 per chunk),
    and each query's running top k is merged with the chunk's, ``query_chunk`` queries at a time: the
    similarity block is query_chunk × chunk floats (128 MB by default), never queries × bank.
    """
    import torch

    if k > len(bank):
        raise FitError(f"k={k} exceeds the {len(bank)} rows of the training bank")
    dev = torch.device(device)
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(dev)
    top = torch.full((len(q), 0), -torch.inf, device=dev, dtype=torch.float32)
    for b0 in range(0, len(bank), chunk):
        b = torch.from_numpy(np.ascontiguousarray(bank[b0:b0 + chunk])).to(dev, torch.float32)
        if scale is not None:
            b = b * torch.from_numpy(np.ascontiguousarray(scale[b0:b0 + chunk], np.float32)).to(dev)[:, None]
        width = min(k, top.shape[1] + len(b))
        top = torch.cat([torch.cat([top[i:i + query_chunk], q[i:i + query_chunk] @ b.T], 1).topk(width, dim=1).values
                         for i in range(0, len(q), query_chunk)]) if len(q) else top[:, :width]
    return top.cpu().numpy()
