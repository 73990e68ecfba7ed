"""A whole probe run: find the sets, train, select, evaluate on test, eval and anomaly sets; score saved runs.

`probe` and `score` are the actions (the CLI and pipelines call them with settings); each writes a
run directory (`report.write_run`) and returns what it computed.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__, ood
from ..housekeeping import record_run
from ..plots import plot_scores
from ..report import RunRecord, SetUse, markdown
from ..rundir import check_out, default_run, publish, stamp, writing
from ..sets import Cache, Named
from ..settings import CachedSets, ProbeSettings, ScoreSettings
from ..store import FeatureSet
from .data import (ProbeError, Split, StreamedSplit, _non_finite_rows, _refuse_non_finite, check_compatible,
                   class_names, holdout, load_split, map_labels)
from .head import Head, accuracy, load_heads, save_heads, select
from .solvers import fit_heads, refit

log = logging.getLogger("regcache")


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
    iterations: int = -1   # selection rows: the iterations the head trained (an lbfgs head's own count)
    split: str = ""        # anomaly rows: the set's manifest split where it groups means (near-ood, far-ood, ood-val)
    note: str = ""         # how the number was made (a scorer's notes), or why there is none ("skipped: ...")


def evaluate(head: Head, id_split: Split, ood_gen: list[Split], anomalies: list[Split],
             scorers: Sequence[str], bank: "BankSource | None" = None, scorer_args: dict | None = None,
             scores_out: dict | None = None, device: str = "cpu", groups: dict[str, str] | None = None) -> list[Row]:
    """ID and OOD accuracy, and per-anomaly-set metrics (`ood.METRICS`) for every scorer, plus their means:
    over all anomaly sets (set ``mean``) and over each group of ``groups`` (set ``mean near-ood``, …); a set
    of the OOD validation split (``ood-val``, for choosing hyperparameters) is reported alone, in no mean.

    ``scorer_args``: hyperparameters by scorer name (``{"react": {"percentile": 0.9}}``); each row records
    the scorer's full set. Feature scorers fit on ``bank(head.features, device)``, streamed in chunks.
    A scorer that cannot fit on this head's training features, or gives non-finite scores, is skipped alone:
    its rows hold NaN and say why (``note``), and so do the means over the sets it could not score.
    """
    f, hp = head.name, dict(lr=head.lr, wd=head.wd)
    rows = [Row(f, id_split.name, "id", "top1", accuracy(head.logits(id_split), id_split.labels, id_split.subset),
               len(id_split), **hp)]
    for s in ood_gen:
        rows.append(Row(f, s.name, "ood-gen", "top1", accuracy(head.logits(s), s.labels, s.subset), len(s), **hp))
    if not anomalies:
        return rows
    fitted, skipped = _scorers(head, scorers, bank, scorer_args or {}, device)
    args = {name: json.dumps(sc.args, sort_keys=True) for name, sc in fitted.items()}
    id_scores = {}
    for name, sc in fitted.items():
        try:
            id_scores[name] = _score(sc, head, id_split)
        except ood.FitError as e:  # a scorer that cannot apply to these features (a percentile of too few)
            skipped[name] = f"cannot score [{f}]: {e}"
            continue
        if not np.isfinite(id_scores[name]).all():
            skipped[name] = f"{_non_finite(id_scores[name])} on the ID set {id_split.name}"
    per: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
    for s in anomalies:
        group = (groups or {}).get(s.name)
        means = [] if group == OOD_VALIDATION else ["mean"] + ([f"mean {group}"] if group else [])
        for name in ood.resolve(scorers):
            o = _score(fitted[name], head, s) if name not in skipped else None
            why = skipped.get(name) or (f"{_non_finite(o)} on {s.name}" if not np.isfinite(o).all() else None)
            note = (f"skipped: {name} on [{f}]: {why}" if why else "; ".join(fitted[name].notes))
            if why:
                log.warning("warning: %s", note)
            elif scores_out is not None:
                scores_out[(f, s.name, name)] = (id_scores[name], o)
            for metric, m in ood.METRICS.items():
                v = float("nan") if why else m(id_scores[name], o)
                rows.append(Row(f, s.name, "anomaly", metric, v, len(s), name, **hp, scorer_args=args.get(name, ""),
                                split=group or "", note=note))
                for mean in means:
                    per.setdefault((mean, name, metric), []).append((v, len(s)))
    for (mean, name, metric), got in per.items():
        gaps = sum(np.isnan(v) for v, _ in got)
        rows.append(Row(f, mean, "anomaly", metric, float(np.mean([v for v, _ in got])), sum(n for _, n in got),
                        name, **hp, scorer_args=args.get(name, ""),
                        note=f"skipped: {name} on [{f}] could not score {gaps} of the {len(got)} sets" if gaps else ""))
    return rows


def _non_finite(scores: np.ndarray) -> str:
    return f"{int((~np.isfinite(scores)).sum())} of its {len(scores)} scores are NaN or inf"


def _scorers(head: Head, names: Sequence[str], bank: "BankSource | None", args: dict,
             device: str) -> tuple[dict, dict[str, str]]:
    """Each scorer made with its arguments and fitted once for this head (the bank read only if one needs it), and
    the reason of each that cannot fit on this head's training features (it is skipped, the others go on)."""
    lin = ood.Linear(head.weight.numpy(), head.bias.numpy())
    made = {name: ood.make(name, **args.get(name, {})) for name in ood.resolve(names)}
    need = [n for n, sc in made.items() if sc.needs_bank]
    if need and bank is None:
        raise ProbeError(f"scorers {', '.join(need)} need the training features")
    b = bank(head.features, device) if need else None
    fitted, skipped = {}, {}
    for name, sc in made.items():
        try:
            fitted[name] = sc.fit(b, lin)
        except (ood.FitError, np.linalg.LinAlgError) as e:  # degenerate training features, not a bug
            skipped[name] = f"cannot fit on the training features of {b.name if b is not None else 'the head'}: {e}"
    return fitted, skipped


