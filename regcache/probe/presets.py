"""Named evaluation protocols: a published grid of heads (or a kNN classifier) under one name.

A preset fills a `ProbeConfig` (or the kNN settings); options given explicitly on the command line
win over it. Feature combinations are plain feature names, so a preset runs on any cached set that
holds them; ``NAME@-k`` names are block features (``extract --layers``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import ProbeError

#: DINOv2's linear-evaluation learning rates (eval/linear.py), before scaling by global batch / 256
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
LAST1 = (("cls",), ("cls", "patch"))
LAST4 = (("cls@-4", "cls@-3", "cls@-2", "cls"), ("cls@-4", "cls@-3", "cls@-2", "cls", "patch"))


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    kind: str                                     # "heads" (probe) or "knn"
    settings: dict = field(default_factory=dict)  # ProbeConfig fields, or knn's ks / temperature
    features: tuple[tuple[str, ...], ...] = ()    # default combinations when none are given
    scale_lr: bool = False                        # lrs × batch_size / 256 (DINOv2), unless --lr is given

    def config(self, given: dict) -> dict:
        """ProbeConfig keyword arguments: the preset's settings, then ``given`` (explicit options) over them."""
        if self.kind != "heads":
            raise ProbeError(f"preset {self.name} is a {self.kind} protocol: run it with `regcache {self.kind} "
                             f"--preset {self.name}`")
        out = {**self.settings, **given}
        if not out.get("features"):
            out["features"] = [list(c) for c in self.features]
        if self.scale_lr and "lrs" not in given:
            out["lrs"] = tuple(lr * out["batch_size"] / 256 for lr in self.settings["lrs"])
        return out


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("dinov3-logreg", "DINOv3 logistic regression: L-BFGS, C over 10^linspace(-6, 5, 45), selected on val, "
           "refit on train + val (tol 1e-12, 1,000 iterations)", "heads",
           {"solver": "lbfgs", "Cs": tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45)), "tol": 1e-12,
            "iterations": 1_000, "refit": True}, (("cls",),)),
    Preset("dinov2-linear", "DINOv2 linear evaluation, last block: SGD (momentum 0.9, cosine, no weight decay), "
           "13 learning rates × batch/256, 12,500 iterations of batch 1024; [CLS], and [CLS] + average-pooled "
           "patches", "heads",
           {"solver": "minibatch", "optimizer": "sgd", "lrs": DINOV2_LRS, "wds": (0.0,), "iterations": 12_500,
            "batch_size": 1024, "momentum": 0.9}, LAST1, scale_lr=True),
    Preset("dinov2-linear-last4", "dinov2-linear on the last 4 blocks' [CLS] (cls@-4..cls), with and without "
           "average-pooled patches, beside the last-block combinations: the full DINOv2 grid (needs block "
           "features: extract --layers)", "heads",
           {"solver": "minibatch", "optimizer": "sgd", "lrs": DINOV2_LRS, "wds": (0.0,), "iterations": 12_500,
            "batch_size": 1024, "momentum": 0.9}, LAST1 + LAST4, scale_lr=True),
    Preset("dinov2-knn", "DINOv2 kNN classifier: cosine similarity, temperature 0.07, k in 10, 20, 100, 200",
           "knn", {"ks": (10, 20, 100, 200), "temperature": 0.07}, (("cls",),)),
]}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ProbeError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
