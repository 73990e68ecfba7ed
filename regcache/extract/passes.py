"""One pass over a dataset's shards feeding every model of an extraction.

Each shard is read and decoded once; each crop group (models whose crops match: size, resize, crop
mode, interpolation, views) gets its views made once; the uint8 crops go to the device once per batch
and each model normalises them with its own mean and std there, runs its forward pass, and buffers
its rows until the unit is complete; a writer thread commits each model's unit to its own store.
A model whose forward fails stops alone: the others finish the pass.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import ShardId
from ..features import TokenLayout
from ..identity import Plan
from ..models import Preprocess
from ..progress import progress as progress_bar
from ..store import Claims, FeatureSet, StoreError
from ..tokens import token_features
from .device import DeviceDecodeError, decode_batch
from .stream import Batch, UnitStream

log = logging.getLogger("regcache")

#: autocast dtype per `settings.choices.PRECISIONS` name
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Member:
    """One model of a pass: what it will make (`Plan`), its store, its loaded model, and what it did."""

    plan: Plan
    fs: FeatureSet
    result: Any                          # run.ExtractResult
    pending: list[int]
    model: torch.nn.Module | None = None
    group: int = 0                       # its crop group
    failed: str | None = None            # why it stopped; the others go on
    buffers: dict[int, "_UnitBuffer"] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.plan.settings.model


def crop_key(p: Plan) -> tuple:
    """What the uint8 crop depends on (not the normalisation, done per model on the device)."""
    pre = p.preprocess
    return pre.size, pre.resize, pre.interpolation, pre.crop_mode, pre.views, pre.seed, pre.decode


class _UnitBuffer:
    """The rows of one unit as they arrive, until the unit is complete."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.records, self.rows = limit, [], [], 0  # rows: all that arrived
        self.errors: list[tuple[str, str]] = []  # (key, reason) of samples the device could not decode

    @property
    def overflow(self) -> bool:
        return self.rows > self.limit

    def add(self, feats: Callable[[], dict[str, np.ndarray]], keys, labels, views) -> None:
        self.parts.append(feats)
        self.records.extend(zip(keys, labels, views))

    def arrays(self, layout: TokenLayout, names) -> dict[str, np.ndarray]:
        parts = [p() for p in self.parts]
        return {n: np.concatenate([p[n] for p in parts]) if parts else np.zeros((0, *layout.shape(n)))
                for n in names}


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


def to_host(out: dict[str, torch.Tensor], dtype: np.dtype) -> Callable[[], dict[str, np.ndarray]]:
    """The features in host memory, when they are needed: on a GPU the copies start now, into pinned memory,
    and the next batch computes while they run (the call waits for them); on a CPU they are there."""
    if not any(v.is_cuda for v in out.values()):
        ready = {k: v.float().numpy().astype(dtype, copy=False) for k, v in out.items()}
        return lambda: ready
    host = {k: torch.empty(v.shape, dtype=torch.float32, pin_memory=True) for k, v in out.items()}
    for k, v in out.items():
        host[k].copy_(v.float(), non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> dict[str, np.ndarray]:
        done.synchronize()
        return {k: v.numpy().astype(dtype, copy=False) for k, v in host.items()}
    return wait


@dataclass(frozen=True)
class _Claim:
    """Which members take a unit: those that still need it and win its claim in their own store. Picklable, so
    that DataLoader workers claim as they go (the claim names the process that commits)."""

    claims: tuple[Claims, ...]
    pending: tuple[frozenset[int], ...]

    def __call__(self, unit: int) -> tuple[int, ...]:
        return tuple(i for i, (c, p) in enumerate(zip(self.claims, self.pending)) if unit in p and c.take(unit))


def run_pass(members: Sequence[Member], ids: Sequence[ShardId], device: torch.device, batch_size: int,
             workers: int, allow_pipe: bool, compile: bool, progress: bool, handler: str = "record") -> None:
    """Stream the members' pending units once (see the module doc); each member's result says what it did."""
    ds = members[0].plan.dataset
    keys = list(dict.fromkeys(crop_key(m.plan) for m in members))
    transforms = [next(m.plan.preprocess for m in members if crop_key(m.plan) == k) for k in keys]
    for m in members:
        m.group = keys.index(crop_key(m.plan))
    claims = [m.fs.claims() for m in members]
    units = sorted({u for m in members for u in m.pending})
    stream = UnitStream(ds, units, transforms, views=transforms[0].views, batch_size=batch_size,
                        allow_pipe=allow_pipe, claim=_Claim(tuple(claims), tuple(frozenset(m.pending) for m in members)),
                        handler=handler)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(workers, len(units)),
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         prefetch_factor=4 if workers else None)
    forwards = {i: _Forward(m.model, m.plan.layout, m.plan.features, batch_size, compile=compile)
                for i, m in enumerate(members)}
    sizes = members[0].fs.meta.dataset.sizes
    known = [sizes[u] for u in units if sizes[u] is not None]
    views = transforms[0].views
    bar = progress_bar(total=sum(known) * views if len(known) == len(units) else None,
                       unit="img" if views == 1 else "view", disable=not progress,
                       desc=f"{'+'.join(m.label for m in members)} {ds.name}")
    writes: list[tuple[int, int, Future]] = []

    def settle(keep: int) -> None:  # bounded queue between compute and store writes
        while len(writes) > keep:
            i, unit, fut = writes.pop(0)
            m = members[i]
            try:
                fut.result()
                m.result.units_done += 1
            except (StoreError, OSError) as e:  # the disk, not the data; regcache's own bugs propagate
                m.result.failed_shards[ds.shard_name(unit)] = f"{type(e).__name__}: {e}"
                try:
                    m.fs.fail_unit(unit, str(e))
                except StoreError as again:
                    raise StoreError(f"shard {ds.shard_name(unit)} could not be committed ({e}), nor its failure "
                                     f"recorded: {again}") from again
            finally:
                claims[i].release(unit)

    def stop_member(i: int, error: Exception) -> None:
        if len(members) == 1 or handler == "reraise":
            raise error  # alone, a failure is the run's
        m, why = members[i], f"{type(error).__name__}: {error}"
        m.failed = m.result.error = why
        log.error("%s stopped, the other models go on: %s", m.label, why, exc_info=error)
        for unit in m.buffers:
            claims[i].release(unit)
        m.buffers.clear()

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(30):
            for c in claims:
                c.refresh()

    threading.Thread(target=heartbeat, name="regcache-claims", daemon=True).start()
    try:  # the heartbeat stops however the pass ends, so that its claims can go stale
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="regcache-writer") as writer:
            for batch in loader:
                if batch.skipped:
                    for m in members:
                        m.result.units_skipped += batch.unit in m.pending
                    continue
                fed = [i for i in batch.members if members[i].group == batch.group and not members[i].failed]
                if batch.has_rows and fed:
                    _feed(batch, transforms[batch.group], [(i, members[i], forwards[i]) for i in fed], device,
                          stop_member)
                    if batch.group == min(members[i].group for i in batch.members):
                        bar.update(len(batch.keys))
                elif batch.has_rows:
                    continue
                if batch.end:
                    for i in fed:
                        _close(batch, i, members[i], ids, claims[i], writer, writes)
                    settle(keep=2 * len(members))  # two units per model in flight, as for one model
            settle(keep=0)
    finally:
        stop.set()
        bar.close()
    for i, m in enumerate(members):  # a stopped member's claims, taken as the stream went on, go back
        if m.failed:
            for unit in m.pending:
                claims[i].release(unit)


