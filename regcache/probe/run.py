"""A whole probe run: find the sets, train, select, evaluate on test, eval and anomaly sets; score saved runs.

`probe` and `score` are the actions (the CLI and pipelines call them with settings); each writes a
run directory (`report.write_run`) and returns what it computed.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__, ood
from ..housekeeping import record_run
from ..ood.fit import BankSource
from ..plots import plot_scores
from ..report import RunRecord, SetUse, markdown
from ..rundir import check_out, default_run, publish, stamp, writing
from ..sets import Named
from ..settings import ProbeSettings, ScoreSettings
from ..store import FeatureSet
from .data import (ProbeError, Split, StreamedSplit, _non_finite_rows, _refuse_non_finite, class_names, holdout,
                   load_split, map_labels)
from .evaluate import OOD_SPLITS, Row, evaluate
from .head import Head, load_heads, save_heads, select
from .sets import RunSets, check_apart, find_sets
from .solvers import fit_heads, refit

log = logging.getLogger("regcache")


# --------------------------------------------------------------------------- loading

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


def num_classes_of(name: str, labels: np.ndarray, id_classes: Sequence[str] | None) -> int:
    """Classes of the heads: the training set's class list, else its largest integer label + 1."""
    if (labels < 0).any():
        raise ProbeError(f"{name} has unlabelled rows; a training set needs labels")
    present = np.unique(labels)
    if len(present) < 2:
        only = id_classes[present[0]] if id_classes else int(present[0])
        raise ProbeError(f"{name} holds a single class ({only}); a classifier needs two or more")
    return len(id_classes) if id_classes else int(present.max()) + 1


def labelled(n: Named, union: Sequence[str], id_classes, num_classes: int) -> Split:
    return map_labels(load_split(n.fs, union, n.name), n, id_classes, num_classes)


@dataclass
class _Data:
    test: Split
    ood_gen: list[Split]
    anomalies: list[Split]
    num_classes: int
    classes: list[str] | None = None  # what each head output stands for (None: integer labels)
    train: "Split | StreamedSplit | None" = None
    val: Split | None = None
    bank: "BankSource | None" = None  # view-0 training rows, for feature scorers
    groups: dict[str, str] = field(default_factory=dict)  # anomaly set -> its manifest's split, where one of OOD_SPLITS


def _groups(anomaly: Mapping[str, Named]) -> dict[str, str]:
    """Anomaly sets whose manifest split is near-ood, far-ood or ood-val (OpenOOD v1.5's benchmark), by name."""
    return {n.name: n.description.split for n in anomaly.values() if n.description.split in OOD_SPLITS}


def _load(s: ProbeSettings, sets: RunSets, union: Sequence[str]) -> _Data:
    """Every split of a run; without a val set, a held-out part of train (by seed, `holdout`) selects the heads,
    unless nothing is selected (one head per combination, no refit) and a test set gives the ID numbers: then
    every training row trains.

    With ``stream`` the training set is read window by window instead of loaded. Labels of val, test
    and eval sets are mapped into the training set's classes by name.
    """
    id_classes = class_names(sets.train.description)[0]
    name = sets.train.name
    if s.stream:
        train = StreamedSplit(sets.train.fs, name, union, window=s.stream_window)
    else:
        train = load_split(sets.train.fs, union, name, views=None)
    num_classes = num_classes_of(name, train.labels, id_classes)
    if sets.val is not None:
        val = labelled(sets.val, union, id_classes, num_classes)
    elif not _holds_out(s, sets):
        val = None
    else:
        fit_rows, val_rows = holdout(train, s.val_fraction, s.seed, s.holdout)
        val, train = train.take(val_rows, name=f"{name}[held-out]"), train.take(fit_rows)
    test = labelled(sets.test, union, id_classes, num_classes) if sets.test is not None else val
    return _Data(test, [labelled(n, union, id_classes, num_classes) for n in sets.eval.values()],
                 [load_split(n.fs, union, n.name) for n in sets.anomaly.values()], num_classes, id_classes, train,
                 val, _bank(train), _groups(sets.anomaly))


def _evaluate_all(s: ProbeSettings, heads: Sequence[Head], data: _Data, rows: list[Row], protocol: dict,
                  model: str):
    import pandas as pd

    scores: dict = {}
    for head in heads:
        rows = rows + evaluate(head, data.test, data.ood_gen, data.anomalies, s.scorers, data.bank,
                               s.scorer_args, scores, s.device, data.groups)
    df = pd.DataFrame([asdict(r) for r in rows])
    df.insert(0, "model", model)  # with the checkpoint's file where it is not the name's own weights
    df["seed"] = s.seed
    # the protocol travels with every number, so that `report` can state it for merged runs too
    df["selection_set"] = protocol.get("selection_set") or ""
    df["heads_per_combination"] = protocol.get("heads_per_combination", 0)
    df["train_views"] = len(protocol.get("train_views") or [])
    return df, scores


# --------------------------------------------------------------------------- the run directory

