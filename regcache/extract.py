"""Stage 1: stream a dataset through a frozen ViT once and store every token feature.

data (workers decode shard by shard) -> tokens (one forward pass) -> store (a writer thread
commits whole units). Re-running skips committed units; a feature set that already holds the
features asked for is reused without any backbone work.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import Dataset, ShardId, UnitStream, check_pipes, count_samples, load_dataset, shard_ids
from .features import TokenLayout, select_features, with_layers
from .models import ModelSpec, Preprocess, load_model, preprocess_for, state_dict_digest
from .store import SCHEMA_VERSION, FeatureSet, StoreError, feature_set_path, find_reusable, fingerprint
from .tokens import layout_of, token_features

log = logging.getLogger("regcache")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = ("float16", "float32")
FALLBACK_UNIT_ROWS = 10_000


def default_cache_root() -> Path:
    return Path(os.environ.get("REGCACHE_CACHE", Path.home() / ".cache" / "regcache"))


@dataclass
class ExtractConfig:
    """Everything `extract` needs; the CLI fills it from flags."""

    model: str
    data: str
    name: str | None = None  # dataset name for a plain shard pattern (default: its folder's name)
    labels: str | None = None  # a plain pattern's labels: cls, json:FIELD or none (default: detected)
    role: str | None = None    # a plain pattern's role (anomaly: unlabelled)
    features: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None  # also store the LAYER_FEATURES of these blocks, as NAME@-k
    test_time_registers: str | None = None  # FILE[:K] from `regcache registers find` (regcache.registers)
    test_time_patches: str = "zero"  # registers.PATCH_MODES
    cache: Path = field(default_factory=default_cache_root)
    store: Path | None = None
    checkpoint: str | None = None
    random_init: int | None = None  # seed of timm's random weights (smoke tests; the probe refuses them)
    model_kwargs: dict = field(default_factory=dict)
    preprocess: Preprocess | None = None  # None: the model's own eval transform (models.preprocess_for)
    pos_embed: str = "timm"  # position-table resampling, models.POS_EMBED
    precision: str = "fp32"
    dtype: str = "float16"
    batch_size: int = 64
    workers: int | None = None  # DataLoader decode workers; None: default_workers(device)
    device: str = "auto"
    part: int = 0
    num_parts: int = 1
    unit_rows: int | None = None
    allow_pipe: bool = False
    compile: bool = False
    finalize_only: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if not 0 <= self.part < self.num_parts:
            raise ValueError(f"part {self.part} is not in 0..{self.num_parts - 1}")
        if self.preprocess is None:
            self.preprocess = preprocess_for(self.model)


@dataclass
class ExtractResult:
    """What a run did: the store, its counts, and what failed (a non-empty ``failed_shards`` means exit 1)."""

    path: Path
    fingerprint: str
    ok: int = 0      # rows in the store (all parts), after this run
    failed: int = 0  # samples in its errors table
    failed_shards: dict[str, str] = field(default_factory=dict)
    units_done: int = 0
    units_skipped: int = 0
    seconds: float = 0.0         # the whole call
    stream_seconds: float = 0.0  # streaming: first batch to last commit (images/s = rows / this)
    reused: bool = False
    complete: bool = False
    missing_units: int = 0       # units no part has committed yet
    error: str | None = None     # why the set is unusable although every unit is committed


def identity_of(spec: ModelSpec, digest: str, cfg: ExtractConfig, ds: Dataset, features: tuple[str, ...],
                registers: dict | None = None) -> dict:
    """What determines the content of a feature set; its hash names the store.

    The data part is the dataset's description; what each shard held is recorded with its unit
    and checked (`verify_shards`) before any committed unit is reused or resumed. ``registers``:
    the test-time registers (`attach_registers`), by content: the neuron file's digest, not its path.
    """
    return {"schema": SCHEMA_VERSION, "model": spec.timm_name, "model_kwargs": spec.kwargs, "weights": digest,
            "pos_embed": spec.pos_embed,
            "preprocess": cfg.preprocess.to_dict(), "precision": cfg.precision, "dtype": cfg.dtype,
            "features": sorted(features), "dataset": ds.digest,
            **({"random_init": spec.random_init} if spec.random_init is not None else {}),
            **({"test_time_registers": {k: registers[k] for k in ("digest", "registers", "patches")}}
               if registers else {})}


def shard_counts(ds: Dataset) -> list[int | None]:
    """Samples per shard: from the manifest, else from local tar headers (None where unknown)."""
    return list(ds.counts) if ds.counts else [count_samples(u) for u in ds.shards]


def unit_capacity(cfg: ExtractConfig, counts: list[int | None]) -> int:
    """Rows per unit: given, else the largest shard's samples times the views, else a fallback."""
    if cfg.unit_rows:
        return cfg.unit_rows
    known = [c for c in counts if c is not None]
    return max(1, max(known) if known else FALLBACK_UNIT_ROWS) * cfg.preprocess.views


