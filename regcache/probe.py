"""Stage 2: linear heads on cached features, evaluated for accuracy and OOD detection (DESIGN §5).

Never loads a backbone. All heads (feature combinations x learning rates x weight decays)
share each mini-batch: per combination, the heads' weights are one stacked tensor, so a step
is one matmul per combination, and each head keeps its own optimiser state.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import ood
from .features import parse_features
from .store import FeatureSet, list_feature_sets


class ProbeError(ValueError):
    """Input the probe cannot use: a missing feature set, an empty set, non-finite features, …"""


# --------------------------------------------------------------------------- finding feature sets

def find_feature_set(cache: str | os.PathLike, dataset: str, model: str, features: Sequence[str],
                     available: Sequence[FeatureSet] | None = None) -> FeatureSet:
    """The complete feature set of ``dataset`` (a name, or a feature-set path) for ``model`` (alias, timm
    name or fingerprint prefix) holding ``features``; if none, the error gives the command that makes it.

    ``available``: the cache's sets when the caller already listed them (finding several sets lists once).
    """
    from .models import ALIASES

    if (Path(dataset) / "regcache.json").is_file():
        return FeatureSet(dataset)
    timm_name = ALIASES.get(model, model)
    found = [fs for fs in (available if available is not None else list_feature_sets(cache))
             if fs.meta["dataset"]["name"] == dataset and fs.complete and set(features) <= set(fs.features)
             and (fs.meta["model"]["name"] == model or fs.meta["model"]["timm_name"] == timm_name
                  or fs.fingerprint.startswith(model))]
    if not found:
        raise ProbeError(f"no complete feature set of {dataset!r} for {model!r} with {','.join(features)} under "
                         f"{cache}; make it with:\n  regcache extract --model {model} --data manifests/{dataset}.yaml"
                         f" --features {','.join(features)}")
    if len(found) > 1:
        listing = "\n  ".join(str(fs.path) for fs in found)
        raise ProbeError(f"several feature sets of {dataset!r} for {model!r} (different settings); "
                         f"name one by path:\n  {listing}")
    return found[0]


def check_compatible(sets: dict[str, FeatureSet]) -> None:
    """Every set must come from the same backbone, weights, preprocessing and precision."""
    keys = ("model", "model_kwargs", "weights", "preprocess", "precision")
    ref_name, ref = next(iter(sets.items()))
    for name, fs in sets.items():
        a, b = ref.meta["identity"], fs.meta["identity"]
        diff = [k for k in keys if a.get(k) != b.get(k) and not (k == "preprocess" and _same_eval(a[k], b[k]))]
        if diff:
            raise ProbeError(f"{name} ({fs.path}) and {ref_name} ({ref.path}) differ in {', '.join(diff)}")


def _same_eval(a: dict, b: dict) -> bool:
    """Augmented views (train) and a plain eval set share view 0's preprocessing."""
    return {k: v for k, v in a.items() if k not in ("views", "seed")} == \
        {k: v for k, v in b.items() if k not in ("views", "seed")}


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

def _names(ds: dict) -> tuple[list[str] | None, list[str] | None]:
    """(class names that the set's labels index, its class subset: names, or integer ids in an unnamed set).

    Labels index ``classes``; a set with a subset of names but no class list (ImageNet-A/R shards
    labelled 0..199 in their own order) has labels that index its subset.
    """
    classes, subset = ds.get("classes"), ds.get("subset")
    subset = [str(c) for c in subset] if subset else None
    if classes is None and subset and not all(c.isdigit() for c in subset):
        classes = subset
    return (list(classes) if classes else None), subset


def _list(names) -> str:
    names = list(names)
    return ", ".join(map(str, names[:10])) + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")


