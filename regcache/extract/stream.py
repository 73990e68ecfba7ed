"""Shards to batches: the extraction's input stream, one unit (shard) at a time."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from ..data import DataError, Dataset, SampleError, ShardId, check_resize, decode_image, decode_label, open_shard, shard_id

# --------------------------------------------------------------------------- streaming

@dataclass(frozen=True)
class ShardRead(ShardId):
    """What a shard held as the extraction read it: the cheap id taken before, and the sha256 of every byte
    read (hashed on the way, no second read), which `regcache verify` recomputes from the file."""

    sha256: str | None = None


@dataclass
class Batch:
    """Up to ``batch_size`` rows of one unit (shard); ``end`` closes the unit with its accounting."""

    unit: int
    images: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    views: list[int] = field(default_factory=list)
    end: bool = False
    samples: int = 0                       # on `end`: samples read from the shard
    errors: list[tuple[str, str]] = field(default_factory=list)  # on `end`: (key, reason)
    shard_error: str | None = None         # on `end`: the shard failed as a whole
    shard: ShardId | None = None           # on `end`: what the shard held when it was read (a ShardRead if whole)
    skipped: bool = False                  # on `end`: committed or claimed by another writer

    def pin_memory(self) -> "Batch":
        return replace(self, images=self.images.pin_memory()) if self.images is not None else self


def check_pipes(ds: Dataset, allow_pipe: bool) -> None:
    """'pipe:' URLs run shell commands: refused unless the user asked for them."""
    pipes = [u for u in ds.shards if u.startswith("pipe:")]
    if pipes and not allow_pipe:
        raise DataError(f"{ds.name}: {pipes[0]!r} runs a shell command; pass --allow-pipe to permit 'pipe:' URLs")


class UnitStream(torch.utils.data.IterableDataset):
    """Streams the given units (shard indices) split across DataLoader workers, shard by shard.

    ``transform(img, view, key)`` makes one view; each sample gives ``views`` rows.
    """

    def __init__(self, ds: Dataset, units: Sequence[int], transform: Callable[..., torch.Tensor],
                 views: int = 1, batch_size: int = 64, allow_pipe: bool = False, resize: int | None = None,
                 claim: Callable[[int], bool] | None = None):
        self.ds, self.units, self.transform, self.resize, self.claim = ds, list(units), transform, resize, claim
        self.views, self.batch_size, self.allow_pipe = views, batch_size, allow_pipe

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            yield from self.read_unit(unit)

    def read_unit(self, unit: int) -> Iterator[Batch]:
        """The batches of one unit; only an end batch marked ``skipped`` if another writer has it."""
        if self.claim is not None and not self.claim(unit):
            yield Batch(unit=unit, end=True, skipped=True)
            return
        url, ds = self.ds.shards[unit], self.ds
        rows: list[tuple[str, int, int, torch.Tensor]] = []
        errors: list[tuple[str, str]] = []
        seen: set[str] = set()
        n = 0
        sid = shard_id(url)  # what the shard holds as it is read, checked against the set's identity
        full = hashlib.sha256()
        try:
            for sample in open_shard(url, self.allow_pipe, sha256=full):
                key = sample["__key__"]
                n += 1
                try:
                    if key in seen:
                        raise SampleError("duplicate key in shard")
                    seen.add(key)
                    img, label = decode_image(sample, ds.image_keys), decode_label(sample, ds)
                    check_resize(img, self.resize)
                    rows.extend((key, label, v, self.transform(img, v, key)) for v in range(self.views))
                except SampleError as e:
                    errors.append((key, str(e)))
                while len(rows) >= self.batch_size:
                    yield self._batch(unit, rows[: self.batch_size])
                    rows = rows[self.batch_size:]
            expected = ds.counts[unit] if ds.counts else None  # known counts catch a cut at a file boundary
            if expected is not None and n != expected:
                raise DataError(f"expected {expected} samples, read {n} (truncated or changed shard?)")
        except Exception as e:  # the shard as a whole: missing, truncated, unreadable
            # webdataset appends the stream and URL to args; the first is the message
            yield Batch(unit=unit, end=True, samples=n, shard=sid,
                        shard_error=f"{type(e).__name__}: {e.args[0] if e.args else e}")
            return
        if rows:
            yield self._batch(unit, rows)
        yield Batch(unit=unit, end=True, samples=n, errors=errors,
                    shard=ShardRead(**asdict(sid), sha256=full.hexdigest()))

    @staticmethod
    def _batch(unit: int, rows: list) -> Batch:
        keys, labels, views, images = zip(*rows)
        return Batch(unit=unit, images=torch.stack(images), keys=list(keys), labels=list(labels), views=list(views))