def run_record(result, s) -> RunRecord:
    """config.json: the settings, each set with what it held and what its rows meant, and the heads' classes."""
    uses = [SetUse(role=label.split(":")[0], name=n.name, path=str(n.fs.path.resolve()), fingerprint=n.fs.fingerprint,
                   content=n.fs.content_id(), description=n.description) for label, n in result.sets.items()]
    return RunRecord(settings=s.model_dump(mode="json"), sets=uses, protocol=result.protocol, classes=result.classes,
                     regcache=__version__, torch=torch.__version__,
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=sys.argv)


def write_scores(out: Path, result, plots: bool = True) -> None:
    """A run's numbers: results.parquet (long), results.csv (the same, for any tool), results.md (the tables),
    plots/ (ROC curves, histograms)."""
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "results.parquet") as f:
        result.results.to_parquet(f, index=False)
    with writing(out / "results.csv") as f:
        result.results.to_csv(f, index=False)
    with writing(out / "results.md") as f:
        f.write_text(markdown(result.results))
    if plots and result.scores:
        with writing(out / "plots"):
            plot_scores(out / "plots", result.scores)


def write_scored(out: Path, result, s) -> None:
    """What `score` leaves: its numbers and config.json (the sets it read, with what they held), so that `report`
    checks them against the other runs' as it checks probe runs'."""
    write_scores(out, result)
    with writing(out / "config.json") as f:
        f.write_bytes(run_record(result, s).to_json())


def write_run(out: Path, result, s) -> None:
    """Everything a probe run leaves: its numbers (`write_scores`), heads.safetensors and config.json."""
    write_scores(out, result, plots=s.plots)
    with writing(out / "config.json") as f:
        f.write_bytes(run_record(result, s).to_json())
    with writing(out / "heads.safetensors") as f:
        save_heads(f, result.heads, {"model": s.model, "train": str(result.sets.train.fs.path.resolve()),
                                     "classes": result.classes})



# --------------------------------------------------------------------------- the actions

@dataclass
class ProbeResult:
    results: "object"                      # pandas DataFrame, long format
    heads: dict[tuple[str, ...], Head]     # the selected head per feature combination
    candidates: list[Head]                 # every head trained
    scores: dict                           # (features, anomaly set, scorer) -> (ID scores, OOD scores)
    sets: RunSets
    protocol: dict = field(default_factory=dict)  # selection set, heads per combination, ID set, training views
    classes: list[str] | None = None       # the class each head output stands for (None: integer labels)
    out: Path | None = None                # the run directory, once written
    warnings: list[str] = field(default_factory=list)


def run_probe(s: ProbeSettings, pins: Mapping[str, "Named | str | Path"] | None = None) -> ProbeResult | None:
    """Find the cached sets, train all heads together, select per combination on validation, evaluate.

    With several heads per combination (an lr/wd or C grid), the selection set and the test set must
    differ. Returns None on a torchrun rank other than 0 (rank 0 evaluates).
    """
    union = sorted({f for combo in s.features for f in combo})
    sets = find_sets(s, union, pins)
    same = sets.val is not None and sets.test is not None and \
        sets.val.fs.path.resolve() == sets.test.fs.path.resolve()
    if (s.heads_per_combination > 1 or s.refit) and same:  # one set under two names
        raise ProbeError(s.selection_needs_test())
    check_apart(sets, selected=s.heads_per_combination > 1 or s.refit)
    data = _load(s, sets, union)
    views = data.train.view_ids if isinstance(data.train, StreamedSplit) else data.train.views
    held = sets.val is None and data.val is not None
    protocol = {"heads_per_combination": s.heads_per_combination,
                "selection_set": data.val.name if data.val is not None else None,
                "id_set": data.test.name, "id_is_selection_set": data.test is data.val,
                "train_views": sorted(int(v) for v in np.unique(views)),
                "held_out": {"fraction": s.val_fraction, "kind": s.holdout} if held else None}
    candidates = fit_heads(data.train, data.num_classes, s, progress=not s.quiet)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None  # rank 0 evaluates and writes
    if data.val is None:  # one head per combination and nothing to select it on
        heads = {h.features: h for h in candidates}
        selection = []
    else:
        heads = select(candidates, data.val)
        selection = [Row(h.name, data.val.name, "selection", "top1", h.val_acc, len(data.val), lr=h.lr, wd=h.wd,
                         iterations=h.iterations) for h in candidates]
    if s.refit:
        heads = refit(heads, data.train, data.val, data.num_classes, s)
        protocol["refit_on"] = f"{data.train.name} + {data.val.name}"
    df, scores = _evaluate_all(s, list(heads.values()), data, selection, protocol,
                               sets.train.fs.model_label(s.model))
    warnings = []
    if s.augmented and len(protocol["train_views"]) < 2:
        warnings.append(f"the protocol trains on augmented views, but {s.train} holds the plain crop only "
                        "(extracted with views 1): its heads saw no augmentation; extract it with --views > 1")
    return ProbeResult(df, heads, candidates, scores, sets, protocol, data.classes, warnings=warnings)


