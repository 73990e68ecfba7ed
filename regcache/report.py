"""Results as people and other tools read them: Markdown tables (accuracy, OOD detection), the record of a run
(config.json), and several runs merged into one table."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from .ood.metrics import METRICS
from .plots import plot_report
from .rundir import check_out, publish, writing
from .store.meta import Description, Record

#: column labels (`ood.METRICS`); the two FPR95 conventions never share one
METRIC_LABELS = {name: m.label for name, m in METRICS.items()}


def _pct(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.2f}"


def _run_labels(runs: pd.Series) -> pd.Series:
    """A run's folder name (pooled runs: the first one's, +N), or its whole path where two share a name."""
    names = {r: Path(r.split(" + ")[0]).name + (f" +{r.count(' + ')}" if " + " in r else "") for r in runs.unique()}
    clash = len(set(names.values())) < len(names)
    return runs.map(lambda r: r if clash else names[r])


def _merge_note(res: pd.DataFrame) -> str | None:
    """Say when a table cell averages several rows, and what those rows differ in."""
    keys = ["model", "features", "set", "metric", "scorer"]
    sizes = res.groupby(keys, sort=False).size()
    dup = sizes[sizes > 1]
    if dup.empty:
        return None
    rows = res.set_index(keys).loc[dup.index].reset_index()
    varying = [c for c in ("run", "seed", "lr", "wd", "n", "selection_set", "train_views")
               if c in rows and rows.groupby(keys, sort=False)[c].nunique(dropna=False).max() > 1]
    why = f"they differ in {', '.join(varying)}" if varying else "they are identical (the same run given twice?)"
    if "seed" in varying:
        why += f" (seeds {', '.join(map(str, sorted(set(rows.seed))))})"
    counts = sorted(set(dup))
    return (f"Note: merged {'/'.join(map(str, counts))} rows per cell in {len(dup)} cells, showing their mean: "
            f"{why}.")


def _protocol_notes(res: pd.DataFrame) -> list[str]:
    """How the heads were selected, which set the ID numbers are on, and what views they trained on
    (prefixed with the rows they apply to when a merged table holds runs that differ)."""
    by_note: dict[str, list[str]] = {}
    for model, g in res.groupby("model", sort=False):
        ids = g[g.role == "id"]
        if {"selection_set", "heads_per_combination"} <= set(g.columns) and len(ids):
            sel, heads, id_sets = ids.selection_set.iloc[0], int(ids.heads_per_combination.iloc[0]), set(ids.set)
            if heads == 1 and sel in id_sets:
                flag = "a held-out part of --train" if sel.endswith("[held-out]") else "the --val set"
                note = f"Heads: no selection: one head per combination; ID numbers are on {flag} ({sel})."
            elif heads == 1:
                note = f"Heads: no selection: one head per combination; ID numbers on {', '.join(sorted(id_sets))}."
            elif heads > 1:
                note = (f"Heads: selected per combination on {sel} among {heads}; "
                        f"ID numbers on {', '.join(sorted(id_sets))}.")
            else:
                note = ""
            by_note.setdefault(note, []).append(model)
        if "train_views" in g and g.train_views.max() > 0:
            k = int(g.train_views.max())
            note = ("Training: plain crop only (one cached view per image)." if k == 1 else
                    f"Training: trained on {k} views per image (view 0 the plain crop, {k - 1} random-resized crops "
                    "fixed at extraction, not a fresh crop per step).")
            by_note.setdefault(note, []).append(model)
    models = res.model.nunique()
    return [n if len(m) == models else f"{'; '.join(m)}: {n}" for n, m in by_note.items() if n]


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def frame_markdown(df: pd.DataFrame) -> str:
    """A DataFrame (its index levels, then its columns) as a Markdown table."""
    flat = df.reset_index()
    return "\n".join(md_table([str(c) for c in flat.columns],
                               [["" if pd.isna(v) else f"{v:g}" if isinstance(v, float) else str(v) for v in row]
                                for row in flat.itertuples(index=False)]))


def _columns(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(set, role, label) in order, each label with its role (ID, OOD for OOD generalisation, anomaly), so that a
    reader sees what each column is and a name used under two roles is never one column."""
    pairs = list(dict.fromkeys(zip(frame.set, frame.role)))
    tag = {"id": "ID", "ood-gen": "OOD", "anomaly": "anomaly"}
    return [(s, r, f"{s} ({tag.get(r, r)})") for s, r in pairs]


