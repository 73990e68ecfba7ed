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
        self.units = self.rows // self.fs.unit_rows

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


def load_split(fs: FeatureSet, features: Sequence[str], name: str, views: Sequence[int] | None = (0,),
               id_classes: Sequence[str] | None = None) -> Split:
    """Read a set in float16; refuse an empty one and name the rows of any non-finite feature."""
    got = fs.load(features, views=views, concat=False, dtype=np.float16)
    if not len(got.labels):
        raise ProbeError(f"{name} ({fs.path}) has no rows")
    for f, a in got.x.items():
        flat = a.reshape(len(a), -1)
        bad = np.concatenate([~np.isfinite(flat[i:i + 65536]).all(1) for i in range(0, len(a), 65536)])
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ProbeError(f"{name}: non-finite {f} in {len(rows)} rows, e.g. rows {rows[:5].tolist()} "
                             f"(keys {got.keys[rows[:5]].tolist()})")
    ds = fs.meta["dataset"]
    subset = None
    if ds.get("subset"):
        subset = _subset_indices(ds["subset"], id_classes, name)
    return Split(name, got.x, got.labels, got.keys, got.views, subset)


def _subset_indices(subset: Sequence[str], id_classes: Sequence[str] | None, name: str) -> np.ndarray:
    if all(str(s).isdigit() for s in subset):
        return np.array([int(s) for s in subset])
    if id_classes is None:
        raise ProbeError(f"{name} names its class subset by name, but the training set has no class list")
    pos = {c: i for i, c in enumerate(id_classes)}
    missing = [s for s in subset if s not in pos]
    if missing:
        raise ProbeError(f"{name}: subset classes not among the ID classes: {', '.join(missing[:5])}")
    return np.array([pos[s] for s in subset])


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
    from tqdm import tqdm

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
    for _ in tqdm(range(cfg.iterations), disable=not progress or rank != 0, desc="heads", unit="it",
                  dynamic_ncols=True):
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
    rows = [Row(f, id_split.name, "id", "top1", accuracy(head.logits(id_split), id_split.labels), len(id_split), **hp)]
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


@dataclass
class ProbeResult:
    results: "object"                      # pandas DataFrame, long format
    heads: dict[tuple[str, ...], Head]     # the selected head per feature combination
    candidates: list[Head]                 # every head trained
    scores: dict                           # (features, anomaly set, scorer) -> (ID scores, OOD scores)
    sets: dict[str, str]                   # set name -> feature-set path


@dataclass
class _Data:
    train: Split
    val: Split
    test: Split
    ood_gen: list[Split]
    anomalies: list[Split]
    num_classes: int

    def bank(self) -> tuple[Split, np.ndarray]:
        """View-0 training rows and their labels, for the feature-space scorers."""
        rows = np.flatnonzero(self.train.views == 0)
        return self.train.take(rows), self.train.labels[rows]


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
    return sets


def _load(job: ProbeJob, sets: dict[str, FeatureSet], union: Sequence[str], seed: int,
          val_fraction: float, stream: int = 0) -> _Data:
    """Every split of a run; without a val set, a held-out part of train (by seed) selects the heads.

    ``stream`` > 0 streams the training set with that many units per window instead of loading it.
    """
    classes = sets["train"].meta["dataset"].get("classes")
    if stream:
        if not job.val:
            raise ProbeError("a streamed training set needs --val (no rows are held out of it)")
        if any(s in FEATURE_SCORERS for s in job.scorers):
            raise ProbeError(f"{', '.join(FEATURE_SCORERS)} need the training features in memory; "
                             "drop --stream or them")
        train = StreamedSplit(sets["train"], job.train, union, window=stream)
    else:
        train = load_split(sets["train"], union, job.train, views=None, id_classes=classes)
        if train.labels.min() < 0:
            raise ProbeError(f"{job.train} has unlabelled rows; a training set needs labels")
    if job.val:
        val = load_split(sets["val"], union, job.val, id_classes=classes)
    else:
        fit_rows, val_rows = holdout(train, val_fraction, seed)
        val, train = train.take(val_rows, name=f"{job.train}[held-out]"), train.take(fit_rows)
    num_classes = len(classes) if classes else int(max(train.labels.max(), val.labels.max())) + 1
    test = load_split(sets["test"], union, job.test, id_classes=classes) if job.test else val
    return _Data(train, val, test, [load_split(sets[n], union, n, id_classes=classes) for n in job.eval],
                 [load_split(sets[n], union, n, id_classes=classes) for n in job.anomaly], num_classes)


def _evaluate_all(job: ProbeJob, heads: Sequence[Head], data: _Data, seed: int, rows: list[Row]):
    import pandas as pd

    bank = data.bank() if any(s in FEATURE_SCORERS for s in job.scorers) else None
    scores: dict = {}
    for head in heads:
        rows = rows + evaluate(head, data.test, data.ood_gen, data.anomalies, job.scorers, bank, job.knn_k, scores)
    df = pd.DataFrame([asdict(r) for r in rows])
    df.insert(0, "model", job.model)
    df["seed"] = seed
    return df, scores


def run_probe(job: ProbeJob, cfg: ProbeConfig, progress: bool = True) -> ProbeResult | None:
    """Find the cached sets, train all heads together, select per combination on validation, evaluate."""
    unknown = [s for s in job.scorers if s not in SCORERS]
    if unknown:
        raise ProbeError(f"unknown scorer {unknown[0]!r}; known: {', '.join(SCORERS)}")
    union = sorted({f for combo in cfg.features for f in combo})
    sets = _find_sets(job, union)
    data = _load(job, sets, union, cfg.seed, cfg.val_fraction, stream=cfg.stream_window if cfg.stream else 0)
    candidates = train_heads(data.train, data.num_classes, cfg, progress=progress)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None  # rank 0 evaluates and writes
    heads = select(candidates, data.val)
    selection = [Row(h.name, data.val.name, "selection", "top1", h.val_acc, len(data.val), lr=h.lr, wd=h.wd)
                 for h in candidates]
    df, scores = _evaluate_all(job, list(heads.values()), data, cfg.seed, selection)
    return ProbeResult(df, heads, candidates, scores, {k: str(v.path) for k, v in sets.items()})


def score_run(run: str | os.PathLike, eval: Sequence[str] = (), anomaly: Sequence[str] = (),
              scorers: Sequence[str] | None = None, cache: str | os.PathLike | None = None) -> ProbeResult:
    """Apply a run's saved heads to further cached sets (found as the run found its own)."""
    run = Path(run)
    config = json.loads((run / "config.json").read_text())
    job = ProbeJob(**{**config["job"], "cache": Path(cache or config["job"]["cache"]),
                      "eval": list(eval), "anomaly": list(anomaly)})
    if scorers:
        job.scorers = tuple(scorers)
    heads = load_heads(run / "heads.safetensors")
    union = sorted({f for h in heads for f in h.features})
    sets = _find_sets(job, union, known=config["sets"])
    seed = config["probe"]["seed"]
    data = _load(job, sets, union, seed, config["probe"]["val_fraction"])  # same held-out rows: same seed
    df, scores = _evaluate_all(job, heads, data, seed, [])
    return ProbeResult(df, {h.features: h for h in heads}, heads, scores, {k: str(v.path) for k, v in sets.items()})