def _score(scorer: "ood.Scorer", head: Head, split: Split, chunk: int = 8192) -> np.ndarray:
    """A fitted scorer's scores of a split, a chunk of rows at a time in float64 (features, and the head's
    logits over all its classes: anomaly sets have no class subset)."""
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):  # non-finite scores are reported by name (`evaluate`)
        for i in range(0, len(split), chunk):
            x = split.combo(head.features, np.arange(i, min(i + chunk, len(split)))).numpy().astype(np.float64)
            out.append(scorer.score(x, scorer.head(x)))
    return np.concatenate(out)


OOD_GROUPS = ("near-ood", "far-ood")  # manifest splits whose anomaly sets get their own mean, as OpenOOD reports
OOD_VALIDATION = "ood-val"            # the manifest split of OOD validation sets: in no mean
OOD_SPLITS = (*OOD_GROUPS, OOD_VALIDATION)


# --------------------------------------------------------------------------- the sets of a run

@dataclass
class RunSets:
    """The sets of a run: three by role, the eval and anomaly sets by name. Roles and names are apart in the
    structure itself, so a set *named* ``test`` never stands in for the ID test set."""

    train: Named
    val: Named | None = None
    test: Named | None = None
    eval: dict[str, Named] = field(default_factory=dict)
    anomaly: dict[str, Named] = field(default_factory=dict)

    def items(self) -> Iterator[tuple[str, Named]]:
        """(label, set): ``train``, ``val``, ``test``, then ``eval:NAME`` and ``anomaly:NAME``."""
        yield "train", self.train
        for role in ("val", "test"):
            if getattr(self, role) is not None:
                yield role, getattr(self, role)
        yield from ((f"eval:{n}", s) for n, s in self.eval.items())
        yield from ((f"anomaly:{n}", s) for n, s in self.anomaly.items())

    @property
    def id_role(self) -> str | None:
        """The role of the set the ID numbers are on: test, else val, else none (a held-out part of train)."""
        return "test" if self.test is not None else "val" if self.val is not None else None