def markdown(results: pd.DataFrame, pooled: bool = False) -> str:
    """Two tables, as OpenOOD reports: top-1 accuracy (rows model x features; the ID set, then the OOD
    generalisation sets), and OOD detection (rows model x features x scorer; per anomaly set and for the
    means over all of them and over each group, FPR95 / AUROC).

    A cell that holds several rows (seeds, duplicated runs) shows the mean over its seeds of each seed's mean,
    and a note says so and why; ``pooled`` (rows of runs `pool_seeds` grouped): the mean over the seeds ± their
    sample standard deviation, with the count where a cell has fewer seeds than its table.
    """
    res = results[results.role != "selection"].copy()
    if "run" in res and res.run.nunique() > 1:  # merged runs: keep their rows apart where a model has several
        several = res.groupby("model").run.transform("nunique") > 1
        res.loc[several, "model"] = res.model[several] + " (" + _run_labels(res.run)[several] + ")"
    acc, ano = res[res.metric == "top1"], res[res.role == "anomaly"]
    seeds = ",".join(str(s) for s in sorted(set(res.seed)))
    spread = pooled and res.groupby(["model", "features"]).seed.nunique().max() > 1

    def show(per_seed: pd.Series, of: int) -> str:
        """A cell: the mean over its rows; pooled, the mean over seeds ± their sample standard deviation, with
        the count where the cell has fewer of its row's ``of`` seeds than the note under the table says."""
        k = per_seed.count()
        if not spread or k == 0:
            return _pct(per_seed.mean())
        value = _pct(per_seed.mean()) + (f" ± {_pct(per_seed.std(ddof=1))}" if k > 1 else "")
        return value if k == len(set(res.seed)) else f"{value} ({k} of {of} seed{'s' * (of > 1)})"

    def cell(g: pd.DataFrame, s: str, r: str, m: str, sc: str = "") -> str:
        rows = g[(g.set == s) & (g.role == r) & (g.metric == m) & (g.scorer == sc)]
        return show(rows.groupby("seed").value.mean(), g.seed.nunique())

    acc_cols = _columns(acc)
    out = [f"### Accuracy (top-1, %, seed {seeds})", "",
           *md_table(["model", "features", *(label for *_, label in acc_cols)],
                  [[model, f"[{feats.replace(',', ';')}]", *(cell(g, s, r, "top1") for s, r, _ in acc_cols)]
                   for (model, feats), g in acc.groupby(["model", "features"], sort=False)])]
    ano_sets = [s for s in dict.fromkeys(ano.set) if not s.startswith("mean")]
    if ano_sets:
        groups = _mean_groups(ano, ano_sets)

        def mean_cell(g: pd.DataFrame, members: list[str], scorer: str) -> str:
            """The mean over exactly these sets, from this row's own cells: empty unless the row has each (pooled:
            each seed's mean over the sets, then their mean ± standard deviation)."""
            rows = g[g.set.isin(members) & (g.scorer == scorer)]
            values = [rows[rows.metric == m].pivot_table(index="seed", columns="set", values="value",
                                                         aggfunc="mean", dropna=False).reindex(columns=members)
                      for m in ("fpr95", "auroc")]
            if any(v.empty or v.isna().any().any() for v in values):
                return ""
            return " / ".join(show(v.mean(axis=1), g.seed.nunique()) for v in values)

        rows = [[model, f"[{feats.replace(',', ';')}]", scorer,
                 *(f"{cell(g, s, 'anomaly', 'fpr95', scorer)} / {cell(g, s, 'anomaly', 'auroc', scorer)}"
                   for s in ano_sets), *(mean_cell(g, members, scorer) for members in groups.values())]
                for (model, feats, scorer), g in ano.groupby(["model", "features", "scorer"], sort=False)]
        out += ["", f"### OOD detection ({METRIC_LABELS['fpr95']} / {METRIC_LABELS['auroc']}, %, seed {seeds})", "",
                *md_table(["model", "features", "scorer", *ano_sets,
                           *(f"{name} ({len(m)} set{'s' if len(m) > 1 else ''})" for name, m in groups.items())], rows)]
    n_of: dict = {}
    for r in res.itertuples():
        n_of.setdefault((r.set, r.role), set()).add(int(r.n))
    counts = ", ".join(f"{label}: n={' or '.join(map(str, sorted(n_of[(s, r)])))}"
                       for s, r, label in _columns(res[~res.set.str.startswith("mean")]))
    detection = (" FPR95: ID positive, threshold keeping 95% of ID, fraction of OOD accepted (Hendrycks & Gimpel; "
                 "Liu et al.). Means are unweighted over sets; near-ood/far-ood group the sets by their manifest's "
                 "split. Every metric (the OOD-positive FPR95 as OpenOOD reports it, AUPR, AP) and the scorers' "
                 "hyperparameters are in results.parquet." if ano_sets else "")
    out = ["\n".join(out), f"Sample counts: {counts}.{detection}"]
    pooled_note = None
    if spread:
        pooled_note = (f"Each cell: the mean over seeds {seeds} ± their sample standard deviation (runs that differ "
                       "only in their seed, pooled): the spread of what a seed draws (held-out part, initialisation, "
                       "batches), not the test sets' own sampling error")
        ids = acc[acc.role == "id"]
        if len(ids):  # per row: its mean top-1 on the ID set, and that set's size
            first = ids[ids.set == ids.set.iloc[0]]
            rows = first.groupby(["model", "features"]).agg(p=("value", "mean"), n=("n", "first"))
            se = sorted({f"{100 * (p * (1 - p) / n) ** 0.5:.1f}" for p, n in rows.itertuples(index=False)}, key=float)
            pooled_note += (f", which on {first.set.iloc[0]}'s {int(first.n.iloc[0]):,} images is "
                            f"{'–'.join(dict.fromkeys([se[0], se[-1]]))} points for the rows' top-1 (binomial "
                            "standard error)")
        pooled_note += "."
    unchecked = results.attrs.get("unchecked")
    unchecked_note = (f"Not checked: {', '.join(unchecked)} {'has' if len(unchecked) == 1 else 'have'} no run record "
                      "(config.json), so whether a set of one name holds the same images in every run is unknown."
                      if unchecked else None)
    out += [*_protocol_notes(res), *filter(None, [pooled_note or _merge_note(res), unchecked_note]), *_skipped(res)]
    return "\n\n".join(out) + "\n"


