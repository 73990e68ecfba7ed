"""The teacher's denoised targets, cached as a feature set (feature ``tokens``, [L, D] per image).

Every image's views (`augment`) go through the frozen teacher; its patch tokens after the final norm are
aligned back and averaged. The set's identity is the teacher's own ``tokens`` set identity (`identity.plan`:
weights, preprocessing, precision, dtype, the shards' bytes) with the augmentation added, and its model
marked ``phreg-targets:``, so that commands looking for the teacher's own sets never pick it up (name it by
path to probe it). A second distillation with other student settings reuses it; other views make another
set. One store unit per input shard: a killed pass resumes at the first uncommitted shard.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data import Dataset, load_dataset, shard_ids
from ..extract.passes import AUTOCAST, changed
from ..extract.run import build_meta, check_shards_exist, shard_counts, verify_shards
from ..extract.stream import UnitStream, check_pipes
from ..identity import Plan, plan
from ..progress import progress
from ..settings import ExtractSettings
from ..settings.distill import DistillSettings
from ..store import FeatureSet, feature_set_path, find_reusable, fingerprint
from .augment import align, augment, fill_value, sample_views, view_index, view_rng
from .student import DistillError, patch_tokens

log = logging.getLogger("regcache")

#: the identity's model of a targets set: not the teacher's name, so no search for the teacher's sets finds it
MARK = "phreg-targets:"


@dataclass(frozen=True)
class Augment:
    """The teacher's views (`settings.distill.DistillSettings`): how many, how far, flipped how often, the fill."""

    views: int = 10
    shift: float = 0.15
    flip: float = 0.5
    fill: str = "white"
    seed: int = 0

    @classmethod
    def of(cls, s: DistillSettings) -> "Augment":
        return cls(views=s.views, shift=s.shift, flip=s.flip, fill=s.fill, seed=s.augment_seed)


@dataclass
class Targets:
    """The targets set, and what making it cost here (0 images when it was cached)."""

    fs: FeatureSet
    reused: bool
    images: int = 0          # images the teacher ran on in this call
    seconds: float = 0.0


def covering(ds: Dataset, images: int | None) -> int:
    """Shards (from the first) that hold the first ``images`` samples; all when not limited or counts are unknown."""
    if images is None:
        return len(ds.shards)
    total = 0
    for n, count in enumerate(shard_counts(ds), 1):
        if count is None:
            return len(ds.shards)
        total += count
        if total >= images:
            return n
    return len(ds.shards)


def teacher_plan(s: DistillSettings, read: bool = True) -> Plan:
    """What the teacher's own ``tokens`` extraction of the covering shards would be (`identity.plan`); ``read``
    False: shards not hashed yet stay unhashed (a dry run reads no shard)."""
    ds = load_dataset(s.data)
    check_pipes(ds, allow_pipe=False)
    k = covering(ds, s.images)
    ds = replace(ds, shards=ds.shards[:k], counts=ds.counts[:k] if ds.counts else None)
    check_shards_exist(ds)
    x = ExtractSettings.make({f: getattr(s, f) for f in ("model", "checkpoint", "random_init", "model_args",
                                                          "pos_embed", "size", "resize", "crop_mode", "interpolation",
                                                          "mean", "std", "data", "precision", "dtype", "device",
                                                          "cache")}, features=("tokens",), quiet=True)
    return plan(x, ds, shard_ids(ds, Path(s.cache) / ".digests", read=read))


def targets_identity(p: Plan, aug: Augment) -> dict:
    """The targets set's identity: the teacher's tokens set's, marked, with the augmentation."""
    return {**p.identity, "model": MARK + p.timm_name, "augment": asdict(aug)}


def denoised(model: torch.nn.Module, images: torch.Tensor, keys: list[str], aug: Augment, fill: torch.Tensor,
             precision: str = "fp32") -> torch.Tensor:
    """Normalised images [B, 3, S, S] -> the teacher's targets [B, L, D] (float32): each image's views in one
    forward pass, aligned back and averaged (`augment.align`)."""
    patch = int(model.patch_embed.patch_size[0])
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    views = [sample_views(view_rng(aug.seed, k), grid[0], aug.views, aug.shift, aug.flip) for k in keys]
    x = torch.stack([augment(img, v, patch, fill.to(img.device)) for img, v in zip(images, views)])
    dtype = AUTOCAST[precision]
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        tokens = patch_tokens(model, x.flatten(0, 1)).float()
    index = torch.stack([view_index(grid, v) for v in views]).to(images.device)
    return align(tokens.view(len(keys), aug.views, *tokens.shape[1:]), index)