def _holds_out(s: ProbeSettings, sets: RunSets) -> bool:
    """Whether a part of --train is held out: to select heads (several per combination, or a refit's choice), or
    for the ID numbers when there is no test set; never when nothing is selected and a test set reports."""
    return sets.val is None and (s.heads_per_combination > 1 or s.refit or sets.test is None)


def probe(s: ProbeSettings, pins: Mapping[str, "Named | str | Path"] | None = None) -> ProbeResult | None:
    """`regcache probe`: `run_probe`, then its run directory (``s.out``, default ``runs/MODEL-TIME``), written whole
    or not at all; a ``s.out`` that holds files is refused before any head trains."""
    check_out(s.out)
    result = run_probe(s, pins)
    if result is not None:
        for w in result.warnings:
            log.warning("warning: %s", w)
        result.out = publish(s.out, default_run(s.model), lambda d: write_run(d, result, s))
        record_run(s.cache, result.out, [n.fs.path for _, n in result.sets.items()])
    return result


def score(ss: ScoreSettings) -> ProbeResult:
    """`regcache score`: a run's saved heads on further cached sets (found as the run found its own).

    Reads the run's ID set, the new sets, and the training set only when a scorer needs its features
    (view 0 only, streamed from the store in chunks) or when the ID set was held out of it. The run's
    sets must still hold what they held (settings and shard bytes), else its numbers would mix data.
    """
    run = Path(ss.run)
    check_out(ss.out)
    record = RunRecord.read(run / "config.json", "run record")
    update = {"eval": ss.eval, "anomaly": ss.anomaly, "out": None,
              **{k: getattr(ss, k) for k in ("scorers", "scorer_args", "cache") if getattr(ss, k) is not None}}
    s = ProbeSettings.make({**record.settings, **update})
    heads = load_heads(run / "heads.safetensors")
    union = sorted({f for h in heads for f in h.features})
    roles = {r.role: r for r in record.sets if r.role in ("train", "val", "test")}
    gone = [f"{r.role} set {r.path}" for r in roles.values() if not (Path(r.path) / "regcache.json").is_file()]
    if gone:
        raise ProbeError(f"the {', '.join(gone)} of run {run} is no longer there (removed, or extracted again from "
                         "other shards since the run was made); probe again to get a run of the current data")
    # the run's own sets, read with the meaning they had when the heads were made (however they were named)
    pins = {getattr(s, role): _recorded(r) for role, r in roles.items()}
    sets = find_sets(s, union, pins=pins)
    for role, r in roles.items():
        fs = getattr(sets, role).fs
        if (fs.fingerprint, fs.content_id()) != (r.fingerprint, r.content):
            raise ProbeError(f"{fs.path}, the {role} set of run {run}, has been extracted again from other shards or "
                             "settings since the run was made: its numbers would mix two datasets; probe again to "
                             "get a run of the current data")
    id_classes, num_classes = class_names(sets.train.description)[0], int(heads[0].weight.shape[0])
    if roles["train"].description is None:
        log.warning("warning: run %s (made by an older regcache) did not record its training classes: labels are "
                    "mapped through %s's class list as it is now", run, sets.train.name)
    role = sets.id_role
    test = labelled(getattr(sets, role), union, id_classes, num_classes) if role else None
    bank = None
    if test is None or any(ood.SCORERS[n].needs_bank for n in s.scorers):
        fs, name = sets.train.fs, sets.train.name
        idx = fs.index
        idx = idx[idx.view == 0]
        rows, labels, keys, views = (idx[c].to_numpy() for c in ("row", "label", "key", "view"))
        held_out = record.protocol.get("held_out", {"fraction": s.val_fraction, "kind": "random"})  # older: random
        if sets.val is None and held_out:  # the run's held-out rows: the same keys for the same seed
            fit_rows, held = holdout(Split(name, {}, labels, keys, views), held_out["fraction"], s.seed,
                                     held_out["kind"])
            if test is None:
                test = Split(f"{name}[held-out]", {f: _read(fs, name, f, rows[held], keys[held]) for f in union},
                             labels[held], keys[held], views[held])
            rows, labels, keys = rows[fit_rows], labels[fit_rows], keys[fit_rows]
        bank = _store_bank(fs, name, rows, labels, keys)
    data = _Data(test, [labelled(n, union, id_classes, num_classes) for n in sets.eval.values()],
                 [load_split(n.fs, union, n.name) for n in sets.anomaly.values()], num_classes, bank=bank,
                 groups=_groups(sets.anomaly))
    df, scores = _evaluate_all(s, heads, data, [], record.protocol, sets.train.fs.model_label(s.model))
    result = ProbeResult(df, {h.features: h for h in heads}, heads, scores, sets, record.protocol, id_classes)
    result.out = publish(ss.out, run / f"score-{stamp()}", lambda d: write_scored(d, result, s))
    record_run(s.cache, result.out, [n.fs.path for _, n in sets.items()])
    return result


def _recorded(use: SetUse) -> Named:
    """A set a run read, with the description its rows had then (older runs: the one it holds under that name)."""
    fs = FeatureSet(use.path)
    return Named(fs, use.description) if use.description is not None else Named.of(fs, use.name)
