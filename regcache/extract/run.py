"""Stage 1: stream a dataset through a frozen ViT once and store every token feature.

data (workers decode shard by shard) -> tokens (one forward pass) -> store (a writer thread
commits whole units). Re-running skips committed units; a feature set that already holds the
features asked for is reused without any backbone work. What a run makes is planned first
(`regcache.identity.plan`), from the settings alone: the data are checked before the model loads.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..data import Dataset, MissingShards, ShardId, count_samples, load_dataset, local_path, shard_ids
from ..identity import Plan, plan, weights
from ..models import load_model, resolve_device, resolve_name
from ..registers import attach
from ..settings import PER_MODEL, ExtractSettings
from ..store import FeatureSet, StoreError, feature_set_path, find_reusable, list_feature_sets
from ..store.meta import Description
from ..tokens import layout_of
from .passes import Member, run_pass
from .stream import check_pipes

log = logging.getLogger("regcache")

FALLBACK_UNIT_ROWS = 10_000


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
    units_adopted: int = 0       # committed units copied from another set of the same shards (`adopt_units`)
    seconds: float = 0.0         # the whole call
    stream_seconds: float = 0.0  # streaming: first batch to last commit (images/s = rows / this)
    reused: bool = False
    complete: bool = False
    missing_units: int = 0       # units no part has committed yet
    held: dict[int, str] = field(default_factory=dict)  # of those, the ones another live writer holds: host:pid
    one_part: bool = True        # this run was to do every shard (not one of --num-parts, nor a torchrun rank)
    error: str | None = None     # why the set is unusable although every unit is committed


def shard_counts(ds: Dataset) -> list[int | None]:
    """Samples per shard: from the manifest, else from local tar headers (None where unknown)."""
    return list(ds.counts) if ds.counts else [count_samples(u) for u in ds.shards]


def unit_capacity(s: ExtractSettings, counts: list[int | None]) -> int:
    """Rows per unit: given, else the largest shard's samples times the views, else a fallback."""
    if s.unit_rows:
        return s.unit_rows
    known = [c for c in counts if c is not None]
    return max(1, max(known) if known else FALLBACK_UNIT_ROWS) * s.views


def build_meta(p: Plan) -> dict:
    """Everything a new store records besides its identity (counting shard sizes may read tar headers)."""
    import timm
    import zarr

    s, ds = p.settings, p.dataset
    counts = shard_counts(ds)  # for sizing and progress; only declared counts are checked against
    source = s.data if not s.data.endswith((".yaml", ".yml")) else str(Path(s.data).resolve())
    return {
        "features": list(p.features), "layout": p.layout, "dtype": s.dtype,
        "unit_rows": unit_capacity(s, counts), "num_units": len(ds.shards),
        "model": {"name": s.model, "timm_name": p.timm_name, "checkpoint": str(s.checkpoint) if s.checkpoint else None,
                  "test_time_registers": p.registers},
        "dataset": {**ds.description(), "labels": ds.labels, "image": list(ds.image_keys),
                    "shards": [ds.shard_name(u) for u in range(len(ds.shards))], "urls": list(ds.shards),
                    "counts": list(ds.counts) if ds.counts else None, "sizes": counts,
                    "content": p.dataset.content_id(p.shards), "source": source},
        "provenance": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "regcache": __version__, "timm": timm.__version__, "torch": torch.__version__,
                       "zarr": zarr.__version__, "python": platform.python_version(),
                       "host": socket.gethostname(), "command": sys.argv,
                       "settings": s.model_dump(mode="json", exclude_defaults=True)},
    }


