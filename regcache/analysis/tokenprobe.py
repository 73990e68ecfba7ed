"""Token probes (claim 4 of the reproducibility study): what a patch token says about its position."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import FeatureSet, StoreError
from .norms import _view0, outliers, split_norms


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
    from ..probe import ProbeConfig, Split, accuracy, train_heads

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
    cfg = ProbeConfig(features=[("tokens",)], optimizer="adamw", lrs=(1e-3,), wds=(1e-4,), iterations=iterations,
                      batch_size=1024, seed=seed)
    head = train_heads(train, length, cfg)[0]
    pred = head.logits(held).argmax(1)
    right = pred == held.labels
    out_mask = is_out[test].ravel()
    name = f"{fs.meta['model']['name']} / {fs.meta['dataset']['name']}"
    return TokenProbe(name, int((~test).sum()), int(test.sum()), 1 / length,
                      accuracy(head.logits(held), held.labels),
                      float(right[out_mask].mean()) if out_mask.any() else float("nan"),
                      float(right[~out_mask].mean()), int(out_mask.sum()))