def find_sets(s: "CachedSets", union: Sequence[str], pins: Mapping[str, "Named | str | Path"] | None = None) -> RunSets:
    """The sets ``s`` names (`sets.Cache.find`); ``pins`` (dataset name -> a set, or a feature-set path read under
    that name) fixes which set a name means, as a pipeline does for the sets it made."""
    cache = Cache(s.cache)

    def find(ref: str) -> Named:
        if pins and ref in pins:
            pin = pins[ref]
            return pin if isinstance(pin, Named) else Named.of(FeatureSet(pin), ref)
        return cache.find(ref, s.model, union)

    val, anomaly = getattr(s, "val", None), getattr(s, "anomaly", [])  # knn and fewshot have neither
    sets = RunSets(find(s.train), find(val) if val else None, find(s.test) if s.test else None,
                   {n: find(n) for n in s.eval}, {n: find(n) for n in anomaly})
    check_compatible([(f"{label} set {n.name}", n.fs) for label, n in sets.items()])
    check_distinct(sets)
    for label, n in sets.items():
        seed = n.fs.identity.get("random_init")
        if seed is not None and not s.allow_random_init:
            raise ProbeError(f"{n.name} ({n.fs.path}) holds features of random weights (extract --random-init {seed}): "
                             "a random-init ViT gives nearly the same embedding for every image, so its numbers say "
                             "nothing about the model; pass --allow-random-init for a smoke test")
    return sets


def check_distinct(sets: RunSets) -> None:
    """Each eval and anomaly set is named once, whatever the spelling (a name, its `ls` name, its path): a set
    given twice would count twice in a mean. An anomaly set holds none of the ID sets' images: the ID test set
    given as an anomaly set would score ID images as OOD."""
    for option, named in (("--eval", sets.eval), ("--anomaly", sets.anomaly)):
        seen: dict[Path, str] = {}
        for ref, n in named.items():
            first = seen.setdefault(n.fs.path.resolve(), ref)
            if first != ref:
                raise ProbeError(f"{option}: {first} and {ref} name the same set ({n.fs.path}): it would count twice "
                                 "in a mean; give it once")
    ids = [(label, n) for label, n in sets.items() if label in ("train", "val", "test")]
    for ref, n in sets.anomaly.items():
        mine = set(n.fs.shard_digests().values())
        for label, i in ids:
            common = mine & set(i.fs.shard_digests().values())
            if common:
                raise ProbeError(f"--anomaly {ref} ({n.fs.path}) holds images of the {label} set {i.name}: read from "
                                 f"{len(common)} of the same shards, its ID images would be scored as OOD; give an "
                                 "anomaly set of other images")


def check_apart(sets: RunSets, selected: bool) -> None:
    """The set the ID numbers are on (test, else val) shares no shard bytes with the set that trained the heads,
    nor with the one that selected them (a copy of a set, or one manifest under two names, is the same data)."""
    role = sets.id_role
    if role is None:
        return
    reported = getattr(sets, role)
    digests = set(reported.fs.shard_digests().values())
    others = ["train", "val"] if selected and role == "test" else ["train"]
    for other in others:
        o = getattr(sets, other)
        if o is None:
            continue
        common = digests & set(o.fs.shard_digests().values())
        if common:
            raise ProbeError(f"the {role} set {reported.name} ({reported.fs.path}), which the ID numbers are on, was "
                             f"read from {len(common)} of the same shards as the {other} set {o.name} ({o.fs.path}): "
                             f"they would be on images that {'trained' if other == 'train' else 'selected'} the "
                             "heads; name a test set of other images")


# --------------------------------------------------------------------------- loading

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


def _evaluate_all(s: ProbeSettings, heads: Sequence[Head], data: _Data, rows: list[Row], protocol: dict):
    import pandas as pd

    scores: dict = {}
    for head in heads:
        rows = rows + evaluate(head, data.test, data.ood_gen, data.anomalies, s.scorers, data.bank,
                               s.scorer_args, scores, s.device, data.groups)
    df = pd.DataFrame([asdict(r) for r in rows])
    df.insert(0, "model", s.model)
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
    df, scores = _evaluate_all(s, list(heads.values()), data, selection, protocol)
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
    df, scores = _evaluate_all(s, heads, data, [], record.protocol)
    result = ProbeResult(df, {h.features: h for h in heads}, heads, scores, sets, record.protocol, id_classes)
    result.out = publish(ss.out, run / f"score-{stamp()}", lambda d: write_scores(d, result))
    record_run(s.cache, result.out, [n.fs.path for _, n in sets.items()])
    return result


def _recorded(use: SetUse) -> Named:
    """A set a run read, with the description its rows had then (older runs: the one it holds under that name)."""
    fs = FeatureSet(use.path)
    return Named(fs, use.description) if use.description is not None else Named.of(fs, use.name)
