"""A whole probe run: find the sets, train, select, evaluate on test, eval and anomaly sets; score saved runs."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import ood
from ..store import FeatureSet, list_feature_sets
from .data import (ProbeError, Split, StreamedSplit, check_compatible, class_names, find_feature_set, holdout,
                   load_split, map_labels)
from .heads import Head, ProbeConfig, accuracy, load_heads, select, train_heads




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
    id_classes = class_names(sets["train"].meta["dataset"])[0]
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
    id_classes, num_classes = class_names(sets["train"].meta["dataset"])[0], int(heads[0].weight.shape[0])
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