def map_labels(split: Split, fs: FeatureSet, id_classes: Sequence[str] | None, num_classes: int) -> Split:
    """Put a labelled set's labels (and its class subset) into the training set's classes, by name.

    Both sets named: map by name, refusing names the training set lacks. Neither named (pattern sets):
    labels are integer ids shared by both, and must be below ``num_classes``. One named and one not:
    no mapping is possible, refused.
    """
    name = split.name
    if (split.labels < 0).any():
        raise ProbeError(f"{name} ({fs.path}) has {int((split.labels < 0).sum())} unlabelled rows; "
                         "accuracy needs labels (pass unlabelled sets as --anomaly)")
    own, subset = _names(fs.meta["dataset"])
    if (own is None) != (id_classes is None):
        named, unnamed = (name, "the training set") if id_classes is None else ("the training set", name)
        raise ProbeError(f"{unnamed} has no class names (integer labels) but {named} has: labels cannot be mapped "
                         "by name; give both manifests a class list (classes or classes_file)")
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


# --------------------------------------------------------------------------- training

@dataclass
class ProbeConfig:
    """Heads and their training; defaults follow the paper (SGD, lr 0.01, 10k iterations, batch 4096)."""

    features: list[tuple[str, ...]]
    lrs: tuple[float, ...] = (0.01,)
    wds: tuple[float, ...] = (0.0,)
    optimizer: str = "sgd"
    iterations: int = 10_000
    batch_size: int = 4096
    momentum: float = 0.9
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.1
    stream: bool = False        # read the training set window by window instead of loading it
    stream_window: int = 16     # units (input shards) per shuffle window when streaming

    def __post_init__(self) -> None:
        self.features = [parse_features(f) for f in self.features]
        if self.optimizer not in ("sgd", "adamw"):
            raise ProbeError("optimizer must be sgd or adamw")
        if not self.features:
            raise ProbeError("no feature combination")

    @property
    def grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.wds]


@dataclass
class Head:
    """One trained linear head: ``logits = x @ weight.T + bias`` on the concatenation of ``features``."""

    features: tuple[str, ...]
    lr: float
    wd: float
    weight: torch.Tensor
    bias: torch.Tensor
    val_acc: float = float("nan")

    def logits(self, split: Split, chunk: int = 65536) -> np.ndarray:
        out = [split.combo(self.features, np.arange(i, min(i + chunk, len(split)))) @ self.weight.T + self.bias
               for i in range(0, len(split), chunk)]
        return torch.cat(out).numpy()

    @property
    def name(self) -> str:
        return ",".join(self.features)


