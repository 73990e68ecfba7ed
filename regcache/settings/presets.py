"""Named evaluation protocols: a published grid of heads (or a kNN classifier) under one name.

A preset is a set of settings values (field names of `ProbeSettings` or `KnnSettings`): it fills the
fields a user left out, and what the user gives wins. Feature combinations are plain names, so a
preset runs on any cached set that holds them; ``NAME@-k`` names are block features (``--layers``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: DINOv2's linear-evaluation learning rates (eval/linear.py), before scaling by global batch / 256
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
LAST1 = ("cls", "cls,patch")
LAST4 = ("cls@-4,cls@-3,cls@-2,cls", "cls@-4,cls@-3,cls@-2,cls,patch")
_DINOV3 = {"C": [10.0 ** (-6 + 11 * i / 44) for i in range(45)], "tol": 1e-12, "iterations": 1_000, "refit": True,
           "holdout": "stratified", "features": ["cls"]}
_DINOV2_SGD = {"solver": "minibatch", "optimizer": "sgd", "lr": DINOV2_LRS, "wd": (0.0,), "iterations": 12_500,
               "batch_size": 1024, "momentum": 0.9, "init": "normal", "init_std": 0.01}


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    command: str                                # the command it belongs to: probe or knn
    settings: dict[str, Any] = field(default_factory=dict)
    scale_lr: bool = False                      # lr × batch_size / 256 (DINOv2), unless lr is given

    def fill(self, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` (what the user set) over the preset's settings."""
        out = {**self.settings, **given}
        if self.scale_lr and "lr" not in given:
            out["lr"] = [lr * int(out["batch_size"]) / 256 for lr in self.settings["lr"]]
        return out


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("dinov3-logreg", "DINOv3 logistic regression: L-BFGS, C over 10^linspace(-6, 5, 45), selected on val "
           "(without --val: 10% of each class held out), refit on train + val (tol 1e-12, 1,000 iterations); every "
           "head at its optimum", "probe", {**_DINOV3, "solver": "lbfgs"}),
    Preset("dinov3-logreg-sklearn", "dinov3-logreg with DINOv3's own solver, scikit-learn's LogisticRegression one C "
           "after another: its numbers exactly, weakly regularised heads stopped at 1,000 iterations as DINOv3's "
           "are (about 10x slower)", "probe", {**_DINOV3, "solver": "sklearn"}),
    Preset("dinov2-linear", "DINOv2 linear evaluation, last block: SGD (momentum 0.9, cosine, no weight decay), "
           "heads from N(0, 0.01^2), 13 learning rates × batch/256, 12,500 iterations of batch 1024; [CLS], and "
           "[CLS] + average-pooled patches", "probe", {**_DINOV2_SGD, "features": list(LAST1)}, scale_lr=True),
    Preset("dinov2-linear-last4", "dinov2-linear on the last 4 blocks' [CLS] (cls@-4..cls), with and without "
           "average-pooled patches, beside the last-block combinations: the full DINOv2 grid (needs block "
           "features: extract --layers)", "probe", {**_DINOV2_SGD, "features": [*LAST1, *LAST4]}, scale_lr=True),
    Preset("dinov2-knn", "DINOv2 kNN classifier: cosine similarity, temperature 0.07, k in 10, 20, 100, 200",
           "knn", {"k": [10, 20, 100, 200], "temperature": 0.07, "features": ["cls"]}),
]}


def presets_of(command: str) -> dict[str, Preset]:
    return {n: p for n, p in PRESETS.items() if p.command == command}
