"""Token norms from the cache: histograms by token type, top-2% outlier tokens, where they sit, and per block.

Outliers follow the reproducibility study of "Vision Transformers Need Registers": patch tokens whose norm
before the final LayerNorm lies above the 98th percentile of all patch-token norms of that model on that data.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import decode_image, open_shard
from ..features import TokenLayout, split_name
from ..models import Preprocess
from ..plots import pyplot, save_figure
from ..store import FeatureSet, StoreError

OUTLIER_PERCENTILE = 98.0


def split_norms(norms: np.ndarray, layout: TokenLayout) -> dict[str, np.ndarray]:
    """[N, T] norms -> {"cls": [N], "registers": [N, M], "patches": [N, h, w]} (row-major grid), wherever the
    layout puts the registers."""
    out = {"patches": norms[:, layout.patch_slice].reshape(len(norms), *layout.grid)}
    if layout.has_cls:
        out["cls"] = norms[:, 0]
    if layout.num_reg:
        out["registers"] = norms[:, layout.reg_slice]
    return out


@dataclass
class NormSummary:
    """Outlier statistics of one feature set's patch tokens."""

    name: str
    images: int
    threshold: float                  # the 98th percentile of patch-token norms
    images_with_outlier: float        # fraction of images with at least one outlier patch
    outliers_per_image: float
    median_norm: dict                 # token type -> median norm
    max_norm: dict
    blocks: dict = field(default_factory=dict)  # block (-k) -> `block_norms` profile, for sets with norms@-k


def outliers(patches: np.ndarray, percentile: float = OUTLIER_PERCENTILE) -> tuple[float, np.ndarray]:
    """Threshold over all patch tokens and the boolean outlier map, [N, h, w]."""
    threshold = float(np.percentile(patches, percentile))
    return threshold, patches > threshold


def summarize(name: str, norms: np.ndarray, layout: TokenLayout) -> tuple[NormSummary, np.ndarray]:
    """The summary, and the outlier heatmap (fraction of images with an outlier at each grid cell)."""
    parts = split_norms(norms.astype(np.float32), layout)
    threshold, is_out = outliers(parts["patches"])
    per_image = is_out.reshape(len(norms), -1).sum(1)
    summary = NormSummary(name=name, images=len(norms), threshold=threshold,
                          images_with_outlier=float(np.mean(per_image > 0)),
                          outliers_per_image=float(per_image.mean()),
                          median_norm={k: float(np.median(v)) for k, v in parts.items()},
                          max_norm={k: float(np.max(v)) for k, v in parts.items()})
    return summary, is_out.mean(0)


def set_name(fs: FeatureSet) -> str:
    """``model / dataset`` as figures and summaries label a set; test-time registers are named, since they
    change every feature of the same model and data."""
    ttr = fs.meta.model.test_time_registers
    extra = f" +{ttr['k']} test-time reg" if ttr else ""
    return f"{fs.meta.model.name}{extra} / {fs.meta.dataset.name}"