def default_workers(device: torch.device) -> int:
    """``min(4, cores)``, or 0 on a CPU-only run with 2 cores or fewer: there the model's forward already uses
    every core, and decode processes would only take turns with it (and torch warns past the core count)."""
    cores = usable_cores()
    return 0 if device.type == "cpu" and cores <= 2 else min(4, cores)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as torch's DataLoader check counts them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def launcher_part(s: ExtractSettings) -> ExtractSettings:
    """Under torchrun (or any launcher that sets RANK/WORLD_SIZE), each rank is one part on its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or s.num_parts != 1:
        return s
    device = s.device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return s.model_copy(update={"part": int(os.environ["RANK"]), "num_parts": world, "device": device,
                                "quiet": s.quiet or os.environ.get("RANK") != "0"})


def check_shards_exist(ds: Dataset) -> None:
    """Local shards that are not there are named before anything is planned or loaded (a set's identity is
    its shards' bytes, so extracting around a missing one would make a set of other data)."""
    missing = [u for u in ds.shards if local_path(u) is not None and not os.path.exists(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MissingShards(f"{ds.name}: {len(missing)} of {len(ds.shards)} shards do not exist: "
                        f"{', '.join(missing[:5])}{more}; check the path (or the ${{VARS}} of the manifest)")


def extract(settings: ExtractSettings) -> ExtractResult:
    """Run stage 1 for one model (see the module docstring); safe to rerun, and to run as disjoint parts."""
    return extract_many([settings])[0]


def extract_many(settings: Sequence[ExtractSettings]) -> list[ExtractResult]:
    """Stage 1 for several models of one dataset in one pass over its shards (`passes.run_pass`): each shard is
    read and decoded once for all of them, and each model writes its own set, the same bytes as its own
    extraction would write. The settings may differ only in `PER_MODEL` fields. A model whose weights do
    not load, or whose forward fails, fails alone: the others' sets are made."""
    t0 = time.perf_counter()
    shared = {k: v for k, v in settings[0] if k not in PER_MODEL}
    for s in settings[1:]:
        other = {k: v for k, v in s if k not in PER_MODEL}
        diff = sorted(k for k in shared if shared[k] != other[k])
        if diff:
            raise ValueError(f"one pass takes one value of {', '.join(diff)} for every model; only "
                             f"{', '.join(PER_MODEL)} may differ")
    if len(settings) > 1 and settings[0].store is not None:
        raise ValueError("--store names one set's directory: give it to a single-model extraction")
    settings = [launcher_part(s) for s in settings]
    s0 = settings[0]
    ds = load_dataset(s0.data, s0.name, s0.labels, s0.role)
    check_pipes(ds, s0.allow_pipe)
    if s0.finalize:
        found = None if s0.store else (shard_ids(ds, Path(s0.cache) / ".digests"), list_feature_sets(s0.cache))
        return [_finalize_only(s, ds, t0, found) for s in settings]
    resolve_device(s0.device)  # an unknown or absent device is refused before any set is made
    for s in settings:
        resolve_name(s.model)  # an unknown name lists the aliases, before any data are read
    check_shards_exist(ds)
    ids = shard_ids(ds, Path(s0.cache) / ".digests")
    description = Description(**ds.description())
    results: list[ExtractResult | None] = [None] * len(settings)
    members: list[Member] = []
    first: dict[str, int] = {}  # fingerprint -> the model of this pass that makes it
    same: dict[int, int] = {}
    plans = [plan(s, ds, ids) for s in settings]  # every model planned before any store is made
    for n, (s, p) in enumerate(zip(settings, plans)):
        if p.fingerprint in first:  # another name of one backbone (an alias and its timm name): one forward
            same[n] = first[p.fingerprint]
            log.info("%s makes the same set as %s (the same identity): extracted once", s.model,
                     settings[same[n]].model)
            continue
        first[p.fingerprint] = n
        reuse = find_reusable(s.cache, p.identity) if s.store is None else None
        if reuse is not None:
            verify_shards(reuse, ds, ids)
            reuse.add_name(description)
            log.info("cached: %s already holds %s for %s on %s; no backbone work",
                     reuse.path, ",".join(reuse.features), s.model, ds.name)
            results[n] = ExtractResult(path=reuse.path, fingerprint=reuse.fingerprint, ok=len(reuse.index),
                                       failed=len(reuse.errors), reused=True, complete=True,
                                       units_skipped=reuse.num_units)
            continue
        member = _prepare(p, ids, description)
        results[n] = member.result
        if member.pending:
            members.append(member)
    if members:
        _load(members)
        t = time.perf_counter()
        live = [m for m in members if not m.failed]
        if live:
            device = resolve_device(s0.device)
            workers = s0.workers if s0.workers is not None else default_workers(device)
            if s0.workers is None:
                log.info("%d decode workers (default for %d cores on %s; --workers N to choose)", workers,
                         usable_cores(), device.type)
            for m in live:
                m.model = m.model.to(device)
            t = time.perf_counter()  # the stream: first batch read to last unit committed (images/s = rows / this)
            run_pass(live, ids, device, s0.batch_size, workers, s0.allow_pipe, s0.compile, progress=not s0.quiet,
                     handler=s0.handler)
        for m in members:
            m.result.stream_seconds = time.perf_counter() - t
    for n in first.values():
        if not results[n].reused and not _discarded(results[n]):
            _conclude(FeatureSet(results[n].path), results[n])
        results[n].seconds = time.perf_counter() - t0
    for n, m in same.items():
        results[n] = results[m]
    return results


def _discarded(result: ExtractResult) -> bool:
    """A set whose model failed before anything was written into it is removed (`discard_if_empty`), so that no
    empty set is listed, or offered as one of the model's sets."""
    if result.error is None or result.units_done or not result.path.is_dir():
        return False
    return FeatureSet(result.path).discard_if_empty()


def _prepare(p: Plan, ids: list[ShardId], description: Description) -> Member:
    """A model's store (created, or opened to resume), checked against the shards, with its pending units after
    taking those an earlier set of the same shards holds (`adopt_units`)."""
    s, ds = p.settings, p.dataset
    path = Path(s.store) if s.store else feature_set_path(s.cache, ds.name, s.model, p.fingerprint)
    fs = FeatureSet.create(path, p.identity, lambda: build_meta(p))
    fs.add_name(description)
    verify_shards(fs, ds, ids)
    for tmp in fs.remove_stale_temporaries():
        log.info("removed %s, left by a killed writer", tmp)
    if s.unit_rows and s.unit_rows != fs.unit_rows:
        log.warning("%s exists with %d rows per unit; --unit-rows %d applies to new stores only (remove it to change)",
                    fs.path, fs.unit_rows, s.unit_rows)
    mine = [u for u in range(len(ds.shards)) if u % s.num_parts == s.part]
    done = fs.committed_units()
    pending = [u for u in mine if u not in done]
    result = ExtractResult(path=fs.path, fingerprint=p.fingerprint, units_skipped=len(mine) - len(pending),
                           one_part=s.num_parts == 1)
    adopted = adopt_units(fs, pending, ids, s.cache) if pending else []
    pending = [u for u in pending if u not in adopted]
    result.units_adopted = len(adopted)
    if pending:
        sizes = [fs.meta.dataset.sizes[u] for u in pending]
        work = (f"{sum(sizes):,} images × {p.preprocess.views} view{'s' if p.preprocess.views > 1 else ''}"
                if None not in sizes else "images of unknown count")
        log.info("%s", describe_plan(p))
        log.info("extracting %d of %d shards of %s (%s) with %s into %s (%d already committed%s)",
                 len(pending), len(ds.shards), ds.name, work, s.model, fs.path, result.units_skipped,
                 f", {len(adopted)} taken from an earlier set of the same shards" if adopted else "")
    else:
        log.info("all %d shards of this part are committed in %s; no backbone work", len(mine), fs.path)
    return Member(p, fs, result, pending)


def _load(members: list[Member]) -> None:
    """Each member's weights (with its test-time registers), checked against its planned layout; a member whose
    weights do not load is failed alone."""
    for m in members:
        p = m.plan
        try:
            model = load_model(p.settings, p.preprocess.size, p.checkpoint)
            if p.registers:

                attach(model, p.registers, weights(p.identity))
            if layout_of(model) != p.layout:
                raise StoreError(f"{p.settings.model}: the loaded model's token layout {layout_of(model)} differs from "
                                 f"the planned {p.layout}; please report this (timm {__import__('timm').__version__})")
        except (ValueError, RuntimeError, OSError) as e:
            if len(members) == 1:
                m.fs.discard_if_empty()
                raise
            m.failed = m.result.error = f"{type(e).__name__}: {e}"
            log.error("%s: cannot load it, the other models go on: %s", p.settings.model, e)
            continue
        m.model = model


def adopt_units(fs: FeatureSet, pending: list[int], ids: list[ShardId], cache: Path) -> list[int]:
    """Units of ``fs`` whose rows another set already holds: one whose identity differs only in its data (one
    shard repaired, replaced or added since) with the same image and label members and unit size, that
    committed the same unit from the same shard bytes. Their files are copied, so a repaired shard costs
    that shard's forward pass, not the whole set's."""
    def rest(identity: dict) -> dict:  # all but the data, and the schema it was derived under
        return {k: v for k, v in identity.items() if k not in ("data", "schema")}

    d = fs.meta.dataset
    siblings = [o for o in list_feature_sets(cache)
                if o.path != fs.path and rest(o.identity) == rest(fs.identity)
                and (o.unit_rows, o.num_units, o.meta.dataset.labels, o.meta.dataset.image)
                == (fs.unit_rows, fs.num_units, d.labels, d.image)
                and all(_layout(o, f) == _layout(fs, f) for f in fs.features)]
    claims, adopted = fs.claims(), []
    for u in pending:
        source = next((o for o in siblings if u in o.committed_units() and _read_from(o, u) == ids[u].digest
                       and _whole(o, u)), None)
        if source is None or not claims.take(u):
            continue
        try:
            fs.adopt_unit(source, u)
            adopted.append(u)
            log.info("shard %s: its rows taken from %s (same shard bytes, same settings)", fs.shards[u], source.path)
        finally:
            claims.release(u)
    return adopted


def _whole(fs: FeatureSet, unit: int) -> bool:
    """Whether a unit is whole (every byte checked): a damaged unit is never copied into another set."""
    damage = fs.unit_damage(unit)
    if damage is not None:
        log.warning("not taking shard %s from %s: %s", fs.shards[unit], fs.path, damage)
    return damage is None


def _layout(fs: FeatureSet, feature: str) -> dict:
    """How a feature's chunk files are laid out (its zarr.json but the description): files copy between equal ones."""
    return {k: v for k, v in fs._zarr_json(feature).items() if k != "attributes"}


def _read_from(fs: FeatureSet, unit: int) -> str | None:
    """``sha256:HEX`` of the shard bytes a committed unit was read from (older units recorded it as ``sha256``)."""
    shard = fs.unit_shard(unit) or {}
    digest = shard.get("digest")
    if digest and str(digest).startswith("sha256:"):
        return digest
    return f"sha256:{shard['sha256']}" if shard.get("sha256") else None


def describe_plan(p: Plan) -> str:
    """What is about to run, in one line: the model as resolved, the preprocessing, the features."""
    pre = p.preprocess
    return (f"{p.settings.model} ({p.timm_name}{', checkpoint ' + str(p.settings.checkpoint) if p.settings.checkpoint else ''}"
            f"{', random init ' + str(p.settings.random_init) if p.settings.random_init is not None else ''}) on "
            f"{p.dataset.name}: {pre.size} px crop ({pre.crop_mode}, resize {pre.resize}, {pre.interpolation}"
            f"{', decoded on the device: ' + pre.decode.split(':')[1] if pre.decode != 'pil' else ''}), "
            f"{p.settings.precision}, {pre.views} view{'s' if pre.views > 1 else ''} per image; "
            f"features {','.join(p.features)}")


def _conclude(fs: FeatureSet, result: ExtractResult) -> ExtractResult:
    """Finalize if every unit is in, and count what the store holds now (other parts may have committed).

    The claims are read before the committed units, as a writer commits a unit before it releases its
    claim: every unit missing then was held by a live writer, or by none (never "missing, held by none"
    for a unit that landed in between)."""
    held = fs.claims().holders()
    committed = FeatureSet(fs.path).committed_units()
    result.complete = fs.finalize()
    stored = FeatureSet(fs.path)
    result.ok, result.failed = len(stored.index), len(stored.errors)
    result.missing_units = 0 if result.complete else stored.num_units - len(committed)
    result.held = {} if result.complete else {u: who for u, who in held.items() if u not in committed}
    result.error = result.error or stored.unusable()
    return result


def _finalize_only(s: ExtractSettings, ds: Dataset, t0: float,
                   cached: tuple[list[ShardId], list[FeatureSet]] | None) -> ExtractResult:
    """``--finalize``: find the set these settings make, by its identity (`plan` loads no weights), among
    ``cached`` (the shards' ids and the sets under the cache), and finalize it; or the set ``--store`` names."""
    if s.store is not None:
        fs = FeatureSet(s.store)
    else:
        ids, sets = cached
        fingerprint = plan(s, ds, ids).fingerprint
        found = [f for f in sets if f.fingerprint == fingerprint]
        if not found:
            raise StoreError(f"no feature set of {ds.name} for {s.model} with these settings (fingerprint "
                             f"{fingerprint[:12]}) under {s.cache}: give --finalize the options the parts ran "
                             "with, or name the set with --store")
        fs = found[0]
    result = _conclude(fs, ExtractResult(path=fs.path, fingerprint=fs.fingerprint))
    result.seconds = time.perf_counter() - t0
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


