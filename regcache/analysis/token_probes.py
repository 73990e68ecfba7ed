"""Token probes (claim 4 of the reproducibility study): what a patch token says about its position."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..probe import Split, accuracy
from ..probe.minibatch import train_heads
from ..settings import Training
from ..store import FeatureSet, StoreError
from .norm_stats import _find_images, _view0, outliers, set_name, split_norms


@dataclass
class TokenProbe:
    """Claim 4 of the study: how well a linear probe reads a patch token's grid position from it."""

    name: str
    train_images: int
    test_images: int
    chance: float
    accuracy: float
    accuracy_outliers: float   # on held-out outlier tokens (norm > 98th percentile)
    accuracy_normal: float
    outliers: int


def token_probe(fs: FeatureSet, iterations: int = 500, seed: int = 0, test_fraction: float = 0.2) -> TokenProbe:
    """Predict each patch token's position (one of h*w classes) with a linear head trained on held-out
    images' tokens; report accuracy for outlier and normal tokens. Needs the ``tokens`` and ``norms`` features."""
    missing = [f for f in ("tokens", "norms") if f not in fs.features]
    if missing:
        raise StoreError(f"{fs.path} lacks {', '.join(missing)}: extract with --features tokens,norms (small sets)")
    got = _view0(fs, "tokens,norms", dtype=np.float16)
    tokens, norms = got.x["tokens"], got.x["norms"].astype(np.float32)
    n, length, _ = tokens.shape
    _, is_out = outliers(split_norms(norms, fs.layout)["patches"])
    is_out = is_out.reshape(n, length)
    rng = np.random.default_rng(seed)
    test = np.zeros(n, bool)
    test[rng.choice(n, size=max(1, int(round(test_fraction * n))), replace=False)] = True

    def flat(images: np.ndarray, name: str) -> Split:
        x = tokens[images].reshape(-1, tokens.shape[-1])
        pos = np.tile(np.arange(length), len(images))
        return Split(name, {"tokens": x}, pos, np.repeat(got.keys[images], length), np.zeros(len(pos), np.int16))

    train, held = flat(np.flatnonzero(~test), "train"), flat(np.flatnonzero(test), "test")
    training = Training(features=["tokens"], optimizer="adamw", lr=[1e-3], wd=[1e-4], iterations=iterations,
                        batch_size=1024, seed=seed)
    head = train_heads(train, length, training)[0]
    pred = head.logits(held).argmax(1)
    right = pred == held.labels
    out_mask = is_out[test].ravel()
    name = set_name(fs)
    return TokenProbe(name, int((~test).sum()), int(test.sum()), 1 / length,
                      accuracy(head.logits(held), held.labels),
                      float(right[out_mask].mean()) if out_mask.any() else float("nan"),
                      float(right[~out_mask].mean()), int(out_mask.sum()))


@dataclass
class PixelProbe:
    """Claim 4's other half: how well a linear map rebuilds a patch's pixels from its token."""

    name: str
    train_images: int
    test_images: int
    patch_pixels: int          # values per patch (p * p * 3)
    rmse: float                # held-out per-patch RMSE, pixel values in [0, 1]
    rmse_outliers: float       # on held-out outlier tokens (norm > 98th percentile)
    rmse_normal: float
    rmse_mean_patch: float     # baseline: always predict the training patches' mean
    outliers: int


def pixel_probe(fs: FeatureSet, ridge: float = 1.0, seed: int = 0, test_fraction: float = 0.2,
                crops: Mapping[str, np.ndarray] | None = None) -> PixelProbe:
    """Ridge regression from each patch token to its patch's pixels, fitted on some images' tokens, scored on
    the others'; outlier tokens against the rest. Needs the ``tokens`` and ``norms`` features; ``crops``
    (key -> the preprocessed uint8 crop [H, W, 3]) are read back from the set's shards when not given."""
    missing = [f for f in ("tokens", "norms") if f not in fs.features]
    if missing:
        raise StoreError(f"{fs.path} lacks {', '.join(missing)}: extract with --features tokens,norms (small sets)")
    got = _view0(fs, "tokens,norms")
    crops = _find_images(fs, list(got.keys)) if crops is None else crops
    if len(crops) < len(got.keys):
        raise StoreError(f"{fs.path}: {len(got.keys) - len(crops)} of {len(got.keys)} images are no longer in the "
                         "shards the set was made from; the pixel probe needs them")
    tokens, n = got.x["tokens"].astype(np.float64), len(got.keys)
    h, w = fs.layout.grid
    pixels = np.stack([crops[k] for k in got.keys]).astype(np.float64) / 255  # [N, H, W, 3]
    p = pixels.shape[1] // h
    patches = pixels[:, :h * p, :w * p].reshape(n, h, p, w, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * w, -1)
    _, is_out = outliers(split_norms(got.x["norms"], fs.layout)["patches"])
    is_out = is_out.reshape(n, h * w)
    rng = np.random.default_rng(seed)
    test = np.zeros(n, bool)
    test[rng.choice(n, size=max(1, int(round(test_fraction * n))), replace=False)] = True
    x, y = tokens[~test].reshape(-1, tokens.shape[-1]), patches[~test].reshape(-1, patches.shape[-1])
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    weights = np.linalg.solve(xc.T @ xc + ridge * np.eye(xc.shape[1]), xc.T @ (y - my))
    xt, yt = tokens[test].reshape(-1, tokens.shape[-1]), patches[test].reshape(-1, patches.shape[-1])
    rmse = np.sqrt((((xt - mx) @ weights + my - yt) ** 2).mean(1))
    out_mask = is_out[test].ravel()
    name = set_name(fs)
    return PixelProbe(name, int((~test).sum()), int(test.sum()), int(patches.shape[-1]), float(rmse.mean()),
                      float(rmse[out_mask].mean()) if out_mask.any() else float("nan"), float(rmse[~out_mask].mean()),
                      float(np.sqrt(((yt - my) ** 2).mean(1)).mean()), int(out_mask.sum()))
