"""A whole probe run: find the sets, train, select, evaluate on test, eval and anomaly sets; score saved runs."""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import ood
from ..store import FeatureSet, find_feature_set, list_feature_sets
from .data import (ProbeError, Split, StreamedSplit, _non_finite_rows, _refuse_non_finite, check_compatible,
                   class_names, holdout, load_split, map_labels)
from .heads import Head, ProbeConfig, accuracy, fit_heads, load_heads, refit, select




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
    scorer_args: str = ""  # the scorer's hyperparameters (JSON), defaults included


def evaluate(head: Head, id_split: Split, ood_gen: list[Split], anomalies: list[Split],
             scorers: Sequence[str], bank: "BankSource | None" = None, scorer_args: dict | None = None,
             scores_out: dict | None = None, device: str = "cpu", groups: dict[str, str] | None = None) -> list[Row]:
    """ID and OOD accuracy, and per-anomaly-set metrics (`ood.METRICS`) for every scorer, plus their means:
    over all anomaly sets (set ``mean``) and over each group of ``groups`` (set ``mean near-ood``, …); a set
    of the OOD validation split (``ood-val``, for choosing hyperparameters) is reported alone, in no mean.

    ``scorer_args``: hyperparameters by scorer name (``{"react": {"percentile": 0.9}}``); each row records
    the scorer's full set. Feature scorers fit on ``bank(head.features, device)``, streamed in chunks.
    """
    f, hp = head.name, dict(lr=head.lr, wd=head.wd)
    rows = [Row(f, id_split.name, "id", "top1", accuracy(head.logits(id_split), id_split.labels, id_split.subset),
               len(id_split), **hp)]
    for s in ood_gen:
        rows.append(Row(f, s.name, "ood-gen", "top1", accuracy(head.logits(s), s.labels, s.subset), len(s), **hp))
    if not anomalies:
        return rows
    fitted = _scorers(head, scorers, bank, scorer_args or {}, device)
    args = {name: json.dumps(sc.args, sort_keys=True) for name, sc in fitted.items()}
    id_scores = {name: _score(sc, head, id_split) for name, sc in fitted.items()}
    per: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
    for s in anomalies:
        group = (groups or {}).get(s.name)
        means = [] if group == OOD_VALIDATION else ["mean"] + ([f"mean {group}"] if group else [])
        for name, sc in fitted.items():
            o = _score(sc, head, s)
            if scores_out is not None:
                scores_out[(f, s.name, name)] = (id_scores[name], o)
            for metric, m in ood.METRICS.items():
                v = m(id_scores[name], o)
                rows.append(Row(f, s.name, "anomaly", metric, v, len(s), name, **hp, scorer_args=args[name]))
                for mean in means:
                    per.setdefault((mean, name, metric), []).append((v, len(s)))
    for (mean, name, metric), got in per.items():
        rows.append(Row(f, mean, "anomaly", metric, float(np.mean([v for v, _ in got])), sum(n for _, n in got),
                        name, **hp, scorer_args=args[name]))
    return rows


def _scorers(head: Head, names: Sequence[str], bank: "BankSource | None", args: dict, device: str) -> dict:
    """Each scorer made with its arguments and fitted once for this head (the bank read only if one needs it)."""
    lin = ood.Linear(head.weight.numpy(), head.bias.numpy())
    made = {name: ood.make(name, **args.get(name, {})) for name in ood.resolve(names)}
    need = [n for n, sc in made.items() if sc.needs_bank]
    if need and bank is None:
        raise ProbeError(f"scorers {', '.join(need)} need the training features")
    b = bank(head.features, device) if need else None
    return {name: sc.fit(b, lin) for name, sc in made.items()}


def _score(scorer: "ood.Scorer", head: Head, split: Split, chunk: int = 8192) -> np.ndarray:
    """A fitted scorer's scores of a split, a chunk of rows at a time in float64 (features, and the head's
    logits over all its classes: anomaly sets have no class subset)."""
    out = []
    for i in range(0, len(split), chunk):
        x = split.combo(head.features, np.arange(i, min(i + chunk, len(split)))).numpy().astype(np.float64)
        out.append(scorer.score(x, scorer.head(x)))
    return np.concatenate(out)