def _feed(batch: Batch, pre: Preprocess, fed: list[tuple[int, Member, _Forward]], device: torch.device,
          stop_member: Callable[[int, Exception], None]) -> None:
    """One batch of one crop group through every model of that group: the uint8 crops go to the device once
    (or are decoded and cropped there, once)."""
    keys, labels, views = batch.keys, batch.labels, batch.views
    failed: list[tuple[str, str]] = []
    if batch.encoded is None:
        images = batch.images.to(device, non_blocking=True)
    else:
        try:
            images, kept, bad = decode_batch(batch.encoded, pre.crop, device)
        except DeviceDecodeError as e:  # the device, not the data: every model of the group stops
            named = DeviceDecodeError(f"{keys[e.index]} in {fed[0][1].plan.dataset.shard_name(batch.unit)}: {e}",
                                      e.index)
            for i, _, _ in fed:
                stop_member(i, named)
            return
        failed = [(keys[j], why) for j, why in bad]
        keys, labels, views = ([x[j] for j in kept] for x in (keys, labels, views))
    for i, m, forward in fed:
        buf = m.buffers.setdefault(batch.unit, _UnitBuffer(m.fs.unit_rows))
        buf.errors.extend(failed)
        if images is None:
            continue
        buf.rows += len(keys)
        if buf.overflow:  # past the unit's rows, only count
            continue
        autocast = AUTOCAST[m.plan.settings.precision]
        try:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = forward(m.plan.preprocess.normalize(images))
        except RuntimeError as e:  # this model alone: out of memory at a chunk of 1 (torch.OutOfMemoryError is one),
            stop_member(i, e)  # a model that cannot run this input; a bug of regcache's propagates
            continue
        buf.add(to_host(out, m.fs.dtype), keys, labels, views)


def _close(batch: Batch, i: int, m: Member, ids: Sequence[ShardId], claims: Claims, writer: ThreadPoolExecutor,
           writes: list) -> None:
    """A unit's end for one model: commit its rows (on the writer thread), or record why the shard failed."""
    ds, fs = m.plan.dataset, m.fs
    buf = m.buffers.pop(batch.unit, None) or _UnitBuffer(fs.unit_rows)
    name = ds.shard_name(batch.unit)
    reason = batch.shard_error or changed(batch.shard, ids[batch.unit]) or (
        f"the shard gives {buf.rows} rows but a unit of this store holds {fs.unit_rows} (fixed when it was "
        f"created); remove {fs.path} and run this command again with --unit-rows {buf.rows} (or the "
        "largest shard's rows)" if buf.overflow else None)
    if reason:
        log.error("shard %s failed for %s: %s", name, m.label, reason)
        m.result.failed_shards[name] = reason
        fs.fail_unit(batch.unit, reason)
        claims.release(batch.unit)
        return
    errors = batch.errors + buf.errors  # the workers' verdicts, then the device decoder's
    for key, why in errors:
        log.warning("skipped %s in %s: %s", key, name, why)
    arrays = buf.arrays(m.plan.layout, m.plan.features)
    writes.append((i, batch.unit, writer.submit(fs.commit_unit, batch.unit, arrays, buf.records, errors,
                                                asdict(batch.shard))))


def changed(read: ShardId | None, expected: ShardId) -> str | None:
    """The bytes read are not those this set's identity was planned from (the shard was changed since)."""
    if read is not None and expected.digest not in (None, "missing") and read.digest != expected.digest:
        return (f"{expected.url} changed after this run planned it ({expected.size} bytes, {expected.digest[:19]}…; "
                f"read {read.size} bytes, {str(read.digest)[:19]}…): run the command again to extract the new "
                "contents into their own set")
    return None