def _mean_groups(ano: pd.DataFrame, sets: list[str]) -> dict[str, list[str]]:
    """The means a table shows, each over the same sets in every row: ``mean`` over every anomaly set but those
    of the OOD validation split, and ``mean near-ood`` … over each split's sets (rows' ``split`` column; runs
    written before it have none: their stored means give the groups' members where they can)."""
    split = ({s: ano[ano.set == s].split.dropna().iloc[0] if ano[ano.set == s].split.notna().any() else ""
              for s in sets} if "split" in ano else {s: "" for s in sets})
    out = {"mean": [s for s in sets if split[s] != "ood-val"]}
    for group in dict.fromkeys(v for v in split.values() if v and v != "ood-val"):
        out[f"mean {group}"] = [s for s in sets if split[s] == group]
    return {k: v for k, v in out.items() if v}


def _skipped(res: pd.DataFrame) -> list[str]:
    """Why a cell of the OOD table is empty: each scorer that could not score, by combination and set."""
    if "note" not in res:
        return []
    why = [n for n in dict.fromkeys(res.note.dropna()) if n.startswith("skipped: ") and " could not score " not in n]
    return [f"Not scored (empty cells): {'; '.join(n.removeprefix('skipped: ') for n in why)}."] if why else []


class SetUse(Record):
    """One set a run read: its role, the name it was read under, what it held and what its rows meant."""

    role: str          # train, val, test, eval or anomaly
    name: str
    path: str
    fingerprint: str   # its settings and dataset
    content: str       # the shard bytes its rows were read from (`FeatureSet.content_id`)
    description: Optional[Description] = None  # name, role, split, classes, subset as read (older runs: None)