OOD_GROUPS = ("near-ood", "far-ood")  # manifest splits whose anomaly sets get their own mean, as OpenOOD reports
OOD_VALIDATION = "ood-val"            # the manifest split of OOD validation sets: in no mean
OOD_SPLITS = (*OOD_GROUPS, OOD_VALIDATION)
SCORERS = tuple(ood.SCORERS)  # every registered scorer (`regcache scorers` lists them)
FEATURE_SCORERS = tuple(n for n, c in ood.SCORERS.items() if c.needs_bank)  # these fit on the training features


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
    scorer_args: dict = field(default_factory=dict)  # {scorer: {param: value}}; knn.k here overrides knn_k
    allow_random_init: bool = False  # use sets of random weights (extract --random-init): smoke tests
    paths: dict[str, str] = field(default_factory=dict)  # set name -> feature-set path, already resolved (a pipeline's)


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
    bank: "BankSource | None" = None  # view-0 training rows, for feature scorers
    groups: dict[str, str] = field(default_factory=dict)  # anomaly set -> its manifest's split, where one of OOD_SPLITS


def _groups(sets: dict[str, FeatureSet], names: Sequence[str]) -> dict[str, str]:
    """Anomaly sets whose manifest split is near-ood, far-ood or ood-val (OpenOOD v1.5's benchmark), by name."""
    return {n: sets[n].meta["dataset"].get("split") for n in names
            if sets[n].meta["dataset"].get("split") in OOD_SPLITS}


BankSource = Callable[[Sequence[str], str], "ood.Bank"]  # (feature combination, device) -> bank


def _bank(train: Split | StreamedSplit) -> BankSource:
    """The view-0 rows of the training set as a bank: a streamed set stays streamed (read from the store)."""
    if isinstance(train, StreamedSplit):
        sel = np.flatnonzero(train.view_ids == 0)
        return _store_bank(train.fs, train.name, train.rows[sel], train.labels[sel], train.keys[sel])
    sel = np.flatnonzero(train.views == 0)

    def reader(features: Sequence[str]):
        return lambda r: np.concatenate([train.x[f][sel[r]].reshape(len(r), -1) for f in features], 1)
    return lambda features, device: ood.Bank(reader(features), train.labels[sel], device=device,
                                             name=f"{train.name} (view 0)")