def load_norms(fs: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """View-0 norms [N, T] and keys of a feature set."""
    if "norms" not in fs.features:
        raise StoreError(f"{fs.path} has no norms; extract with --features including norms")
    got = _view0(fs, "norms")
    return got.x["norms"], got.keys


def _view0(fs: FeatureSet, features: str, **kw):
    """View-0 rows of ``features``; an empty set is refused by name (numpy's percentile would fail on it)."""
    got = fs.load(features, views=[0], concat=False, allow_incomplete=True, **kw)
    if not len(got.keys):
        raise StoreError(f"{set_name(fs)} ({fs.path}) has no rows")
    return got


def block_norms(fs: FeatureSet) -> dict[int, dict[str, float]]:
    """Per block (-k, from the set's ``norms@-k``; -1 from ``norms``): percentiles of the patch-token norms and
    the median norm of each other token type. Where the high-norm tokens appear, block by block."""
    names = sorted((f for f in fs.features if split_name(f)[0] == "norms"), key=lambda f: split_name(f)[1])
    got = _view0(fs, ",".join(names))
    profile = {}
    for name in names:
        parts = split_norms(got.x[name].astype(np.float32), fs.layout)
        patches = parts.pop("patches").ravel()
        profile[split_name(name)[1]] = {
            **{f"patch_{k}": float(np.percentile(patches, q)) for k, q in (("median", 50), ("p98", 98),
                                                                             ("p99.9", 99.9), ("max", 100))},
            **{f"{kind}_median": float(np.median(v)) for kind, v in parts.items()}}
    return profile


def block_norms_figure(names: Sequence[str], profiles: Sequence[dict], out: Path) -> Path:
    """One panel per set: the per-block profile of `block_norms`, log scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, name, prof in zip(axes[0], names, profiles):
        blocks = sorted(prof)
        for key in prof[blocks[0]]:
            ax.plot(blocks, [prof[b][key] for b in blocks], marker="o", ms=3, label=key.replace("_", " "),
                    ls="-" if key.startswith("patch") else "--")
        ax.set(yscale="log", xlabel="block (from the last)", ylabel="token norm before the final norm", xticks=blocks)
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(fig, out / "block_norms.png")


def norms_report(sets: Sequence[FeatureSet], out: Path) -> list[NormSummary]:
    """Side-by-side histograms by token type (log scale) and outlier heatmaps; summary.json and .parquet.
    Sets extracted with ``--layers`` (``norms@-k``) also get the per-block view: block_norms.png and .json."""
    import pandas as pd

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    summaries, heatmaps, parts = [], [], []
    for fs in sets:
        name = set_name(fs)
        norms, _ = load_norms(fs)
        s, heat = summarize(name, norms, fs.layout)
        summaries.append(s)
        heatmaps.append(heat)
        parts.append(split_norms(norms.astype(np.float32), fs.layout))
    n = len(sets)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, s, p in zip(axes[0], summaries, parts):
        top = max(float(v.max()) for v in p.values())
        bins = np.linspace(0, top * 1.02, 60)
        for kind, values in p.items():
            ax.hist(values.ravel(), bins, alpha=0.55, label=kind, density=True)
        ax.axvline(s.threshold, color="k", ls="--", lw=0.8, label="98th pct (patches)")
        ax.set(yscale="log", xlabel="token norm before the final norm", title=s.name)
        ax.legend(fontsize=7)
    save_figure(fig, out / "norm_histograms.png")
    # one colour scale for every panel, so that the sets compare; titles wrapped to the panel's width
    top = max(float(h.max()) for h in heatmaps) or 1.0
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, layout="constrained")
    for ax, s, heat in zip(axes[0], summaries, heatmaps):
        im = ax.imshow(heat, cmap="magma", vmin=0, vmax=top)
        ax.set_title(f"{s.name.replace(' / ', chr(10))}\n{100 * s.images_with_outlier:.0f}% of images, "
                     f"{s.outliers_per_image:.2f}/image", fontsize=8)
        ax.set(xticks=[], yticks=[])
    fig.colorbar(im, ax=list(axes[0]), fraction=0.046, label="fraction of images with an outlier here")
    fig.savefig(out / "outlier_positions.png", dpi=110)
    plt.close(fig)
    for s, fs in zip(summaries, sets):
        if any(split_name(f)[1] != -1 for f in fs.features if split_name(f)[0] == "norms"):
            s.blocks = block_norms(fs)
    deep = [s for s in summaries if s.blocks]
    if deep:
        block_norms_figure([s.name for s in deep], [s.blocks for s in deep], out)
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    pd.DataFrame([{**asdict(s), **{k: json.dumps(getattr(s, k)) for k in ("median_norm", "max_norm", "blocks")}}
                  for s in summaries]).to_parquet(out / "summary.parquet", index=False)
    return summaries


def feature_maps(fs: FeatureSet, keys: Sequence[str], out: Path, with_images: bool = True) -> list[Path]:
    """The patch-norm grid of each chosen image as a PNG, beside the (preprocessed) input when its shard is at hand."""
    plt = pyplot()
    norms, all_keys = load_norms(fs)
    where = {k: i for i, k in enumerate(all_keys)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise StoreError(f"{fs.path}: no rows for keys {', '.join(missing[:5])}")
    images = _find_images(fs, keys) if with_images else {}
    threshold, _ = outliers(split_norms(norms.astype(np.float32), fs.layout)["patches"])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        grid = split_norms(norms[where[key]][None].astype(np.float32), fs.layout)["patches"][0]
        panels = 2 if key in images else 1
        fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.4), squeeze=False)
        if key in images:
            axes[0][0].imshow(images[key])
            axes[0][0].set(title=key, xticks=[], yticks=[])
        im = axes[0][-1].imshow(grid, cmap="viridis")
        ys, xs = np.nonzero(grid > threshold)
        axes[0][-1].scatter(xs, ys, marker="x", color="red", s=18, label="outlier (>98th pct)")
        axes[0][-1].set(title="patch norms", xticks=[], yticks=[])
        fig.colorbar(im, ax=axes[0][-1], fraction=0.046)
        written.append(save_figure(fig, out / f"featuremap__{_safe(key)}.png"))
    return written


def _find_images(fs: FeatureSet, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The preprocessed crops (view 0) of the keys, read from the shards if they are still where they were."""
    import os


    index = fs.index
    pre = Preprocess(**fs.meta.preprocess)
    urls = dict(zip(fs.meta.dataset.shards, fs.meta.dataset.urls))
    wanted = index[index.key.isin(keys)].groupby("shard").key.apply(set)
    found = {}
    for shard, ks in wanted.items():
        url = urls[shard]
        if not os.path.exists(url):
            continue
        for sample in open_shard(url, allow_pipe=False):
            if sample["__key__"] in ks:
                img = decode_image(sample, fs.meta.dataset.image)
                found[sample["__key__"]] = pre(img).permute(1, 2, 0).numpy()
    return found


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