class RunRecord(Record):
    """config.json of a run: the settings it ran with, the sets it read, how the heads were chosen."""

    settings: dict[str, Any]   # `ProbeSettings`, as JSON
    sets: list[SetUse]
    protocol: dict[str, Any]
    classes: Optional[list[str]] = None  # the class each head output stands for (None: integer labels, or older runs)
    regcache: str
    torch: str
    created: str
    command: list[str]


def report(runs: Iterable[str | os.PathLike], out: str | os.PathLike | None = None, plot: bool = False,
           plot_scorer: str | None = None, pooled: bool = False) -> tuple[str, Path | None]:
    """`regcache report`: several runs in one table (Markdown), and with ``out`` (a new or empty directory)
    report.md, results.parquet and results.csv (and with ``plot`` report.png, `plots.plot_report`), written whole
    or not at all; ``pooled``: runs that differ only in their seed as one row, mean ± sd (`pool_seeds`). Returns
    the text and ``out``."""
    check_out(out)
    df = merge(runs)
    if pooled:
        df = pool_seeds(df)
    text = markdown(df, pooled)
    if out is None:
        return text, None

    def write(d: Path) -> None:
        with writing(d / "report.md") as f:
            f.write_text(text)
        with writing(d / "results.parquet") as f:
            df.to_parquet(f, index=False)
        with writing(d / "results.csv") as f:
            df.to_csv(f, index=False)
        if plot:
            with writing(d / "report.png") as f:
                plot_report(f, df, plot_scorer)
    return text, publish(out, out, write)


def merge(runs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The long results of several run directories (or results.parquet files), one table."""
    frames, seen, unchecked = [], {}, []
    for r in runs:
        p = Path(r)
        p = p / "results.parquet" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{r}: no results.parquet")
        if not (p.parent / "config.json").is_file():
            unchecked.append(str(r))
        for name, content in _set_contents(p.parent).items():
            first = seen.setdefault(name, (content, p.parent))
            if first[0] != content:
                raise ValueError(f"set {name!r} holds other images in {p.parent} than in {first[1]} (it was "
                                 "extracted again from other shards): one column would mix two datasets")
        df = pd.read_parquet(p)
        df.insert(0, "run", str(p.parent))
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    if unchecked and len(frames) > 1:
        out.attrs["unchecked"] = unchecked
    return out


#: settings that do not change what a run measures (where it writes, how it shows progress, where it runs)
NOT_MEASURED = ("seed", "out", "quiet", "plots", "device", "cache")


def pool_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (`merge`) with the runs that differ only in their seed as one: ``run`` becomes the group's runs and
    ``seed`` says which draw each row is. Runs that differ in any other setting or in any set they read stay
    apart; two runs of one seed in a group are refused, since they are not independent draws."""
    if "seed" not in df:
        raise ValueError("these results have no seed column (not written by regcache probe or score): nothing to pool")
    groups: dict[str, list[str]] = {}
    for run in dict.fromkeys(df.run):
        f = Path(run) / "config.json"
        if not f.is_file():
            raise ValueError(f"{run}: no config.json, so what it shares with the other runs is unknown: pool runs "
                             "written by regcache probe")
        rec = RunRecord.read(f, "run record")
        key = json.dumps({"settings": {k: v for k, v in rec.settings.items() if k not in NOT_MEASURED},
                          "sets": [(u.role, u.name, u.fingerprint, u.content) for u in rec.sets]}, sort_keys=True)
        groups.setdefault(key, []).append(run)
    out = df.copy()
    for runs in groups.values():
        seeds = df[df.run.isin(runs)].groupby("run").seed.first()
        if seeds.duplicated().any():
            twice = seeds[seeds.duplicated(keep=False)]
            raise ValueError(f"runs {', '.join(twice.index)} have the same seed {twice.iloc[0]} and the same "
                             "settings: pooled they would count one draw twice")
        out.loc[out.run.isin(runs), "run"] = " + ".join(runs)
    return out


def _set_contents(run: Path) -> dict[str, str]:
    """Set name -> the content id of the shards it was read from, as the run recorded it."""
    f = run / "config.json"
    return {u.name: u.content for u in RunRecord.read(f, "run record").sets} if f.is_file() else {}