def make_targets(s: DistillSettings, p: Plan, teacher: torch.nn.Module, device: torch.device) -> Targets:
    """The targets set of ``p`` and the augmentation: found in the cache, or made (resumed) shard by shard."""
    t0 = time.perf_counter()
    aug = Augment.of(s)
    ident = targets_identity(p, aug)
    found = find_reusable(s.cache, ident)
    if found is not None:
        verify_shards(found, p.dataset, list(p.shards))
        log.info("teacher targets cached in %s: no teacher work", found.path)
        return Targets(found, reused=True)
    path = feature_set_path(s.cache, p.dataset.name, f"phreg-{s.model}", fingerprint(ident))

    def meta() -> dict:
        m = build_meta(p)
        m["model"]["name"] = f"{s.model} (PH-Reg targets)"
        m["provenance"]["settings"] = s.model_dump(mode="json", exclude_defaults=True)
        return m

    fs = FeatureSet.create(path, ident, meta)
    verify_shards(fs, p.dataset, list(p.shards))
    fs.remove_stale_temporaries()
    pending = [u for u in range(fs.num_units) if u not in fs.committed_units()]
    sizes = [fs.meta.dataset.sizes[u] for u in pending]
    log.info("teacher targets: %d of %d shards of %s, %d views per image, into %s", len(pending), fs.num_units,
             p.dataset.name, aug.views, fs.path)
    fill = fill_value(aug.fill, p.preprocess.mean, p.preprocess.std)
    bar = progress(total=sum(sizes) if None not in sizes else None, desc=f"teacher {s.model} x{aug.views} views",
                   unit="img", disable=s.quiet)
    done, claims, failed = 0, fs.claims(), {}
    try:
        for u in pending:
            if not claims.take(u):
                continue
            try:
                n, why = _unit(fs, u, p, teacher, aug, fill, device, s.batch_size, s.precision, bar)
            finally:
                claims.release(u)
            done += n
            if why:
                failed[p.dataset.shard_name(u)] = why
    finally:
        bar.close()
    if not fs.finalize():
        held = fs.claims().holders()
        raise DistillError(f"the teacher's targets {fs.path} are incomplete: " + "; ".join(
            [f"shard {k} failed: {v}" for k, v in failed.items()] +
            [f"shard {fs.shards[u]} is being made by {w}" for u, w in held.items()]) +
            (f"; {fs.unusable()}" if fs.unusable() else "") + "; run the command again once fixed")
    return Targets(FeatureSet(fs.path), reused=False, images=done, seconds=time.perf_counter() - t0)


def _unit(fs: FeatureSet, unit: int, p: Plan, teacher: torch.nn.Module, aug: Augment, fill: torch.Tensor,
          device: torch.device, batch_size: int, precision: str, bar) -> tuple[int, str | None]:
    """One shard's targets, committed whole; (images the teacher ran on, why the shard failed or None)."""
    parts, records = [], []
    for batch in UnitStream(p.dataset, [unit], [p.preprocess], batch_size=batch_size).read_unit(unit):
        if batch.has_rows:
            images = p.preprocess.normalize(batch.images.to(device))
            got = denoised(teacher, images, batch.keys, aug, fill, precision)
            parts.append(got.cpu().numpy().astype(fs.dtype))  # stored dtype now: half the memory in float16
            records.extend(zip(batch.keys, batch.labels, batch.views))
            bar.update(len(batch.keys))
        if not batch.end:
            continue
        why = batch.shard_error or changed(batch.shard, p.shards[unit])
        if why:
            log.error("shard %s failed: %s", p.dataset.shard_name(unit), why)
            fs.fail_unit(unit, why)
            return len(records), why
        for key, reason in batch.errors:
            log.warning("skipped %s in %s: %s", key, p.dataset.shard_name(unit), reason)
        tokens = np.concatenate(parts) if parts else np.zeros((0, *p.layout.shape("tokens")), fs.dtype)
        fs.commit_unit(unit, {"tokens": tokens}, records, batch.errors, asdict(batch.shard))
    return len(records), None

