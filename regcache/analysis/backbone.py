"""Small backbone passes on a few images: attention maps of [CLS] and registers, patch-embedding similarity
(claim 3 of the reproducibility study)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..features import TokenLayout
from ..report import pyplot, save_figure
from .norms import _safe, outliers, split_norms

if TYPE_CHECKING:
    import torch

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

    from ..tokens import layout_of, token_features

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
