"""Run directories: results (Parquet, Markdown in the layout of the paper's Table I), heads, config, plots."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from . import __version__, ood
from .probe import save_heads
from .store import FeatureSet

#: column labels; the two FPR95 conventions (DESIGN §5) never share one
METRIC_LABELS = {"fpr95": "FPR95↓", "fpr95_openood": "FPR95-OpenOOD↓", "auroc": "AUROC↑", "ap_in": "AP-in↑",
                 "ap_out": "AP-out↑", "aupr_in_openood": "AUPR-in-OpenOOD↑",
                 "aupr_out_openood": "AUPR-out-OpenOOD↑"}


def _pct(v: float) -> str:
    return "" if pd.isna(v) else f"{100 * v:.2f}"


def _run_labels(runs: pd.Series) -> pd.Series:
    """A run's folder name, or its whole path where two runs share a folder name."""
    names = {r: Path(r).name for r in runs.unique()}
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


def markdown(results: pd.DataFrame) -> str:
    """One table per scorer: rows model x features; ID and OOD top-1, FPR95 per anomaly set, then the means
    over all anomaly sets (FPR95 both ways, AUROC) and over each group of them (near-/far-OOD: FPR95, AUROC).

    A cell that holds several rows (seeds, duplicated runs) shows their mean, and a note says so and why.
    """
    res = results[results.role != "selection"].copy()
    if "run" in res and res.run.nunique() > 1:  # merged runs: keep their rows apart
        res["model"] = res.model + " (" + _run_labels(res.run) + ")"
    acc = res[res.metric == "top1"]
    ano = res[res.role == "anomaly"]
    scorers = list(dict.fromkeys(ano.scorer)) or [""]
    acc_sets = list(dict.fromkeys(acc.set))
    ano_sets = [s for s in dict.fromkeys(ano.set) if not s.startswith("mean")]
    means = [("mean", m) for m in ("fpr95", "fpr95_openood", "auroc")] + \
        [(s, m) for s in dict.fromkeys(ano.set) if s.startswith("mean ") for m in ("fpr95", "auroc")]
    n_of = {r.set: r.n for r in res.itertuples()}
    seeds = ",".join(str(s) for s in sorted(set(res.seed)))
    out = []
    for scorer in scorers:
        head = ["model", "features"] + [f"{s} top-1" for s in acc_sets]
        if scorer:
            head += [f"{s} {METRIC_LABELS['fpr95']}" for s in ano_sets]
            head += [f"{s} {METRIC_LABELS[m]}" for s, m in means]
        lines = [f"### {'accuracy' if not scorer else 'anomaly scorer: ' + scorer} (%, seed {seeds})", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (model, feats), g in res.groupby(["model", "features"], sort=False):
            get = lambda s, m, sc="", g=g: g[(g.set == s) & (g.metric == m) & (g.scorer == sc)].value  # noqa: E731
            cells = [model, f"[{feats.replace(',', ';')}]"] + [_pct(get(s, "top1").mean()) for s in acc_sets]
            if scorer:
                cells += [_pct(get(s, "fpr95", scorer).mean()) for s in ano_sets]
                cells += [_pct(get(s, m, scorer).mean()) for s, m in means]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    counts = ", ".join(f"{s}: n={n_of[s]}" for s in [*acc_sets, *ano_sets])
    out.append(f"Sample counts: {counts}. FPR95: ID positive, threshold keeping 95% of ID, fraction of OOD accepted "
               "(Hendrycks & Gimpel; Liu et al.). FPR95-OpenOOD: OOD positive, threshold catching 95% of OOD, "
               "fraction of ID flagged (OpenOOD v1.5, pytorch-ood); not comparable with FPR95. Means are unweighted "
               "over sets; near-ood/far-ood group the sets by their manifest's split. Full numbers (AUPR, scorer "
               "hyperparameters) in results.parquet.")
    out += [*_protocol_notes(res), *filter(None, [_merge_note(res)])]
    return "\n\n".join(out) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_scores(out: Path, scores: dict) -> list[Path]:
    """Per anomaly set and feature combination: ROC curves and score histograms of every scorer."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_pair: dict[tuple[str, str], dict] = {}
    for (feats, name, scorer), pair in scores.items():
        by_pair.setdefault((feats, name), {})[scorer] = pair
    for (feats, name), per in by_pair.items():
        stem = f"{name}__{feats.replace(',', '+')}"
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for scorer, (a, b) in per.items():
            fpr, tpr = ood.roc_points(a, b)
            ax.plot(fpr, tpr, label=f"{scorer} (AUROC {100 * ood.auroc(a, b):.1f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.axhline(0.95, color="grey", lw=0.5)
        ax.set(xlabel="FPR (anomaly accepted)", ylabel="TPR (ID kept)", title=f"[{feats}] vs {name}")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / f"roc__{stem}.png"))
        fig, axes = plt.subplots(1, len(per), figsize=(3.2 * len(per), 3), squeeze=False)
        for ax, (scorer, (a, b)) in zip(axes[0], per.items()):
            bins = np.histogram_bin_edges(np.r_[a, b], bins=40)
            ax.hist(a, bins, alpha=0.6, density=True, label="ID")
            ax.hist(b, bins, alpha=0.6, density=True, label=name)
            ax.set(title=scorer, xlabel="score (higher = ID)")
        axes[0][0].legend(fontsize=7)
        written.append(save_figure(fig, out / f"hist__{stem}.png"))
    return written


def write_run(out: Path, result, job, cfg, plots: bool = True) -> None:
    """Everything a run leaves: results.parquet, results.md, heads.safetensors, config.json, plots/."""
    out.mkdir(parents=True, exist_ok=True)
    result.results.to_parquet(out / "results.parquet", index=False)
    (out / "results.md").write_text(markdown(result.results))
    config = {"job": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items()},
              "probe": asdict(cfg), "protocol": result.protocol, "sets": result.sets,
              "fingerprints": {k: FeatureSet(p).fingerprint for k, p in result.sets.items()},
              "contents": {k: FeatureSet(p).content_id() for k, p in result.sets.items()},
              "regcache": __version__, "torch": torch.__version__,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": sys.argv}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_heads(out / "heads.safetensors", result.heads, {"model": job.model, "train": result.sets["train"]})
    if plots and result.scores:
        plot_scores(out / "plots", result.scores)


def merge(runs: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """The long results of several run directories (or results.parquet files), one table."""
    frames, seen = [], {}
    for r in runs:
        p = Path(r)
        p = p / "results.parquet" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{r}: no results.parquet")
        for name, content in _set_contents(p.parent).items():
            first = seen.setdefault(name, (content, p.parent))
            if first[0] != content:
                raise ValueError(f"set {name!r} holds other images in {p.parent} than in {first[1]} (it was "
                                 "extracted again from other shards): one column would mix two datasets")
        df = pd.read_parquet(p)
        df.insert(0, "run", str(p.parent))
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _set_contents(run: Path) -> dict[str, str]:
    """Set name -> the content id of the shards it was read from, as the run recorded it (none for old runs)."""
    f = run / "config.json"
    if not f.is_file():
        return {}
    config = json.loads(f.read_text())
    roles = {r: config["job"].get(r) for r in ("train", "val", "test")}
    return {roles.get(k) or k: v for k, v in config.get("contents", {}).items()}
