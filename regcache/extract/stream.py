"""Shards to batches: the extraction's input stream, one unit (shard) at a time."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..data import (DATA_ERRORS, DataError, Dataset, SampleError, ShardId, check_resize, decode_image, decode_label, local_path,
                    open_shard)
from .device import Encoded, device_item

# --------------------------------------------------------------------------- streaming

@dataclass(frozen=True)
class ShardRead(ShardId):
    """What a shard held as the extraction read it: the sha256 of every byte read (hashed on the way, no second
    read), as ``digest`` (``sha256:HEX``, compared with the digest the set's identity was planned from) and as
    ``sha256`` (HEX, which `regcache verify` recomputes from the file); remote shards have no ``digest``."""

    sha256: str | None = None


class _Counted:
    """A sha256 that also counts the bytes it was fed (the shard's size as read)."""

    def __init__(self):
        self.hash, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)

    def read(self, url: str) -> "ShardRead":
        hexdigest = self.hash.hexdigest()
        local = local_path(url)
        if local is None:
            return ShardRead(url, None, self.size, None, hexdigest)
        return ShardRead(url, os.path.realpath(local), self.size, "sha256:" + hexdigest, hexdigest)


@dataclass
class Batch:
    """Up to ``batch_size`` rows of one unit (shard) in one crop ``group``; ``end`` closes the unit for that group
    with its accounting. ``members`` are the models (by index) whose stores claimed the unit."""

    unit: int
    group: int = 0
    members: tuple[int, ...] = ()
    images: torch.Tensor | None = None
    encoded: Encoded | None = None         # instead of images, for a crop group that decodes on the device
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    views: list[int] = field(default_factory=list)
    end: bool = False
    samples: int = 0                       # on `end`: samples read from the shard
    errors: list[tuple[str, str]] = field(default_factory=list)  # on `end`: (key, reason), in sample order
    shard_error: str | None = None         # on `end`: the shard failed as a whole
    shard: ShardRead | None = None         # on `end`: what the shard held as it was read (when read whole)
    skipped: bool = False                  # on `end`: committed or claimed by other writers, for every model

    @property
    def has_rows(self) -> bool:
        return self.images is not None or self.encoded is not None

    def pin_memory(self) -> "Batch":
        return replace(self, images=self.images.pin_memory()) if self.images is not None else self


def check_pipes(ds: Dataset, allow_pipe: bool) -> None:
    """'pipe:' URLs run shell commands: refused unless the user asked for them."""
    pipes = [u for u in ds.shards if u.startswith("pipe:")]
    if pipes and not allow_pipe:
        raise DataError(f"{ds.name}: {pipes[0]!r} runs a shell command; pass --allow-pipe to permit 'pipe:' URLs")


class UnitStream(torch.utils.data.IterableDataset):
    """Streams the given units (shard indices) split across DataLoader workers, shard by shard.

    Each sample is read and decoded once; every crop group (``transforms``: one per distinct crop among the
    models of a pass, `Preprocess`) makes its own views of it, batched apart, so that each model sees
    exactly the rows and batches it would see alone. ``claim(unit)`` returns the members that take the unit.
    """

    def __init__(self, ds: Dataset, units: Sequence[int], transforms: Sequence[Callable[..., torch.Tensor]],
                 views: int = 1, batch_size: int = 64, allow_pipe: bool = False,
                 claim: Callable[[int], tuple[int, ...]] | None = None, handler: str = "record"):
        self.ds, self.units, self.transforms, self.claim = ds, list(units), list(transforms), claim
        self.views, self.batch_size, self.allow_pipe, self.handler = views, batch_size, allow_pipe, handler

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            yield from self.read_unit(unit)

    def read_unit(self, unit: int) -> Iterator[Batch]:
        """The batches of one unit, per crop group; one end batch marked ``skipped`` if other writers have it."""
        members = self.claim(unit) if self.claim is not None else (0,)
        if not members:
            yield Batch(unit=unit, end=True, skipped=True)
            return
        url, ds, groups = self.ds.shards[unit], self.ds, range(len(self.transforms))
        on_device = [t.decode != "pil" for t in self.transforms]
        rows: list[list[tuple]] = [[] for _ in groups]
        errors: list[list[tuple[str, str]]] = [[] for _ in groups]
        seen: set[str] = set()
        n = 0
        full = _Counted()  # what the shard holds as it is read, checked against the set's identity
        try:
            for sample in open_shard(url, self.allow_pipe, sha256=full):
                key = sample["__key__"]
                n += 1
                if key in seen:
                    for g in groups:
                        errors[g].append((key, "duplicate key in shard"))
                    continue
                seen.add(key)
                img = label = None
                if not all(on_device):  # PIL decodes once for the groups that crop with it
                    img = _attempt(decode_image, sample, ds.image_keys)
                label = _attempt(decode_label, sample, ds)
                for g, transform in enumerate(self.transforms):
                    try:  # a crop group may refuse what another takes (a decoder's verdict, a resize limit)
                        if on_device[g]:  # the worker's verdict on the image, then the label's (the device's
                            # on a JPEG only it finds broken comes later, so a bad label is named first then)
                            item = device_item(sample, ds.image_keys, transform.resize)
                            rows[g].append((key, _result(label), 0, item))
                        else:
                            pixels, y = _result(img), _result(label)
                            check_resize(pixels, transform.resize)
                            rows[g].extend((key, y, v, transform(pixels, v, key)) for v in range(self.views))
                    except SampleError as e:
                        if self.handler == "reraise":
                            raise
                        errors[g].append((key, str(e)))
                    while len(rows[g]) >= self.batch_size:
                        yield self._batch(unit, g, members, rows[g][: self.batch_size], on_device[g])
                        rows[g] = rows[g][self.batch_size:]
            expected = ds.counts[unit] if ds.counts else None  # known counts catch a cut at a file boundary
            if expected is not None and n != expected:
                raise DataError(f"expected {expected} samples, read {n} (truncated or changed shard?)")
        except DATA_ERRORS as e:  # the shard as a whole: missing, truncated, unreadable
            if self.handler == "reraise":
                raise
            # webdataset appends the stream and URL to args; the first is the message
            why = f"{type(e).__name__}: {e.args[0] if e.args else e}"
            for g in groups:
                yield Batch(unit=unit, group=g, members=members, end=True, samples=n, shard_error=why)
            return
        read = full.read(url)
        for g in groups:
            if rows[g]:
                yield self._batch(unit, g, members, rows[g], on_device[g])
            yield Batch(unit=unit, group=g, members=members, end=True, samples=n, errors=errors[g], shard=read)

    @staticmethod
    def _batch(unit: int, group: int, members: tuple[int, ...], rows: list, encoded: bool) -> Batch:
        keys, labels, views, images = zip(*rows)
        pixels = {"encoded": Encoded.pack(images)} if encoded else {"images": torch.stack(images)}
        return Batch(unit=unit, group=group, members=members, keys=list(keys), labels=list(labels),
                     views=list(views), **pixels)


def _attempt(f, *args):
    """``f(*args)``, or the SampleError it raised, to be raised later where it applies (`_result`)."""
    try:
        return f(*args)
    except SampleError as e:
        return e


def _result(value):
    if isinstance(value, SampleError):
        raise value
    return value
