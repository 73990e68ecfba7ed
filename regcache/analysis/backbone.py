"""Small backbone passes on a few images: attention maps of [CLS] and registers, patch-embedding similarity
(claim 3 of the reproducibility study)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..features import TokenLayout
from ..plots import pyplot, save_figure
from ..tokens import layout_of, token_features
from .norm_stats import _safe, outliers, split_norms


def attention_parts(model, images, blocks: Sequence[int] = (-1,)) -> dict[int, tuple]:
    """Per block: the attention's queries, keys and values, each [B, heads, T, head_dim] (after q_norm/k_norm).

    timm's attention runs fused; one forward pass records each chosen block's attention input, and
    the block's own qkv projection recomputes them from it.
    """
    seen, handles = {}, []
    for b in blocks:
        handles.append(model.blocks[b].attn.register_forward_hook(lambda m, inp, out, b=b: seen.update({b: inp[0]})))
    try:
        with torch.inference_mode():
            model.forward_features(images)
    finally:
        for h in handles:
            h.remove()
    parts = {}
    with torch.inference_mode():
        for b in blocks:
            attn, x = model.blocks[b].attn, seen[b]
            n, t, d = x.shape
            qkv = attn.qkv(x).reshape(n, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
            parts[b] = (attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2])
    return parts


def last_block_attention(model, images) -> "torch.Tensor":
    """Attention probabilities of the last block, [B, heads, T, T] (rows sum to 1 over keys)."""
    q, k, _ = attention_parts(model, images)[-1]
    attn = model.blocks[-1].attn
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def qkv_norms(model, images, layout: TokenLayout, blocks: Sequence[int]) -> dict[int, dict[str, "torch.Tensor"]]:
    """Per block and for q, k, v: the norm of each patch token's vector (heads concatenated), [B, h, w]."""
    out = {}
    for b, parts in attention_parts(model, images, blocks).items():
        out[b] = {name: t.permute(0, 2, 1, 3).flatten(2).float().norm(dim=-1)[:, layout.patch_slice]
                  .reshape(len(images), *layout.grid) for name, t in zip("qkv", parts)}
    return out


def qkv_report(model, layout: TokenLayout, preprocess, paths: Sequence[Path], out: Path, blocks: int = 3) -> dict:
    """The study's Fig. 6: query, key and value norm maps of the last ``blocks`` blocks, per image (PNG),
    and their mean at outlier patches (output norm above the 98th percentile over these images) vs the rest."""
    from PIL import Image

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    crops = [preprocess(Image.open(p).convert("RGB")) for p in paths]
    images = preprocess.normalize(torch.stack(crops))
    chosen = list(range(-blocks, 0))
    maps = qkv_norms(model, images, layout, chosen)
    patches = split_norms(token_norms(model, images).numpy(), layout)["patches"]
    threshold, is_out = outliers(patches)
    result = {"images": len(paths), "threshold": threshold, "outliers": int(is_out.sum()), "blocks": {}}
    for b, m in maps.items():
        result["blocks"][str(b)] = {
            name: {"outliers": float(v.numpy()[is_out].mean()) if is_out.any() else float("nan"),
                   "normal": float(v.numpy()[~is_out].mean())} for name, v in m.items()}
    for i, path in enumerate(paths):
        fig, axes = plt.subplots(len(chosen), 4, figsize=(12, 3 * len(chosen)), squeeze=False)
        for row, b in zip(axes, chosen):
            row[0].imshow(crops[i].permute(1, 2, 0).numpy())
            row[0].set(title=f"block {b}", xticks=[], yticks=[])
            for ax, name in zip(row[1:], "qkv"):
                im = ax.imshow(maps[b][name][i].numpy(), cmap="viridis")
                ys, xs = np.nonzero(is_out[i])
                ax.scatter(xs, ys, marker="x", color="red", s=14)
                ax.set(title=f"{name} norm", xticks=[], yticks=[])
                fig.colorbar(im, ax=ax, fraction=0.046)
        written = save_figure(fig, out / f"qkv__{_safe(Path(path).stem)}.png")
        result.setdefault("figures", []).append(str(written))
    (out / "qkv.json").write_text(json.dumps(result, indent=2))
    return result


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
    with torch.inference_mode():
        return token_features(model, images, layout_of(model), ("norms",))["norms"]


def attention_figure(model, layout: TokenLayout, preprocess, paths: Sequence[Path], out: Path,
                     registers: bool = False, display: int = 800) -> list[Path]:
    """Per image, a PNG row: the input crop, then [CLS] (and register) attention upsampled to ``display`` px."""
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
