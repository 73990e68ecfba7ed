"""Figures: matplotlib on its file-only backend, and the ROC curves and score histograms of a run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import ood


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


def plot_report(path: Path, results, scorer: str | None = None) -> Path:
    """The report as a picture (the paper's Table I): per metric (top-1 on the ID and OOD-generalisation sets;
    AUROC and FPR95 of ``scorer`` on each anomaly set and their mean), one group of bars per set, one bar per
    model and feature combination."""
    plt = pyplot()
    res = results[results.role != "selection"].copy()
    if "run" in res and res.run.nunique() > 1:
        res["model"] = res.model + " (" + res.run.map(lambda r: Path(r).name) + ")"
    res["who"] = res.model + " [" + res.features.str.replace(",", ";") + "]"
    scorers = [s for s in dict.fromkeys(res.scorer) if s]
    scorer = scorer or (scorers[0] if scorers else None)
    panels = [("top-1 (%)", res[res.metric == "top1"])]
    if scorer is not None:
        ano = res[(res.role == "anomaly") & (res.scorer == scorer)]
        panels += [(f"AUROC ({scorer}, %)", ano[ano.metric == "auroc"]),
                   (f"FPR95 ({scorer}, %, lower is better)", ano[ano.metric == "fpr95"])]
    panels = [(t, p) for t, p in panels if len(p)]
    who = list(dict.fromkeys(res.who))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 * max(p.set.nunique() for _, p in panels)
                                                          * max(1, len(who)) / 3), 3.2 * len(panels)),
                             squeeze=False)
    width = 0.8 / max(1, len(who))
    for ax, (title, panel) in zip(axes[:, 0], panels):
        sets = list(dict.fromkeys(panel.set))
        values = panel.groupby(["set", "who"]).value.mean()
        for i, w in enumerate(who):
            heights = [100 * values.get((s, w), float("nan")) for s in sets]
            ax.bar([j + (i - (len(who) - 1) / 2) * width for j in range(len(sets))], heights, width, label=w)
        ax.set_xticks(range(len(sets)), sets, rotation=20, fontsize=8)
        ax.set(title=title)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=max(1, min(3, len(who))))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def plot_scores(out: Path, scores: dict) -> list[Path]:
    """Per anomaly set and feature combination: ROC curves and score histograms of every scorer."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_pair: dict[tuple[str, str], dict] = {}
    for (feats, name, scorer), pair in scores.items():
        by_pair.setdefault((feats, name), {})[scorer] = pair
    for (feats, name), per in by_pair.items():
        stem = f"{name}__{feats}"  # the combination as it is typed (cls,patch)
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
