"""Writing a feature set: create it, commit units atomically, claim units, finalize the index.

A unit's chunk is written whole (never read-modify-write), then its record is renamed into
place: a unit is visible once complete, and a crash leaves the committed unit or nothing. No two
units share a chunk, so any number of processes may write disjoint units at once; claims let
identical commands share the units instead of each doing all of them.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from ..features import FEATURES
from ..files import HOST, alive, atomic_write, remove_stale
from .meta import ARRAYS, META, NAMES, RECORD_SCHEMA, SCHEMA_VERSION, Description, SetRecord, StoreError, fingerprint, slug
from .tables import parquet_bytes



def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, data, StoreError)


def inner_rows(unit_rows: int, row_bytes: int, max_rows: int = 1024, max_bytes: int = 4 << 20) -> int:
    """Rows per inner chunk: the largest divisor of ``unit_rows`` within both bounds (a shard holds whole
    inner chunks). Small enough that padding costs at most one partly filled chunk per unit."""
    limit = max(1, min(max_rows, max_bytes // max(row_bytes, 1), unit_rows))
    return next(r for r in range(limit, 0, -1) if unit_rows % r == 0)


@dataclass(frozen=True)
class Claims:
    """Exclusive claims on units, so that identical commands on one store share its shards.

    A claim is ``units/UNIT.claim``, created exclusively, naming its owner (host:pid of the
    process that commits). The owner refreshes its claims' mtime (`refresh`, a heartbeat); a claim
    whose owner died on this host, or that has not been refreshed for ``stale_after`` seconds, is
    taken over. Takeover renames the old claim away first, so only one process can win it.
    """

    units: Path
    owner: str = field(default_factory=lambda: f"{HOST}:{os.getpid()}")
    stale_after: float = 600.0

    def _path(self, unit: int) -> Path:
        return self.units / f"{unit:06d}.claim"

    def take(self, unit: int) -> bool:
        """Claim ``unit`` unless it is committed or another live process holds it."""
        path, committed = self._path(unit), self.units / f"{unit:06d}.parquet"
        for _ in range(2):
            if committed.exists():
                return False
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale(path):
                    return False
                gone = path.with_name(f"{path.name}.{self.owner.replace(':', '.')}.stale")
                try:  # one taker wins the rename; the others then find its new claim
                    os.rename(path, gone)
                    gone.unlink()
                except FileNotFoundError:
                    return False
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(self.owner)
            except OSError as e:  # a full disk: no empty claim left behind
                path.unlink(missing_ok=True)
                raise StoreError(f"cannot write {path}: {e.strerror or e}") from e
            if committed.exists():  # committed between the check and the claim
                self.release(unit)
                return False
            return True
        return False

    def _stale(self, path: Path) -> bool:
        try:
            owner, age = path.read_text(), time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        host, _, pid = owner.rpartition(":")
        if host == HOST and pid.isdigit() and not alive(int(pid)):
            return True
        if not pid.isdigit():  # written by no one (its writer died between creating and writing it)
            return age > 10
        return age > self.stale_after

    def holders(self) -> dict[int, str]:
        """Units claimed by live writers (not stale), and who holds each (host:pid)."""
        out = {}
        for path in self.units.glob("*.claim"):
            try:
                if not self._stale(path):
                    out[int(path.stem)] = path.read_text()
            except (FileNotFoundError, ValueError):
                continue
        return out

    def release(self, unit: int) -> None:
        path = self._path(unit)
        try:
            if path.read_text() == self.owner:
                path.unlink()
        except FileNotFoundError:
            pass

    def refresh(self) -> None:
        """Heartbeat: touch every claim this process owns."""
        for path in self.units.glob("*.claim"):
            try:
                if path.read_text() == self.owner:
                    os.utime(path)
            except FileNotFoundError:
                pass


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock for the rare whole-store steps (create, finalise); units need none."""
    with open(path / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class UnitWriter:
    """The writing half of `FeatureSet` (which adds the reading half: paths, layout, records)."""


    @classmethod
    def create(cls, path: str | os.PathLike, identity: dict, meta: dict | Callable[[], dict]) -> "UnitWriter":
        """Create the store, or open it if it exists with the same identity; refuse any other.

        ``meta``: the other fields of its `SetRecord` (layout, sizes, model, dataset, provenance); it may be
        a function, called only when the store is new, so that writers joining an existing store skip its costs.
        """
        path = Path(path)
        identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
        fp = fingerprint(identity)
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if (path / META).is_file():
                old = SetRecord.open(path)
                if old.fingerprint != fp:
                    diff = sorted(k for k in set(old.identity) | set(identity)
                                  if old.identity.get(k) != identity.get(k))
                    raise StoreError(f"{path} holds a different feature set (fingerprint {old.fingerprint[:12]}, "
                                     f"asked {fp[:12]}; differs in: {', '.join(diff)}); "
                                     "refusing to mix them. Use another cache root or --store path.")
                return cls(path)
            record = SetRecord.model_validate({**(meta() if callable(meta) else meta), "schema_version": SCHEMA_VERSION,
                                               "fingerprint": fp, "identity": identity})
            try:
                cls._create_arrays(path, record)
                (path / "units").mkdir(exist_ok=True)
                _atomic_write(path / META, record.to_json())
            except (OSError, StoreError):  # a full disk: no half-made set is left (only its folder and lock file)
                for p in path.iterdir():
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    elif p.name != ".lock":
                        p.unlink(missing_ok=True)
                raise
        return cls(path)

    @staticmethod
    def _create_arrays(path: Path, record: SetRecord) -> None:
        """One Zarr shard per unit, of uncompressed inner chunks each followed by its crc32c (the shard index
        has its own): float16 features compress by 9% at most, so a codec only costs read speed, while a
        checksum makes a flipped bit an error instead of a wrong number. Inner chunks that are all padding
        are not stored."""
        import zarr
        from zarr.codecs import Crc32cCodec

        rows, total = record.unit_rows, record.unit_rows * record.num_units
        group = zarr.open_group(path / ARRAYS, mode="a", zarr_format=3)
        for name in record.features:
            shape = record.layout.shape(name)
            inner = inner_rows(rows, int(np.prod(shape)) * np.dtype(record.dtype).itemsize)
            group.create_array(name, shape=(total, *shape), shards=(rows, *shape), chunks=(inner, *shape),
                               dtype=record.dtype, fill_value=0, compressors=Crc32cCodec(), overwrite=True,
                               attributes={"description": FEATURES[name].description})

    def add_name(self, description: Description) -> None:
        """Record another description of the same rows (another manifest's name, split or classes for the same
        shards): the set is then found, and read with that meaning, under that name too."""
        if self.names().get(description.name) == description:
            return
        folder = self.path / NAMES
        folder.mkdir(exist_ok=True)
        digest = hashlib.sha256(description.name.encode()).hexdigest()[:8]  # "my data" and "my_data" apart
        for old in folder.glob("*.json"):  # this name's earlier file (older sets: named by the slug alone)
            if old.name != f"{slug(description.name)}-{digest}.json" and \
                    Description.read(old, "dataset description").name == description.name:
                old.unlink(missing_ok=True)
        _atomic_write(folder / f"{slug(description.name)}-{digest}.json", description.to_json())

    def commit_unit(self, unit: int, arrays: dict[str, np.ndarray], records: Sequence[tuple[str, int, int]],
                    errors: Sequence[tuple[str, str]] = (), shard: dict | None = None) -> None:
        """Write one unit's rows (``records`` = (key, label, view) in row order) and commit it atomically.

        ``shard`` (path, size, digests of the input shard as read) is kept with the unit's record, and so
        are the unit's files with their sizes (None: not written, every row the fill value), so that a
        missing or cut file is found (`FeatureReader._unit_files`) instead of read as zeros.
        """
        rows, n = self.unit_rows, len(records)
        if n > rows:
            raise StoreError(f"shard {self.shards[unit]} gives {n} rows but a unit holds {rows}; remove {self.path} "
                             f"and extract again with --unit-rows {n} (or more)")
        try:
            self._write_unit(unit, arrays, records, errors, shard)
        except OSError as e:  # disk full, permissions: say where and for which shard
            raise StoreError(f"cannot write shard {self.shards[unit]} into {self.path}: {e}") from e
        self._failure(unit).unlink(missing_ok=True)
        self._forget(unit)  # read afresh: this writer may read the set it writes

    def _write_unit(self, unit, arrays, records, errors, shard) -> None:
        rows, n = self.unit_rows, len(records)
        start = unit * rows
        for name in self.features:
            a = np.asarray(arrays[name])
            if a.shape[0] != n:
                raise StoreError(f"{name}: {a.shape[0]} rows for {n} records")
            block = np.zeros((rows, *a.shape[1:]), dtype=self.dtype)
            block[:n] = a
            self.array(name, "r+")[start:start + rows] = block  # exactly one whole chunk
        keys = [r[0] for r in records] + [k for k, _ in errors]
        table = pa.table({
            "key": keys,
            "label": [r[1] for r in records] + [-1] * len(errors),
            "view": [r[2] for r in records] + [0] * len(errors),
            "row": list(range(start, start + n)) + [-1] * len(errors),
            "error": [None] * n + [reason for _, reason in errors],
        }, schema=RECORD_SCHEMA)
        self._write_record(unit, table, shard)

    def _write_record(self, unit: int, table: pa.Table, shard: dict | None) -> None:
        """Commit ``unit``: its record, bound to this set and this unit, naming each of its files with its size and
        its inner chunks' crc32c as written (so that a file copied in from another set or unit is found)."""
        files = {}
        for name in self.features:
            raw = self._raw_shards(name)
            for key in self._unit_keys(name, unit):
                where = self.path / ARRAYS / name / key
                files[f"{name}/{key}"] = ({"size": where.stat().st_size,
                                           "crc32c": raw.crcs(where, unit) if raw is not None else None}
                                          if where.is_file() else None)
        meta = {"shard": json.dumps(shard), "files": json.dumps(files), "set": self.fingerprint, "unit": str(unit)}
        _atomic_write(self._record(unit), parquet_bytes(table.replace_schema_metadata(meta)))

    def adopt_unit(self, source: "UnitWriter", unit: int) -> None:
        """Commit ``unit`` by copying ``source``'s committed unit (the same rows, as `adopt_units` in extract
        decides): its chunk files of every feature, then its record (bound to this set), renamed into place last."""
        for name in self.features:
            src, dst = source.path / ARRAYS / name / "c" / str(unit), self.path / ARRAYS / name / "c" / str(unit)
            if dst.exists():
                shutil.rmtree(dst)
            if src.exists():
                shutil.copytree(src, dst)
        self._write_record(unit, source._read_unit(unit), source.unit_shard(unit))
        self._failure(unit).unlink(missing_ok=True)
        self._forget(unit)

    def claims(self, stale_after: float = 600.0) -> Claims:
        return Claims(self.path / "units", stale_after=stale_after)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files of writers on this host that are no longer running (killed mid-write)."""
        return [*remove_stale(self.path), *remove_stale(self.path / "units")]

    def discard_if_empty(self) -> bool:
        """Remove the set if nothing was written into it (its model failed before its first shard), so that no
        empty set is listed, or offered as one of the model's sets; whether it was removed."""
        with _locked(self.path):
            if self.complete or any(p.name != ".lock" for p in (self.path / "units").iterdir()):
                return False
            shutil.rmtree(self.path)
        try:
            self.path.parent.rmdir()  # the dataset's folder, if no other set is in it
        except OSError:
            pass
        return True

    def fail_unit(self, unit: int, reason: str) -> None:
        """Record why a whole shard failed; the unit stays uncommitted and the next run retries it."""
        _atomic_write(self._failure(unit), json.dumps({"shard": self.shards[unit], "reason": reason}).encode())

    def finalize(self) -> bool:
        """Once every unit is committed, write the one index and errors table (by whichever writer is last)."""
        with _locked(self.path):
            if (self.path / "index.parquet").is_file():
                return True
            if len(self.committed_units()) < self.num_units:
                return False
            ok, errors = self._read_records(range(self.num_units))
            if len(ok) == 0 and len(errors) > 0:
                return False  # nothing usable: never a complete (reusable) set; see `unusable`
            bound = {"set": self.fingerprint}  # a table copied in from another set is found (`_read_bound`)
            _atomic_write(self.path / "errors.parquet", parquet_bytes(errors.replace_schema_metadata(bound)))
            _atomic_write(self.path / "index.parquet", parquet_bytes(ok.replace_schema_metadata(bound)))
            return True
