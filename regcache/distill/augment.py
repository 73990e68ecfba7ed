"""PH-Reg's test-time augmentation (Chen et al. 2025, appendix B.3; their ``utils/denoising.py``): pure functions.

A view shifts the image by whole patches (the gap filled with normalised white) and may flip it; the same
shift and flip of a grid of patch indices says, for every token of the view, which patch of the original
it shows (-1: the fill). `align` averages each original patch over the views that show it, which is the
teacher's denoised target. Offsets are whole patches so that alignment is exact indexing, no resampling.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

#: pool of candidate offsets per chosen view (the authors draw 10x as many as they keep)
POOL_FACTOR = 10


@dataclass(frozen=True)
class Views:
    """The views of one image: ``offsets`` [V, 2] (dy, dx) in patches, ``flips`` [V] (horizontal, after the shift).
    View 0 is the image itself, so every patch is covered at least once."""

    offsets: np.ndarray
    flips: np.ndarray


def shift_limit(grid: int, shift: float) -> int:
    """s = round(shift * grid side) patches, Python's rounding as in the authors' code (0.15 x 37 -> 6)."""
    return int(round(shift * grid))


def view_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one image's views: from (seed, the sample's key), so the same image gets the same views in
    any shard order, batch or resumed run."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little"))


def farthest_points(points: np.ndarray, n: int, start: int) -> np.ndarray:
    """Indices of ``n`` points chosen greedily, each the farthest (squared Euclidean) from those chosen, from
    ``start``: well-spread offsets instead of clustered ones (the authors' ``farthest_point_sample``)."""
    chosen = np.empty(n, dtype=np.int64)
    nearest = np.full(len(points), np.inf)
    far = start
    for i in range(n):
        chosen[i] = far
        nearest = np.minimum(nearest, ((points - points[far]) ** 2).sum(1))
        far = int(np.argmax(nearest))
    return chosen


def sample_views(rng: np.random.Generator, grid: int, views: int = 10, shift: float = 0.15,
                 flip: float = 0.5) -> Views:
    """A pool of ``POOL_FACTOR * views`` integer offsets in [-s, s]^2, ``views`` of them by farthest-point
    sampling from a random start; view 0 then becomes (0, 0) unflipped, the others flip with probability ``flip``."""
    s = shift_limit(grid, shift)
    pool = POOL_FACTOR * views
    points = np.stack([rng.integers(-s, s, size=pool, endpoint=True),
                       rng.integers(-s, s, size=pool, endpoint=True)], axis=1)
    offsets = points[farthest_points(points.astype(np.float64), views, int(rng.integers(pool)))].copy()
    flips = rng.random(views) < flip
    offsets[0], flips[0] = 0, False
    return Views(offsets=offsets, flips=flips)


def shift(x: torch.Tensor, dy: int, dx: int, fill: torch.Tensor | float) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` on the last two dims, ``fill`` where that is outside:
    a positive offset moves the content up/left (the authors' ``shuffle_shift``). ``fill``: a scalar, or one
    value per channel ([C], for [C, H, W] inputs)."""
    h, w = x.shape[-2:]
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    out = fill.reshape(*fill.shape, 1, 1).expand_as(x).clone() if fill.ndim else torch.full_like(x, fill.item())
    ys, xs = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[..., ys.start - dy:ys.stop - dy, xs.start - dx:xs.stop - dx] = x[..., ys, xs]
    return out


def augment(image: torch.Tensor, views: Views, patch: int, fill: torch.Tensor) -> torch.Tensor:
    """A normalised image [C, H, W] -> its views [V, C, H, W]: shifted by whole patches (``fill`` [C] in the gap),
    then flipped."""
    out = []
    for (dy, dx), flipped in zip(views.offsets.tolist(), views.flips.tolist()):
        v = shift(image, dy * patch, dx * patch, fill)
        out.append(v.flip(-1) if flipped else v)
    return torch.stack(out)


def view_index(grid: tuple[int, int], views: Views) -> torch.Tensor:
    """[V, L]: for each token of each view (row-major), the original patch it shows (row-major), -1 for the fill:
    the patch-index grid shifted (in patches) and flipped as the pixels are."""
    gh, gw = grid
    base = torch.arange(gh * gw, dtype=torch.long).reshape(gh, gw)
    out = []
    for (dy, dx), flipped in zip(views.offsets.tolist(), views.flips.tolist()):
        v = shift(base, dy, dx, -1)
        out.append((v.flip(-1) if flipped else v).reshape(-1))
    return torch.stack(out)


def align(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, V, L, D] view features and their [B, V, L] `view_index` -> [B, L, D], each original patch the mean over
    the view tokens that show it (the authors' ``recover_images``); fill tokens are dropped."""
    b, v, n, d = features.shape
    valid = index >= 0
    where = (index + torch.arange(b, device=index.device).view(b, 1, 1) * n)[valid]   # into [B * L]
    total = torch.zeros(b * n, d, dtype=torch.float32, device=features.device)
    total.index_add_(0, where, features[valid].float())
    count = torch.bincount(where, minlength=b * n).to(total.dtype)
    if bool((count == 0).any()):
        raise ValueError("a patch is in no view (view 0 must be the unshifted image)")
    return (total / count.unsqueeze(1)).view(b, n, d)


def fill_value(fill: str, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalised pixel the gaps get (`settings.distill.FILLS`): white is (1 - mean) / std per channel."""
    if fill == "white":
        return torch.tensor([(1 - m) / s for m, s in zip(mean, std)], dtype=torch.float32)
    if fill == "mean":
        return torch.zeros(len(mean), dtype=torch.float32)
    raise ValueError(f"unknown fill {fill!r} (white or mean)")