def build_meta(cfg: ExtractConfig, spec: ModelSpec, digest: str, ds: Dataset, layout: TokenLayout,
               features: tuple[str, ...], registers: dict | None = None) -> dict:
    """Everything a new store records besides its identity (counting shard sizes may read tar headers)."""
    import timm
    import zarr

    counts = shard_counts(ds)  # for sizing and progress; only declared counts are checked against
    return {
        "schema_version": SCHEMA_VERSION, "features": list(features), "layout": layout.to_dict(), "dtype": cfg.dtype,
        "unit_rows": unit_capacity(cfg, counts), "num_units": len(ds.shards),
        "model": {"name": cfg.model, "timm_name": spec.timm_name, "checkpoint": cfg.checkpoint,
                  "random_init": spec.random_init,
                  "weights_digest": digest, "kwargs": spec.kwargs, "pos_embed": spec.pos_embed,
                  **({"test_time_registers": registers} if registers else {})},
        "preprocess": cfg.preprocess.to_dict(), "precision": cfg.precision,
        "dataset": {"name": ds.name, "digest": ds.digest, "shards": [ds.shard_name(u) for u in range(len(ds.shards))],
                    "urls": list(ds.shards), "counts": list(ds.counts) if ds.counts else None, "sizes": counts,
                    "labels": ds.label_key and (
                        f"json:{ds.label_field}" if ds.label_field else ds.label_key),
                    "role": ds.role, "split": ds.split, "classes": list(ds.classes) if ds.classes else None,
                    "subset": list(ds.subset) if ds.subset else None},
        "provenance": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "regcache": __version__, "timm": timm.__version__, "torch": torch.__version__,
                       "zarr": zarr.__version__, "python": platform.python_version(),
                       "host": socket.gethostname(), "command": sys.argv},
    }


def default_workers(device: torch.device) -> int:
    """``min(4, cores)``, or 0 on a CPU-only run with 2 cores or fewer: there the model's forward already uses
    every core, and decode processes would only take turns with it (and torch warns past the core count)."""
    cores = usable_cores()
    return 0 if device.type == "cpu" and cores <= 2 else min(4, cores)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as torch's DataLoader check counts them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _UnitBuffer:
    """The rows of one unit as they arrive, until the unit is complete."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.records, self.rows = limit, [], [], 0  # rows: all that arrived

    @property
    def overflow(self) -> bool:
        return self.rows > self.limit

    def add(self, feats: dict[str, np.ndarray], keys, labels, views) -> None:
        self.parts.append(feats)
        self.records.extend(zip(keys, labels, views))

    def arrays(self, layout: TokenLayout, names) -> dict[str, np.ndarray]:
        return {n: np.concatenate([p[n] for p in self.parts]) if self.parts else np.zeros((0, *layout.shape(n)))
                for n in names}


def launcher_part(cfg: ExtractConfig) -> ExtractConfig:
    """Under torchrun (or any launcher that sets RANK/WORLD_SIZE), each rank is one part on its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or cfg.num_parts != 1:
        return cfg
    device = cfg.device
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return replace(cfg, part=int(os.environ["RANK"]), num_parts=world, device=device,
                   progress=cfg.progress and os.environ.get("RANK") == "0")


