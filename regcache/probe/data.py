"""Cached sets as the probe reads them: checking they fit together, rows and labels."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..sets import Named
from ..settings import backbone
from ..store import FeatureSet
from ..store.meta import Description


class ProbeError(ValueError):
    """Input the probe cannot use: a missing feature set, an empty set, non-finite features, …"""


# --------------------------------------------------------------------------- compatible sets

def check_compatible(sets: Sequence[tuple[str, FeatureSet]]) -> None:
    """Every set one head reads must come from the same backbone: the backbone part of their identities
    (`settings.backbone`: weights, model arguments, position embeddings, test-time registers,
    preprocessing, precision) is equal. Augmented views and stored features may differ."""
    ref_name, ref = sets[0]
    want = backbone(ref.identity)
    for name, fs in sets[1:]:
        got = backbone(fs.identity)
        diff = [k for k in want if want[k] != got[k]]
        if diff:
            raise ProbeError(f"{name} ({fs.path}) and {ref_name} ({ref.path}) were made with different backbones "
                             f"or preprocessing (they differ in {', '.join(diff)}); a head reads one backbone's "
                             "features")


# --------------------------------------------------------------------------- data

@dataclass
class Split:
    """Features (float16, by name), labels and keys of one set as the probe uses them."""

    name: str
    x: dict[str, np.ndarray]
    labels: np.ndarray
    keys: np.ndarray
    views: np.ndarray
    subset: np.ndarray | None = None  # ID class indices of a class-subset set

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray, name: str | None = None) -> "Split":
        return Split(name or self.name, {k: v[rows] for k, v in self.x.items()}, self.labels[rows],
                     self.keys[rows], self.views[rows], self.subset)

    def dims(self, names: Sequence[str]) -> dict[str, int]:
        return {f: int(np.prod(self.x[f].shape[1:])) for f in names}

    def batches(self, batch: int, gen: torch.Generator, device: torch.device) -> Iterator:
        """Endless (features by name, labels) mini-batches, reshuffled each epoch (remainders dropped)."""
        x = {f: torch.from_numpy(np.ascontiguousarray(v)).flatten(1).to(device) for f, v in self.x.items()}
        y = torch.from_numpy(self.labels).to(device)
        while True:
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(perm) - batch + 1, batch):
                idx = perm[i:i + batch].to(device)
                yield {f: v[idx] for f, v in x.items()}, y[idx]

    def combo(self, features: Sequence[str], rows: np.ndarray | slice = slice(None)) -> torch.Tensor:
        """The concatenation of ``features`` (``reg_all`` flattened) for ``rows``, in float32."""
        return torch.cat([torch.from_numpy(np.ascontiguousarray(self.x[f][rows])).float().flatten(1)
                          for f in features], 1)


@dataclass
class StreamedSplit:
    """A training set read from the store a window of units at a time, for sets larger than memory.

    Each epoch visits the units in a seeded random order; rows of ``window`` units are shuffled
    together (a shuffle buffer), and rows left over carry into the next window.
    """

    fs: FeatureSet
    name: str
    features: Sequence[str]
    window: int = 16
    views: Sequence[int] | None = None

    def __post_init__(self) -> None:
        idx = self.fs.index
        if self.views is not None:
            idx = idx[idx.view.isin(list(self.views))]
        if (idx.label < 0).any():
            raise ProbeError(f"{self.name} has unlabelled rows; a training set needs labels")
        self.rows, self.labels = idx.row.to_numpy(), idx.label.to_numpy()
        self.keys, self.view_ids = idx.key.to_numpy(), idx.view.to_numpy()
        self.units = self.rows // self.fs.unit_rows
        self.check_finite()

    def check_finite(self) -> None:
        """One read of every row, a unit at a time, before training: a NaN would otherwise reach the weights."""
        for f in sorted(self.features):
            bad = np.zeros(len(self.rows), bool)
            for u in np.unique(self.units):
                sel = np.flatnonzero(self.units == u)
                bad[sel] = _non_finite_rows(self.fs.read_rows(f, self.rows[sel]))
            _refuse_non_finite(self.name, self.fs.path, f, bad, self.keys)

    def __len__(self) -> int:
        return len(self.rows)

    def dims(self, names: Sequence[str]) -> dict[str, int]:
        return {f: int(np.prod(self.fs.layout.shape(f))) for f in names}

    def batches(self, batch: int, gen: torch.Generator, device: torch.device) -> Iterator:
        names = sorted(self.features)
        units = np.unique(self.units)
        while True:
            order = units[torch.randperm(len(units), generator=gen).numpy()]
            carry_x, carry_y = None, None
            for w in range(0, len(order), self.window):
                sel = np.flatnonzero(np.isin(self.units, order[w:w + self.window]))
                x = {f: torch.from_numpy(self.fs.read_rows(f, self.rows[sel])).flatten(1) for f in names}
                y = torch.from_numpy(self.labels[sel])
                if carry_x is not None:
                    x = {f: torch.cat([carry_x[f], x[f]]) for f in names}
                    y = torch.cat([carry_y, y])
                perm = torch.randperm(len(y), generator=gen)
                full = len(perm) - len(perm) % batch
                for i in range(0, full, batch):
                    idx = perm[i:i + batch]
                    yield {f: x[f][idx].to(device) for f in names}, y[idx].to(device)
                carry_x, carry_y = {f: x[f][perm[full:]] for f in names}, y[perm[full:]]


def _refuse_non_finite(name: str, path, feature: str, bad: np.ndarray, keys: np.ndarray) -> None:
    """``bad``: one flag per row. The same message on every path (in memory, streamed, ``score``)."""
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ProbeError(f"{name} ({path}): non-finite {feature} in {len(rows)} rows, e.g. rows {rows[:5].tolist()} "
                         f"(keys {np.asarray(keys)[rows[:5]].tolist()})")


def _non_finite_rows(a: np.ndarray, chunk: int = 65536) -> np.ndarray:
    flat = a.reshape(len(a), -1)
    return np.concatenate([~np.isfinite(flat[i:i + chunk]).all(1) for i in range(0, len(a), chunk)] or
                          [np.zeros(0, bool)])


def load_split(fs: FeatureSet, features: Sequence[str], name: str, views: Sequence[int] | None = (0,)) -> Split:
    """Read a set in float16; refuse an empty one and name the rows of any non-finite feature.

    Labels stay as stored (indices into the set's own class list); ``map_labels`` puts them into the
    training set's classes.
    """
    got = fs.load(features, views=views, concat=False, dtype=np.float16)
    if not len(got.labels):
        raise ProbeError(f"{name} ({fs.path}) has no rows")
    for f, a in got.x.items():
        _refuse_non_finite(name, fs.path, f, _non_finite_rows(a), got.keys)
    return Split(name, got.x, got.labels, got.keys, got.views)


# --------------------------------------------------------------------------- class names

def class_names(d: Description) -> tuple[list[str] | None, list[str] | None]:
    """(class names that the set's labels index, its class subset: names, or integer ids in an unnamed set).

    Labels index ``classes``; a set with a subset of names but no class list (ImageNet-A/R shards
    labelled 0..199 in their own order) has labels that index its subset.
    """
    classes, subset = d.classes, d.subset
    subset = [str(c) for c in subset] if subset else None
    if classes is None and subset and not all(c.isdigit() for c in subset):
        classes = subset
    return (list(classes) if classes else None), subset


def _list(names) -> str:
    names = list(names)
    return ", ".join(map(str, names[:10])) + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")


def map_labels(split: Split, named: Named, id_classes: Sequence[str] | None, num_classes: int) -> Split:
    """Put a labelled set's labels (and its class subset) into the training set's classes, by name.

    Both sets named: map by name, refusing names the training set lacks. Neither named (pattern sets):
    labels are integer ids shared by both, and must be below ``num_classes``. One named and one not:
    no mapping is possible, refused.
    """
    name = split.name
    if (split.labels < 0).any():
        raise ProbeError(f"{name} ({named.fs.path}) has {int((split.labels < 0).sum())} unlabelled rows; "
                         "accuracy needs labels (pass unlabelled sets as --anomaly)")
    own, subset = class_names(named.description)
    if (own is None) != (id_classes is None):
        named, unnamed = (name, "the training set") if id_classes is None else ("the training set", name)
        raise ProbeError(f"{unnamed} has no class names (integer labels) but {named} has: labels cannot be mapped "
                         "by name; give both manifests a class list (classes or classes_file)")
    for which, names in ((name, own), ("the training set", id_classes)):
        twice = sorted({n for n in names if list(names).count(n) > 1}) if names is not None else []
        if twice:
            raise ProbeError(f"{which} names a class more than once ({_list(twice)}): labels map by name and "
                             "would merge")
    labels, sub = split.labels, None
    if own is None:
        beyond = labels >= num_classes
        if beyond.any():
            raise ProbeError(f"{name}: {int(beyond.sum())} rows have labels beyond the {num_classes} classes of "
                             f"the heads (labels {_list(np.unique(labels[beyond]))})")
        if subset:
            sub = np.array([int(c) for c in subset])
    else:
        pos = {c: i for i, c in enumerate(id_classes)}
        used = np.unique(labels)
        if used.max() >= len(own):
            raise ProbeError(f"{name}: labels up to {int(used.max())} but only {len(own)} class names")
        missing = [own[i] for i in used if own[i] not in pos]
        if missing:
            raise ProbeError(f"{name}: classes not among the training set's {len(id_classes)} classes: "
                             f"{_list(missing)}; they cannot be mapped")
        lut = np.array([pos.get(c, -1) for c in own])
        labels = lut[labels]
        if subset:  # names, as the manifest gives them (integer subsets belong to unnamed sets)
            missing = [c for c in subset if c not in pos]
            if missing:
                raise ProbeError(f"{name}: subset classes not among the training set's classes: {_list(missing)}")
            sub = np.array([pos[c] for c in subset])
    return Split(split.name, split.x, labels, split.keys, split.views, sub)


def holdout(split: Split, fraction: float, seed: int, kind: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """Rows to train on and view-0 rows to select on, split by key (all views of an image on one side).

    ``random``: ``round(fraction × images)`` images drawn at random (at least one). ``stratified``: DINOv3's
    split (dinov3/eval/data.py, ``split_train_val_datasets``): the images in dataset order shuffled by
    ``torch.randperm`` under ``seed``, then of each class with two or more images its first
    ``floor(fraction × its images)`` (at least one) in that order; a class of one image stays in train.
    """
    keys, first = np.unique(split.keys, return_index=True)
    if kind == "random":
        held = np.random.default_rng(seed).choice(keys, size=max(1, int(round(fraction * len(keys)))), replace=False)
    else:
        order = np.argsort(first)  # the images in dataset order
        keys, labels = keys[order], split.labels[first[order]]
        perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).numpy()
        shuffled = labels[perm]
        by_class = np.argsort(shuffled, kind="stable")  # per class, in shuffled order
        held = []
        for c, n in zip(*np.unique(shuffled, return_counts=True)):
            positions = by_class[shuffled[by_class] == c]
            held += list(keys[perm[positions[:max(1, int(fraction * n)) if n > 1 else 0]]])
        held = np.array(held, dtype=keys.dtype)
    mask = np.isin(split.keys, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask & (split.views == 0))
