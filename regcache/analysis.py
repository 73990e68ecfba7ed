"""Why registers help: token norms, outlier tokens and feature maps from the cache; attention maps
and patch-embedding similarity from a small backbone pass (the claims of the reproducibility study
of "Vision Transformers Need Registers").

Outliers follow the study: patch tokens whose norm before the final LayerNorm lies above the 98th
percentile of all patch-token norms of that model on that data.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .features import TokenLayout
from .report import pyplot, save_figure
from .store import FeatureSet, StoreError

if TYPE_CHECKING:
    import torch

OUTLIER_PERCENTILE = 98.0


# --------------------------------------------------------------------------- from the cache

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
        raise StoreError(f"{fs.meta['model']['name']} / {fs.meta['dataset']['name']} ({fs.path}) has no rows")
    return got


def norms_report(sets: Sequence[FeatureSet], out: Path) -> list[NormSummary]:
    """Side-by-side histograms by token type (log scale) and outlier heatmaps; summary.json and .parquet."""
    import pandas as pd

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    summaries, heatmaps, parts = [], [], []
    for fs in sets:
        name = f"{fs.meta['model']['name']} / {fs.meta['dataset']['name']}"
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
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, s, heat in zip(axes[0], summaries, heatmaps):
        im = ax.imshow(heat, cmap="magma", vmin=0)
        ax.set(title=f"{s.name}\n{100 * s.images_with_outlier:.0f}% of images, {s.outliers_per_image:.2f}/image",
               xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, fraction=0.046, label="images with an outlier here")
    save_figure(fig, out / "outlier_positions.png")
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    pd.DataFrame([{**asdict(s), "median_norm": json.dumps(s.median_norm), "max_norm": json.dumps(s.max_norm)}
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

    from .data import decode_image, open_shard
    from .models import Preprocess

    index = fs.index
    pre = Preprocess(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fs.meta["preprocess"].items()})
    urls = dict(zip(fs.meta["dataset"]["shards"], fs.meta["dataset"]["urls"]))
    wanted = index[index.key.isin(keys)].groupby("shard").key.apply(set)
    found = {}
    for shard, ks in wanted.items():
        url = urls[shard]
        if not os.path.exists(url):
            continue
        for sample in open_shard(url, allow_pipe=False):
            if sample["__key__"] in ks:
                img = decode_image(sample, ("jpg", "jpeg", "png", "webp"))
                found[sample["__key__"]] = pre(img).permute(1, 2, 0).numpy()
    return found


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


# --------------------------------------------------------------------------- small backbone passes

def last_block_attention(model, images) -> "torch.Tensor":
    """Attention probabilities of the last block, [B, heads, T, T] (rows sum to 1 over keys).

    timm's attention runs fused; we recompute the probabilities from the block's own q/k projections
    on the input it received.
    """
    import torch

    attn = model.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    try:
        with torch.inference_mode():
            model.forward_features(images)
    finally:
        handle.remove()
    x = seen["x"]
    with torch.inference_mode():
        b, t, d = x.shape
        qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attention_maps(model, images, layout: TokenLayout, registers: bool = False) -> dict[str, "torch.Tensor"]:
    """Head-averaged attention of [CLS] (and of each register) to the patches, [B, h, w] each."""
    probs = last_block_attention(model, images).mean(1)  # [B, T, T]
    rows = {}
    if layout.has_cls:
        rows["cls"] = 0
    if registers:
        rows.update({f"reg{i + 1}": layout.reg_slice.start + i for i in range(layout.num_reg)})
    return {name: probs[:, r, layout.patch_slice].reshape(len(images), *layout.grid) for name, r in rows.items()}


def neighbour_similarity(model, images, layout: TokenLayout) -> "torch.Tensor":
    """Mean cosine similarity of each patch embedding (after patch_embed) to its 4 neighbours, [B, h, w]."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        e = model.patch_embed(images)  # [B, L, D] (timm flattens the grid row-major)
        e = F.normalize(e.reshape(len(images), *layout.grid, -1).float(), dim=-1)
        sims, count = torch.zeros(e.shape[:3]), torch.zeros(e.shape[1:3])
        for dy, dx in ((0, 1), (1, 0)):
            h, w = layout.grid[0] - dy, layout.grid[1] - dx
            s = (e[:, :h, :w] * e[:, dy:, dx:]).sum(-1)
            sims[:, :h, :w] += s
            sims[:, dy:, dx:] += s
            count[:h, :w] += 1
            count[dy:, dx:] += 1
        return sims / count


def token_norms(model, images) -> "torch.Tensor":
    """Norms of every token before the final norm, [B, T] (as the cache stores them)."""
    import torch

    from .tokens import layout_of, token_features

    with torch.inference_mode():
        return token_features(model, images, layout_of(model), ("norms",))["norms"]


def attention_figure(model, layout: TokenLayout, preprocess, paths: Sequence[Path], out: Path,
                     registers: bool = False, display: int = 800) -> list[Path]:
    """Per image, a PNG row: the input crop, then [CLS] (and register) attention upsampled to ``display`` px."""
    import torch.nn.functional as F
    from PIL import Image

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        crop = preprocess(Image.open(path).convert("RGB"))
        maps = attention_maps(model, preprocess.normalize(crop[None]), layout, registers)
        up = {k: F.interpolate(v[None].float(), size=(display, display), mode="bilinear")[0, 0]
              for k, v in maps.items()}
        fig, axes = plt.subplots(1, 1 + len(up), figsize=(3 * (1 + len(up)), 3.2), squeeze=False)
        axes[0][0].imshow(F.interpolate(crop[None].float(), size=(display, display), mode="bilinear")[0]
                          .permute(1, 2, 0).clamp(0, 255).byte().numpy())
        axes[0][0].set(title=Path(path).name, xticks=[], yticks=[])
        for ax, (name, m) in zip(axes[0][1:], up.items()):
            ax.imshow(m.numpy(), cmap="inferno")
            ax.set(title=f"{name} → patches", xticks=[], yticks=[])
        written.append(save_figure(fig, out / f"attention__{_safe(Path(path).stem)}.png"))
    return written


def similarity_report(model, layout: TokenLayout, preprocess, paths: Sequence[Path], out: Path) -> dict:
    """Claim 3 of the study: neighbour similarity after patch_embed, outlier patches vs the rest."""
    import torch
    from PIL import Image

    plt = pyplot()
    images = preprocess.normalize(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]))
    sims = neighbour_similarity(model, images, layout).numpy()
    patches = split_norms(token_norms(model, images).numpy(), layout)["patches"]
    threshold, is_out = outliers(patches)
    result = {"images": len(paths), "threshold": threshold, "outliers": int(is_out.sum()),
              "mean_similarity_outliers": float(sims[is_out].mean()) if is_out.any() else float("nan"),
              "mean_similarity_normal": float(sims[~is_out].mean())}
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bins = np.linspace(float(sims.min()), float(sims.max()), 40)
    ax.hist(sims[~is_out], bins, density=True, alpha=0.6, label="normal patches")
    if is_out.any():
        ax.hist(sims[is_out], bins, density=True, alpha=0.6, label="outlier patches (>98th pct norm)")
    ax.set(xlabel="cosine similarity to 4 neighbours after patch_embed", ylabel="density")
    ax.legend(fontsize=7)
    save_figure(fig, out / "neighbour_similarity.png")
    (out / "neighbour_similarity.json").write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------- token probes

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
    from .probe import ProbeConfig, Split, accuracy, train_heads

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
