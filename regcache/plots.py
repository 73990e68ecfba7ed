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