class _Forward:
    """The model's forward in chunks that halve when the accelerator runs out of memory (and say so)."""

    def __init__(self, model, layout: TokenLayout, features: tuple[str, ...], chunk: int, compile: bool = False):
        self.model, self.layout, self.features, self.chunk = model, layout, features, chunk
        if compile:
            model.forward_intermediates = torch.compile(model.forward_intermediates)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        while True:
            try:
                outs = [token_features(self.model, part, self.layout, self.features)
                        for part in images.split(self.chunk)]
                return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
            except torch.OutOfMemoryError:
                if self.chunk == 1:
                    raise
                self.chunk = max(1, self.chunk // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("out of accelerator memory: the forward pass now runs in chunks of %d images "
                            "(pass --batch-size %d to start there)", self.chunk, self.chunk)


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run stage 1 (see the module docstring); safe to rerun, and to run as several disjoint parts."""
    t0 = time.perf_counter()
    cfg = launcher_part(cfg)
    ds = load_dataset(cfg.data, cfg.name, cfg.labels, cfg.role)
    check_pipes(ds, cfg.allow_pipe)
    if cfg.finalize_only:
        return _finalize_only(cfg, ds, t0)
    ids = shard_ids(ds)
    spec = ModelSpec(cfg.model, cfg.checkpoint, cfg.model_kwargs, cfg.pos_embed, cfg.random_init)
    model = load_model(spec, cfg.preprocess.size)
    digest = state_dict_digest(model)
    registers = attach_registers(cfg, model, spec, digest)
    layout = layout_of(model)
    features = select_features(cfg.features, layout)
    if cfg.layers:
        features = with_layers(features, cfg.layers, layout.depth)
    identity = identity_of(spec, digest, cfg, ds, features, registers)
    fp = fingerprint(identity)

    if cfg.store is None:
        reuse = find_reusable(cfg.cache, identity)
        if reuse is not None:
            verify_shards(reuse, ds, ids)
            log.info("cached: %s already holds %s for %s on %s; no backbone work",
                     reuse.path, ",".join(reuse.features), cfg.model, ds.name)
            return ExtractResult(path=reuse.path, fingerprint=reuse.fingerprint, ok=len(reuse.index),
                                 failed=len(reuse.errors), reused=True, complete=True,
                                 units_skipped=reuse.num_units, seconds=time.perf_counter() - t0)
    path = Path(cfg.store) if cfg.store else feature_set_path(cfg.cache, ds.name, cfg.model, fp)
    fs = FeatureSet.create(path, identity, lambda: build_meta(cfg, spec, digest, ds, layout, features, registers))
    verify_shards(fs, ds, ids)
    for tmp in fs.remove_stale_temporaries():
        log.info("removed %s, left by a killed writer", tmp)
    if cfg.unit_rows and cfg.unit_rows != fs.unit_rows:
        log.warning("%s exists with %d rows per unit; --unit-rows %d applies to new stores only (remove it to change)",
                    fs.path, fs.unit_rows, cfg.unit_rows)

    mine = [u for u in range(len(ds.shards)) if u % cfg.num_parts == cfg.part]
    done = fs.committed_units()
    pending = [u for u in mine if u not in done]
    result = ExtractResult(path=fs.path, fingerprint=fp, units_skipped=len(mine) - len(pending))
    if pending:
        log.info("extracting %d of %d shards of %s with %s into %s (%d already committed)",
                 len(pending), len(ds.shards), ds.name, cfg.model, fs.path, result.units_skipped)
        t = time.perf_counter()
        _run(cfg, model, layout, features, ds, fs, pending, result, ids)
        result.stream_seconds = time.perf_counter() - t
    else:
        log.info("all %d shards of this part are committed in %s; no backbone work", len(mine), fs.path)
    return _conclude(fs, result, t0)


def attach_registers(cfg: ExtractConfig, model: torch.nn.Module, spec: ModelSpec, digest: str) -> dict | None:
    """Install ``cfg.test_time_registers`` on ``model``; what identifies them (file digest, K, settings)."""
    if cfg.test_time_registers is None:
        return None
    from .registers import attach

    return attach(model, spec.timm_name, cfg.test_time_registers, cfg.test_time_patches, digest)


def _conclude(fs: FeatureSet, result: ExtractResult, t0: float) -> ExtractResult:
    """Finalize if every unit is in, and count what the store holds now (other parts may have committed)."""
    result.complete = fs.finalize()
    stored = FeatureSet(fs.path)
    result.ok, result.failed = len(stored.index), len(stored.errors)
    result.missing_units = stored.num_units - len(stored.committed_units())
    result.error = stored.unusable()
    result.seconds = time.perf_counter() - t0
    return result


def _finalize_only(cfg: ExtractConfig, ds: Dataset, t0: float) -> ExtractResult:
    """``--finalize``: find the set of this dataset and model without loading the model, and finalize it."""
    from .store import list_feature_sets

    if cfg.store is not None:
        fs = FeatureSet(cfg.store)
    else:
        found = [f for f in list_feature_sets(cfg.cache)
                 if f.meta["dataset"]["name"] == ds.name and f.meta["model"]["name"] == cfg.model]
        pending = [f for f in found if not f.complete] or found
        if len(pending) != 1:
            listing = "".join(f"\n  {f.path}" for f in pending)
            raise StoreError(f"{'no' if not pending else 'several'} feature sets of {ds.name} for {cfg.model} "
                             f"under {cfg.cache}; name one with --store{listing}")
        fs = pending[0]
    result = _conclude(fs, ExtractResult(path=fs.path, fingerprint=fs.fingerprint), t0)
    missing = sorted(set(range(fs.num_units)) - fs.committed_units())
    failed = fs.failed_units()
    result.failed_shards = {fs.shards[u]: failed.get(u, "not committed by any part yet") for u in missing}
    return result


def verify_shards(fs: FeatureSet, ds: Dataset, ids: list[ShardId]) -> None:
    """Refuse to reuse or resume a set whose committed units were read from other bytes than the shards now hold.

    The same manifest text can point at other images (another folder, regenerated shards); the
    path, size and digest recorded with each unit tell. Declared counts, which are left out of the
    identity so that a scan can add them, are checked against what each unit read.
    """
    for unit in sorted(fs.committed_units()):
        was, now = fs.unit_shard(unit), ids[unit]
        if was is not None and was.get("digest") != now.digest:
            raise StoreError(
                f"{now.url} is not the file this cached set read as shard {unit} (then {was.get('path')}, "
                f"{was.get('size')} bytes; now {now.path}, {now.size} bytes): its cached features belong to other "
                f"data. Remove {fs.path} to extract the current shards, or keep both sets apart (--name for a "
                "shard pattern, or --store PATH, or another --cache).")
        declared = ds.counts[unit] if ds.counts else None
        if declared is not None and (got := fs.unit_samples(unit)) != declared:
            raise StoreError(f"{now.url}: the manifest declares {declared} samples but the cached set {fs.path} "
                             f"read {got} from it; fix the counts (regcache manifest scan) or remove the set and "
                             "extract again")


def _run(cfg: ExtractConfig, model, layout: TokenLayout, features: tuple[str, ...], ds: Dataset,
         fs: FeatureSet, pending: list[int], result: ExtractResult, ids: list[ShardId]) -> None:
    from .progress import progress

    device = resolve_device(cfg.device)
    model = model.to(device)
    claims = fs.claims()
    stream = UnitStream(ds, pending, cfg.preprocess, views=cfg.preprocess.views, batch_size=cfg.batch_size,
                        allow_pipe=cfg.allow_pipe, resize=cfg.preprocess.resize, claim=claims.take)
    workers = min(cfg.workers if cfg.workers is not None else default_workers(device), len(pending))
    if cfg.workers is None:
        log.info("%d decode workers (default for %d cores on %s; --workers N to choose)", workers, usable_cores(),
                 device.type)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    autocast = PRECISIONS[cfg.precision]
    store_dtype = fs.dtype
    sizes = fs.meta["dataset"]["sizes"]
    known = [sizes[u] for u in pending if sizes[u] is not None]
    total = sum(known) * cfg.preprocess.views if len(known) == len(pending) else None
    bar = progress(total=total, unit="img" if cfg.preprocess.views == 1 else "view", disable=not cfg.progress,
                   desc=f"{cfg.model} {ds.name}")
    buffers: dict[int, _UnitBuffer] = {}
    writes: list[tuple[int, Future]] = []
    forward = _Forward(model, layout, features, cfg.batch_size, compile=cfg.compile)

    def settle(keep: int) -> None:  # bounded queue between compute and store writes
        while len(writes) > keep:
            unit, fut = writes.pop(0)
            try:
                fut.result()
                result.units_done += 1
            except Exception as e:
                result.failed_shards[ds.shard_name(unit)] = f"{type(e).__name__}: {e}"
                fs.fail_unit(unit, str(e))
            claims.release(unit)

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(30):
            claims.refresh()

    threading.Thread(target=heartbeat, name="regcache-claims", daemon=True).start()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="regcache-writer") as writer:
        for batch in loader:
            if batch.skipped:
                result.units_skipped += 1
                continue
            buf = buffers.setdefault(batch.unit, _UnitBuffer(fs.unit_rows))
            buf.rows += len(batch.keys)
            if batch.images is not None and not buf.overflow:  # past the unit's rows, only count
                images = cfg.preprocess.normalize(batch.images.to(device, non_blocking=True))
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out = forward(images)
                buf.add({k: v.float().cpu().numpy().astype(store_dtype, copy=False) for k, v in out.items()},
                        batch.keys, batch.labels, batch.views)
                bar.update(len(batch.keys))
            if not batch.end:
                continue
            buffers.pop(batch.unit)
            name = ds.shard_name(batch.unit)
            reason = batch.shard_error or _changed(batch.shard, ids[batch.unit]) or (
                f"the shard gives {buf.rows} rows but a unit of this store holds {fs.unit_rows} (fixed when it was "
                f"created); remove {fs.path} and run this command again with --unit-rows {buf.rows} (or the "
                "largest shard's rows)" if buf.overflow else None)
            if reason:
                log.error("shard %s failed: %s", name, reason)
                result.failed_shards[name] = reason
                fs.fail_unit(batch.unit, reason)
                claims.release(batch.unit)
                continue
            for key, why in batch.errors:
                log.warning("skipped %s in %s: %s", key, name, why)
            writes.append((batch.unit, writer.submit(fs.commit_unit, batch.unit, buf.arrays(layout, features),
                                                     buf.records, batch.errors, asdict(batch.shard))))
            settle(keep=2)
        settle(keep=0)
    stop.set()
    bar.close()


def _changed(read: ShardId | None, expected: ShardId) -> str | None:
    """The shard read is not the one this set's identity was computed from (rewritten during the run)."""
    if read is not None and read.digest != expected.digest:
        return (f"{expected.url} changed while this run was reading it (size {expected.size} -> {read.size}); "
                "run the command again to extract the new contents into their own set")
    return None