def _store_bank(fs: FeatureSet, name: str, rows: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> BankSource:
    """Store ``rows`` as a bank read a chunk at a time, in float16 as the probe reads every set (never whole,
    never in float64), with the same non-finite check as a loaded set."""
    def reader(features: Sequence[str]):
        def read(r: np.ndarray) -> np.ndarray:
            return np.concatenate([_read(fs, name, f, rows[r], keys[r]).reshape(len(r), -1) for f in features], 1)
        return read
    return lambda features, device: ood.Bank(reader(features), labels, device=device, name=f"{name} (view 0)")


def _read(fs: FeatureSet, name: str, feature: str, rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    a = fs.read_rows(feature, rows, out=np.empty((len(rows), *fs.layout.shape(feature)), np.float16))
    _refuse_non_finite(name, fs.path, feature, _non_finite_rows(a), keys)
    return a


def _find_sets(job: ProbeJob, union: Sequence[str], known: dict[str, str] | None = None) -> dict[str, FeatureSet]:
    available = functools.cache(lambda: list_feature_sets(job.cache))  # listed once, if a name needs it

    def find(name: str) -> FeatureSet:
        if name in job.paths:
            return FeatureSet(job.paths[name])
        return find_feature_set(job.cache, name, job.model, union, available())

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
                 _bank(train), _groups(sets, job.anomaly))


def _evaluate_all(job: ProbeJob, heads: Sequence[Head], data: _Data, seed: int, rows: list[Row], protocol: dict,
                  device: str = "cpu"):
    import pandas as pd

    scores: dict = {}
    for head in heads:
        rows = rows + evaluate(head, data.test, data.ood_gen, data.anomalies, job.scorers, data.bank,
                               _scorer_args(job), scores, device, data.groups)
    df = pd.DataFrame([asdict(r) for r in rows])
    df.insert(0, "model", job.model)
    df["seed"] = seed
    # the protocol travels with every number, so that `report` can state it for merged runs too
    df["selection_set"] = protocol.get("selection_set") or ""
    df["heads_per_combination"] = protocol.get("heads_per_combination", 0)
    df["train_views"] = len(protocol.get("train_views") or [])
    return df, scores


def _scorer_args(job: ProbeJob) -> dict:
    """The job's scorer arguments, with ``knn_k`` (the older flag) as k-NN's k unless knn.k is given."""
    return {**job.scorer_args, "knn": {"k": job.knn_k, **job.scorer_args.get("knn", {})}}


def _need_test(job: ProbeJob, heads: int) -> str:
    sel = f"--val {job.val}" if job.val else f"a held-out part of --train {job.train}"
    return (f"{heads} heads per feature combination are selected on {sel}; the set that selects them must not "
            f"also give the ID test numbers: add --test with another ID set (e.g. the official validation split)")


def run_probe(job: ProbeJob, cfg: ProbeConfig, progress: bool = True) -> ProbeResult | None:
    """Find the cached sets, train all heads together, select per combination on validation, evaluate.

    With several heads per combination (an lr/wd grid), the selection set and the test set must differ.
    """
    job.scorers = tuple(ood.resolve(job.scorers))
    heads_per = cfg.heads_per_combination
    if heads_per > 1 and not job.test:
        raise ProbeError(_need_test(job, heads_per))
    union = sorted({f for combo in cfg.features for f in combo})
    sets = _find_sets(job, union)
    if heads_per > 1 and job.val and sets["val"].path.resolve() == sets["test"].path.resolve():
        raise ProbeError(_need_test(job, heads_per))
    if cfg.refit and (not job.test or (job.val and sets["val"].path.resolve() == sets["test"].path.resolve())):
        raise ProbeError(f"--refit trains the selected heads again on {job.train} + {job.val or 'its held-out part'}, "
                         "so the ID numbers need a set apart from both: name one with --test")
    _check_apart(sets, selected=heads_per > 1 or cfg.refit)
    data = _load(job, sets, union, cfg.seed, cfg.val_fraction, stream=cfg.stream_window if cfg.stream else 0)
    views = data.train.view_ids if isinstance(data.train, StreamedSplit) else data.train.views
    protocol = {"heads_per_combination": heads_per, "selection_set": data.val.name, "id_set": data.test.name,
                "id_is_selection_set": data.test is data.val, "train_views": sorted(int(v) for v in np.unique(views))}
    candidates = fit_heads(data.train, data.num_classes, cfg, progress=progress)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None  # rank 0 evaluates and writes
    heads = select(candidates, data.val)
    selection = [Row(h.name, data.val.name, "selection", "top1", h.val_acc, len(data.val), lr=h.lr, wd=h.wd)
                 for h in candidates]
    if cfg.refit:
        heads = refit(heads, data.train, data.val, data.num_classes, cfg)
        protocol["refit_on"] = f"{data.train.name} + {data.val.name}"
    df, scores = _evaluate_all(job, list(heads.values()), data, cfg.seed, selection, protocol, cfg.device)
    return ProbeResult(df, heads, candidates, scores, {k: str(v.path) for k, v in sets.items()}, protocol)


def _check_apart(sets: dict[str, FeatureSet], selected: bool) -> None:
    """The set the ID numbers are on (test, else val) shares no shard bytes with the set that trained the heads,
    nor with the one that selected them (a copy of a set, or one manifest under two names, is the same data)."""
    id_role = "test" if "test" in sets else "val" if "val" in sets else None
    if id_role is None:
        return

    def shards(fs: FeatureSet) -> set[str]:
        return set(fs.shard_digests().values())

    reported = shards(sets[id_role])
    others = ["train", "val"] if selected and id_role == "test" else ["train"]
    for role in [r for r in others if r in sets]:
        common = reported & shards(sets[role])
        if common:
            raise ProbeError(f"the {id_role} set {sets[id_role].path}, which the ID numbers are on, was read from "
                             f"{len(common)} of the same shards as the {role} set {sets[role].path}: they would be "
                             f"on images that {'trained' if role == 'train' else 'selected'} the heads; name a "
                             "test set of other images")


def _check_unchanged(run: Path, config: dict, sets: dict[str, FeatureSet]) -> None:
    """A saved run is scored further only against the very sets it was made from (same settings, same bytes)."""
    for key, recorded in (("fingerprints", lambda fs: fs.fingerprint), ("contents", lambda fs: fs.content_id())):
        for role, was in config.get(key, {}).items():
            if role in sets and recorded(sets[role]) != was:
                raise ProbeError(f"{sets[role].path}, the {role} set of run {run}, has been extracted again from "
                                 "other shards or settings since the run was made: its numbers would mix two "
                                 "datasets; probe again to get a run of the current data")


def score_run(run: str | os.PathLike, eval: Sequence[str] = (), anomaly: Sequence[str] = (),
              scorers: Sequence[str] | None = None, cache: str | os.PathLike | None = None,
              scorer_args: dict | None = None, device: str = "cpu") -> ProbeResult:
    """Apply a run's saved heads to further cached sets (found as the run found its own).

    Reads the run's ID set, the new sets, and the training set only when a scorer needs its features
    (`FEATURE_SCORERS`: view 0 only, streamed from the store in chunks) or when the ID set was held out
    of it. ``scorers``/``scorer_args`` replace the run's own.
    """
    run = Path(run)
    config = json.loads((run / "config.json").read_text())
    job = ProbeJob(**{**config["job"], "cache": Path(cache or config["job"]["cache"]),
                      "eval": list(eval), "anomaly": list(anomaly)})
    if scorers:
        job.scorers = tuple(scorers)
    if scorer_args is not None:
        job.scorer_args = scorer_args
    job.scorers = tuple(ood.resolve(job.scorers))
    heads = load_heads(run / "heads.safetensors")
    union = sorted({f for h in heads for f in h.features})
    sets = _find_sets(job, union, known=config["sets"])
    _check_unchanged(run, config, sets)
    seed, protocol = config["probe"]["seed"], config.get("protocol", {})
    id_classes, num_classes = class_names(sets["train"].meta["dataset"])[0], int(heads[0].weight.shape[0])
    id_role = "test" if job.test else "val" if job.val else None
    test = _labelled(sets[id_role], union, getattr(job, id_role), id_classes, num_classes) if id_role else None
    bank = None
    if test is None or any(ood.SCORERS[s].needs_bank for s in job.scorers):
        fs = sets["train"]
        idx = fs.index
        idx = idx[idx.view == 0]
        rows, labels, keys, views = (idx[c].to_numpy() for c in ("row", "label", "key", "view"))
        if not job.val:  # the run's held-out rows: the same keys for the same seed
            fit_rows, held = holdout(Split(job.train, {}, labels, keys, views), config["probe"]["val_fraction"], seed)
            if test is None:
                test = Split(f"{job.train}[held-out]", {f: _read(fs, job.train, f, rows[held], keys[held]) for f in union},
                             labels[held], keys[held], views[held])
            rows, labels, keys = rows[fit_rows], labels[fit_rows], keys[fit_rows]
        bank = _store_bank(fs, job.train, rows, labels, keys)
    data = _Data(test, [_labelled(sets[n], union, n, id_classes, num_classes) for n in job.eval],
                 [load_split(sets[n], union, n) for n in job.anomaly], num_classes, bank=bank,
                 groups=_groups(sets, job.anomaly))
    df, scores = _evaluate_all(job, heads, data, seed, [], protocol, device)
    return ProbeResult(df, {h.features: h for h in heads}, heads, scores, {k: str(v.path) for k, v in sets.items()},
                       protocol)