def save_heads(path: Path, heads: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors, info = {}, []
    for h in heads.values():
        tensors[f"{h.name}/weight"], tensors[f"{h.name}/bias"] = h.weight.contiguous(), h.bias.contiguous()
        info.append({"features": list(h.features), "lr": h.lr, "wd": h.wd, "val_acc": h.val_acc})
    save_file(tensors, str(path), metadata={"heads": json.dumps(info), **{k: json.dumps(v) for k, v in meta.items()}})


def load_heads(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["heads"])
        return [Head(tuple(h["features"]), h["lr"], h["wd"], f.get_tensor(f"{','.join(h['features'])}/weight"),
                     f.get_tensor(f"{','.join(h['features'])}/bias"), h["val_acc"]) for h in info]


class _Stacked:
    """SGD (momentum, cosine schedule) or AdamW over a stack of heads, each with its own lr and weight decay."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, wd: torch.Tensor, cfg: ProbeConfig):
        self.params, self.cfg, self.t = params, cfg, 0
        self.lr, self.wd = lr, wd
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        scale = 0.5 * (1 + math.cos(math.pi * (self.t - 1) / self.cfg.iterations))
        for p, (m, v) in zip(self.params, self.state):
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd = (self.lr * scale).view(shape), self.wd.view(shape)
            if self.cfg.optimizer == "sgd":
                m.mul_(self.cfg.momentum).add_(p.grad + wd * p)
                p.sub_(lr * m)
            else:
                b1, b2 = 0.9, 0.999
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                mhat, vhat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
                p.sub_(lr * (mhat / (vhat.sqrt() + 1e-8) + wd * p))
            p.grad = None


def train_heads(train: "Split | StreamedSplit", num_classes: int, cfg: ProbeConfig,
                progress: bool = False) -> list[Head]:
    """Train every head of ``cfg`` in one pass over shared mini-batches; returns them in grid order per combo.

    Under torch.distributed (torchrun), every rank draws the same global batch, computes the loss
    on its slice, and gradients are summed across ranks: the result equals a single process.
    """
    import torch.distributed as dist

    from .progress import progress as progress_bar

    device = torch.device(cfg.device)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    grid = cfg.grid
    lr = torch.tensor([g[0] for g in grid], device=device)
    wd = torch.tensor([g[1] for g in grid], device=device)
    names = sorted({f for combo in cfg.features for f in combo})
    width = train.dims(names)
    weights, biases = {}, {}
    for combo in cfg.features:  # zero init, as DINOv2's linear eval heads are near zero
        dim = sum(width[f] for f in combo)
        weights[combo] = torch.zeros(len(grid), dim, num_classes, device=device, requires_grad=True)
        biases[combo] = torch.zeros(len(grid), 1, num_classes, device=device, requires_grad=True)
    params = [*weights.values(), *biases.values()]
    opt = _Stacked(params, lr, wd, cfg)
    batches = train.batches(min(cfg.batch_size, len(train)), gen, device)
    for _ in progress_bar(range(cfg.iterations), disable=not progress or rank != 0, desc="heads", unit="it"):
        xb, yb = next(batches)
        n = len(yb)
        xb, yb = {f: v[rank::world].float() for f, v in xb.items()}, yb[rank::world]
        loss = 0.0
        for combo in cfg.features:
            xc = torch.cat([xb[f] for f in combo], 1)
            logits = torch.matmul(xc, weights[combo]) + biases[combo]  # [heads, batch, classes]
            loss = loss + torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), yb.repeat(len(grid)), reduction="sum") / n
        loss.backward()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
        opt.step()
    return [Head(combo, g[0], g[1], weights[combo][i].detach().T.cpu().contiguous(),
                 biases[combo][i, 0].detach().cpu().clone())
            for combo in cfg.features for i, g in enumerate(grid)]


def accuracy(logits: np.ndarray, labels: np.ndarray, subset: np.ndarray | None = None) -> float:
    """Top-1; with a class subset, the logits are restricted to its columns before the argmax."""
    return float(np.mean(predict(logits, subset) == labels))


def predict(logits: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
    if subset is None:
        return logits.argmax(1)
    return np.asarray(subset)[logits[:, subset].argmax(1)]


def select(heads: list[Head], val: Split) -> dict[tuple[str, ...], Head]:
    """Per feature combination, the head with the best validation accuracy (first on ties)."""
    best: dict[tuple[str, ...], Head] = {}
    for h in heads:
        h.val_acc = accuracy(h.logits(val), val.labels, val.subset)
        if h.features not in best or h.val_acc > best[h.features].val_acc:
            best[h.features] = h
    return best


def holdout(split: Split, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows to train on and view-0 rows to select on, split by key (all views of an image on one side)."""
    keys = np.unique(split.keys)
    rng = np.random.default_rng(seed)
    held = rng.choice(keys, size=max(1, int(round(fraction * len(keys)))), replace=False)
    mask = np.isin(split.keys, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask & (split.views == 0))


# --------------------------------------------------------------------------- evaluation

@dataclass
class Row:
    """One number of the long results table."""

    features: str
    set: str
    role: str
    metric: str
    value: float
    n: int
    scorer: str = ""
    lr: float = float("nan")
    wd: float = float("nan")


def evaluate(head: Head, id_split: Split, ood_gen: list[Split], anomalies: list[Split],
             scorers: Sequence[str], bank: tuple[Split, np.ndarray] | None = None, knn_k: int = 50,
             scores_out: dict | None = None) -> list[Row]:
    """ID and OOD accuracy, and per-anomaly-set FPR@95/AUROC/AUPR for every scorer, plus their means."""
    f, hp = head.name, dict(lr=head.lr, wd=head.wd)
    rows = [Row(f, id_split.name, "id", "top1", accuracy(head.logits(id_split), id_split.labels, id_split.subset),
               len(id_split), **hp)]
    for s in ood_gen:
        rows.append(Row(f, s.name, "ood-gen", "top1", accuracy(head.logits(s), s.labels, s.subset), len(s), **hp))
    if not anomalies:
        return rows
    score_fns = _scorers(head, scorers, bank, knn_k)
    id_scores = {name: fn(id_split) for name, fn in score_fns.items()}
    per: dict[tuple[str, str], list[float]] = {}
    for s in anomalies:
        for name, fn in score_fns.items():
            o = fn(s)
            if scores_out is not None:
                scores_out[(f, s.name, name)] = (id_scores[name], o)
            for metric, m in ood.METRICS.items():
                v = m(id_scores[name], o)
                rows.append(Row(f, s.name, "anomaly", metric, v, len(s), name, **hp))
                per.setdefault((name, metric), []).append(v)
    for (name, metric), values in per.items():
        rows.append(Row(f, "mean", "anomaly", metric, float(np.mean(values)),
                        sum(len(s) for s in anomalies), name, **hp))
    return rows


def _scorers(head: Head, scorers: Sequence[str], bank: tuple[Split, np.ndarray] | None, knn_k: int) -> dict:
    fns = {}
    for name in scorers:
        if name in ood.LOGIT_SCORES:
            fns[name] = (lambda fn: lambda s: fn(head.logits(s)))(ood.LOGIT_SCORES[name])
        elif name in FEATURE_SCORERS:
            if bank is None:
                raise ProbeError(f"scorer {name} needs the training features")
            train = bank[0].combo(head.features).numpy()
            if name == "knn":
                fns[name] = lambda s, t=train: ood.knn_score(t, s.combo(head.features).numpy(), k=knn_k)
            elif name == "vim":
                vim = ood.ViM(train, head.weight.numpy(), head.bias.numpy())
                fns[name] = lambda s, v=vim: v.score(s.combo(head.features).numpy())
            else:
                maha = ood.Mahalanobis(train, bank[1])
                fns[name] = lambda s, m=maha: m.score(s.combo(head.features).numpy())
        else:
            raise ProbeError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return fns


FEATURE_SCORERS = ("knn", "mahalanobis", "vim")  # these need the training features
SCORERS = (*ood.LOGIT_SCORES, *FEATURE_SCORERS)


# --------------------------------------------------------------------------- a whole run

@dataclass
class ProbeJob:
    """Which cached sets a run uses (names resolve under ``cache``; paths are taken as they are)."""

    model: str
    train: str
    cache: Path
    val: str | None = None    # selects the heads; default: a held-out part of train
    test: str | None = None   # ID accuracy and the ID side of anomaly scores; default: the val set
    eval: list[str] = field(default_factory=list)
    anomaly: list[str] = field(default_factory=list)
    scorers: tuple[str, ...] = ("msp", "energy", "maxlogit")
    knn_k: int = 50
    allow_random_init: bool = False  # use sets of random weights (extract --random-init): smoke tests


@dataclass
class ProbeResult:
    results: "object"                      # pandas DataFrame, long format
    heads: dict[tuple[str, ...], Head]     # the selected head per feature combination
    candidates: list[Head]                 # every head trained
    scores: dict                           # (features, anomaly set, scorer) -> (ID scores, OOD scores)
    sets: dict[str, str]                   # set name -> feature-set path
    protocol: dict = field(default_factory=dict)  # selection set, heads per combination, ID set, training views


@dataclass
class _Data:
    test: Split
    ood_gen: list[Split]
    anomalies: list[Split]
    num_classes: int
    train: "Split | StreamedSplit | None" = None
    val: Split | None = None
    bank: tuple[Split, np.ndarray] | None = None  # view-0 training rows and labels, for feature scorers


def _bank(train: Split) -> tuple[Split, np.ndarray]:
    """View-0 training rows and their labels, for the feature-space scorers."""
    rows = np.flatnonzero(train.views == 0)
    return train.take(rows), train.labels[rows]


def _find_sets(job: ProbeJob, union: Sequence[str], known: dict[str, str] | None = None) -> dict[str, FeatureSet]:
    available = list_feature_sets(job.cache)
    find = lambda name: find_feature_set(job.cache, name, job.model, union, available)  # noqa: E731
    known = known or {}
    sets = {"train": FeatureSet(known["train"]) if "train" in known else find(job.train)}
    for role in ("val", "test"):
        if getattr(job, role):
            sets[role] = FeatureSet(known[role]) if role in known else find(getattr(job, role))
    sets.update({n: find(n) for n in [*job.eval, *job.anomaly]})
    check_compatible(sets)
    for name, fs in sets.items():
        seed = fs.meta["model"].get("random_init")
        if seed is not None and not job.allow_random_init:
            raise ProbeError(f"{name} ({fs.path}) holds features of random weights (extract --random-init {seed}): "
                             "a random-init ViT gives nearly the same embedding for every image, so its numbers say "
                             "nothing about the model; pass --allow-random-init for a smoke test")
    return sets


def _num_classes(name: str, labels: np.ndarray, id_classes: Sequence[str] | None) -> int:
    """Classes of the heads: the training set's class list, else its largest integer label + 1."""
    if (labels < 0).any():
        raise ProbeError(f"{name} has unlabelled rows; a training set needs labels")
    present = np.unique(labels)
    if len(present) < 2:
        only = id_classes[present[0]] if id_classes else int(present[0])
        raise ProbeError(f"{name} holds a single class ({only}); a classifier needs two or more")
    return len(id_classes) if id_classes else int(present.max()) + 1


def _labelled(fs: FeatureSet, union: Sequence[str], name: str, id_classes, num_classes: int) -> Split:
    return map_labels(load_split(fs, union, name), fs, id_classes, num_classes)


def _load(job: ProbeJob, sets: dict[str, FeatureSet], union: Sequence[str], seed: int,
          val_fraction: float, stream: int = 0) -> _Data:
    """Every split of a run; without a val set, a held-out part of train (by seed) selects the heads.

    ``stream`` > 0 streams the training set with that many units per window instead of loading it.
    Labels of val, test and eval sets are mapped into the training set's classes by name.
    """
    id_classes = _names(sets["train"].meta["dataset"])[0]
    if stream:
        if not job.val:
            raise ProbeError("a streamed training set needs --val (no rows are held out of it)")
        if any(s in FEATURE_SCORERS for s in job.scorers):
            raise ProbeError(f"{', '.join(FEATURE_SCORERS)} need the training features in memory; "
                             "drop --stream or them")
        train = StreamedSplit(sets["train"], job.train, union, window=stream)
    else:
        train = load_split(sets["train"], union, job.train, views=None)
    num_classes = _num_classes(job.train, train.labels, id_classes)
    if job.val:
        val = _labelled(sets["val"], union, job.val, id_classes, num_classes)
    else:
        fit_rows, val_rows = holdout(train, val_fraction, seed)
        val, train = train.take(val_rows, name=f"{job.train}[held-out]"), train.take(fit_rows)
    test = _labelled(sets["test"], union, job.test, id_classes, num_classes) if job.test else val
    return _Data(test, [_labelled(sets[n], union, n, id_classes, num_classes) for n in job.eval],
                 [load_split(sets[n], union, n) for n in job.anomaly], num_classes, train, val,
                 _bank(train) if any(s in FEATURE_SCORERS for s in job.scorers) else None)


def _evaluate_all(job: ProbeJob, heads: Sequence[Head], data: _Data, seed: int, rows: list[Row], protocol: dict):
    import pandas as pd

    scores: dict = {}
    for head in heads:
        rows = rows + evaluate(head, data.test, data.ood_gen, data.anomalies, job.scorers, data.bank, job.knn_k,
                               scores)
    df = pd.DataFrame([asdict(r) for r in rows])
    df.insert(0, "model", job.model)
    df["seed"] = seed
    # the protocol travels with every number, so that `report` can state it for merged runs too
    df["selection_set"] = protocol.get("selection_set") or ""
    df["heads_per_combination"] = protocol.get("heads_per_combination", 0)
    df["train_views"] = len(protocol.get("train_views") or [])
    return df, scores


def _need_test(job: ProbeJob, heads: int) -> str:
    sel = f"--val {job.val}" if job.val else f"a held-out part of --train {job.train}"
    return (f"{heads} heads per feature combination are selected on {sel}; the set that selects them must not "
            f"also give the ID test numbers: add --test with another ID set (e.g. the official validation split)")


def run_probe(job: ProbeJob, cfg: ProbeConfig, progress: bool = True) -> ProbeResult | None:
    """Find the cached sets, train all heads together, select per combination on validation, evaluate.

    With several heads per combination (an lr/wd grid), the selection set and the test set must differ.
    """
    unknown = [s for s in job.scorers if s not in SCORERS]
    if unknown:
        raise ProbeError(f"unknown scorer {unknown[0]!r}; known: {', '.join(SCORERS)}")
    heads_per = len(cfg.grid)
    if heads_per > 1 and not job.test:
        raise ProbeError(_need_test(job, heads_per))
    union = sorted({f for combo in cfg.features for f in combo})
    sets = _find_sets(job, union)
    if heads_per > 1 and job.val and sets["val"].path.resolve() == sets["test"].path.resolve():
        raise ProbeError(_need_test(job, heads_per))
    data = _load(job, sets, union, cfg.seed, cfg.val_fraction, stream=cfg.stream_window if cfg.stream else 0)
    views = data.train.view_ids if isinstance(data.train, StreamedSplit) else data.train.views
    protocol = {"heads_per_combination": heads_per, "selection_set": data.val.name, "id_set": data.test.name,
                "id_is_selection_set": data.test is data.val, "train_views": sorted(int(v) for v in np.unique(views))}
    candidates = train_heads(data.train, data.num_classes, cfg, progress=progress)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None  # rank 0 evaluates and writes
    heads = select(candidates, data.val)
    selection = [Row(h.name, data.val.name, "selection", "top1", h.val_acc, len(data.val), lr=h.lr, wd=h.wd)
                 for h in candidates]
    df, scores = _evaluate_all(job, list(heads.values()), data, cfg.seed, selection, protocol)
    return ProbeResult(df, heads, candidates, scores, {k: str(v.path) for k, v in sets.items()}, protocol)


def score_run(run: str | os.PathLike, eval: Sequence[str] = (), anomaly: Sequence[str] = (),
              scorers: Sequence[str] | None = None, cache: str | os.PathLike | None = None) -> ProbeResult:
    """Apply a run's saved heads to further cached sets (found as the run found its own).

    Reads the run's ID set, the new sets, and the training set only when a scorer needs its features
    (k-NN, Mahalanobis, ViM: view 0 only) or when the ID set was held out of it.
    """
    run = Path(run)
    config = json.loads((run / "config.json").read_text())
    job = ProbeJob(**{**config["job"], "cache": Path(cache or config["job"]["cache"]),
                      "eval": list(eval), "anomaly": list(anomaly)})
    if scorers:
        job.scorers = tuple(scorers)
    unknown = [s for s in job.scorers if s not in SCORERS]
    if unknown:
        raise ProbeError(f"unknown scorer {unknown[0]!r}; known: {', '.join(SCORERS)}")
    heads = load_heads(run / "heads.safetensors")
    union = sorted({f for h in heads for f in h.features})
    sets = _find_sets(job, union, known=config["sets"])
    seed, protocol = config["probe"]["seed"], config.get("protocol", {})
    id_classes, num_classes = _names(sets["train"].meta["dataset"])[0], int(heads[0].weight.shape[0])
    id_role = "test" if job.test else "val" if job.val else None
    test = _labelled(sets[id_role], union, getattr(job, id_role), id_classes, num_classes) if id_role else None
    bank = None
    if test is None or any(s in FEATURE_SCORERS for s in job.scorers):
        train = load_split(sets["train"], union, job.train, views=(0,))
        if not job.val:  # the run's held-out rows: the same keys for the same seed
            fit_rows, held_rows = holdout(train, config["probe"]["val_fraction"], seed)
            if test is None:
                test = train.take(held_rows, name=f"{job.train}[held-out]")
            train = train.take(fit_rows)
        bank = (train, train.labels)
    data = _Data(test, [_labelled(sets[n], union, n, id_classes, num_classes) for n in job.eval],
                 [load_split(sets[n], union, n) for n in job.anomaly], num_classes, bank=bank)
    df, scores = _evaluate_all(job, heads, data, seed, [], protocol)
    return ProbeResult(df, {h.features: h for h in heads}, heads, scores, {k: str(v.path) for k, v in sets.items()},
                       protocol)
