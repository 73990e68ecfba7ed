"""The sharded embedding store (DESIGN §3).

Layout of one feature set (a directory whose name ends in its fingerprint)::

    regcache.json        identity, fingerprint, token layout, provenance (written once, at creation)
    features.zarr/NAME   one Zarr v3 array per feature, [units * unit_rows, *shape]; unit u owns the
                         rows [u*unit_rows, (u+1)*unit_rows), which are exactly one chunk.
                         Blosc-lz4: float16 features barely compress (zstd saves ~9% at 1/16 the
                         read speed, bench/scale.py), but padding and empty rows vanish either way
    units/UNIT.parquet   the commit record of a unit: one line per sample (row, or the error)
    units/UNIT.failed    why a unit (a whole shard) failed; retried by the next run
    index.parquet        key, label, shard, view, row of every stored sample, once all units are in
    errors.parquet       key, shard, reason of every sample that could not be used

A unit's chunk is written whole (never read-modify-write), then its record is renamed into
place: a unit is visible once complete, and a crash leaves the committed unit or nothing. No two
units share a chunk, so any number of processes may write disjoint units at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .features import FEATURES, TokenLayout, parse_features

log = logging.getLogger("regcache")

SCHEMA_VERSION = 2  # 2: data identity covers shard contents; cross-shard duplicates
META = "regcache.json"
ARRAYS = "features.zarr"
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("shard", pa.string()),
                          ("view", pa.int16()), ("row", pa.int64())])
_RECORD_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("view", pa.int16()),
                            ("row", pa.int64()), ("error", pa.string())])


class StoreError(RuntimeError):
    """A store that cannot be written or read as asked (fingerprint mismatch, unit overflow, …)."""


def fingerprint(identity: dict) -> str:
    """sha256 of everything that determines a feature set's content, in canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "x"


def feature_set_path(root: str | os.PathLike, dataset: str, model: str, fp: str) -> Path:
    """``ROOT/DATASET/MODEL-FINGERPRINT12``: readable, and distinct for every distinct content."""
    return Path(root) / slug(dataset) / f"{slug(model)}-{fp[:12]}"


_HOST = re.sub(r"[^\w-]", "_", socket.gethostname())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Claims:
    """Exclusive claims on units, so that identical commands on one store share its shards.

    A claim is ``units/UNIT.claim``, created exclusively, naming its owner (host:pid of the
    process that commits). The owner refreshes its claims' mtime (`refresh`, a heartbeat); a claim
    whose owner died on this host, or that has not been refreshed for ``stale_after`` seconds, is
    taken over. Takeover renames the old claim away first, so only one process can win it.
    """

    units: Path
    owner: str = field(default_factory=lambda: f"{_HOST}:{os.getpid()}")
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
            with os.fdopen(fd, "w") as f:
                f.write(self.owner)
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
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            return True
        return age > self.stale_after

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


@dataclass
class Features:
    """Rows read from a feature set: ``x`` is one [N, sum(D)] array, or a dict by name when not concatenated."""

    x: np.ndarray | dict[str, np.ndarray]
    labels: np.ndarray
    keys: np.ndarray
    views: np.ndarray
    names: tuple[str, ...]


class FeatureSet:
    """One feature set on disk: read it, or (through `create`) write units into it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not (self.path / META).is_file():
            raise StoreError(f"{self.path} is not a regcache feature set (no {META})")
        try:
            self.meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.path / META} is unreadable ({e}); remove the directory and re-extract") from None
        version = self.meta.get("schema_version") if isinstance(self.meta, dict) else None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version}; this regcache reads schema {SCHEMA_VERSION}. "
                             "Re-extract it (remove the directory), or use the regcache version that wrote it.")

    def __repr__(self) -> str:
        return f"FeatureSet({str(self.path)!r})"

    # ------------------------------------------------------------------ creation and writing

    @classmethod
    def create(cls, path: str | os.PathLike, identity: dict, meta: dict | Callable[[], dict]) -> "FeatureSet":
        """Create the store, or open it if it exists with the same identity; refuse any other.

        ``meta`` (the layout, sizes and provenance) may be a function: it is called only when the
        store is new, so that writers joining an existing store skip its costs.
        """
        path = Path(path)
        identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
        fp = fingerprint(identity)
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if (path / META).is_file():
                old = json.loads((path / META).read_text())
                if old["fingerprint"] != fp:
                    diff = sorted(k for k in set(old["identity"]) | set(identity)
                                  if old["identity"].get(k) != identity.get(k))
                    raise StoreError(f"{path} holds a different feature set (fingerprint {old['fingerprint'][:12]}, "
                                     f"asked {fp[:12]}; differs in: {', '.join(diff)}); "
                                     "refusing to mix them. Use another cache root or --store path.")
                return cls(path)
            meta = {"schema_version": SCHEMA_VERSION, **(meta() if callable(meta) else meta), "fingerprint": fp,
                    "identity": identity}
            cls._create_arrays(path, meta)
            (path / "units").mkdir(exist_ok=True)
            _atomic_write(path / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        return cls(path)

    @staticmethod
    def _create_arrays(path: Path, meta: dict) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        layout = TokenLayout.from_dict(meta["layout"])
        rows, total = meta["unit_rows"], meta["unit_rows"] * meta["num_units"]
        group = zarr.open_group(path / ARRAYS, mode="a", zarr_format=3)
        for name in meta["features"]:
            shape = layout.shape(name)
            group.create_array(name, shape=(total, *shape), chunks=(rows, *shape), dtype=meta["dtype"],
                               fill_value=0, compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
                               overwrite=True, attributes={"description": FEATURES[name]})

    def commit_unit(self, unit: int, arrays: dict[str, np.ndarray], records: Sequence[tuple[str, int, int]],
                    errors: Sequence[tuple[str, str]] = (), shard: dict | None = None) -> None:
        """Write one unit's rows (``records`` = (key, label, view) in row order) and commit it atomically.

        ``shard`` (path, size, digest of the input shard as read) is kept with the unit's record.
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
        }, schema=_RECORD_SCHEMA.with_metadata({"shard": json.dumps(shard)}))
        _atomic_write(self._record(unit), _parquet_bytes(table))

    def claims(self, stale_after: float = 600.0) -> Claims:
        return Claims(self.path / "units", stale_after=stale_after)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files of writers on this host that are no longer running (killed mid-write)."""
        gone = []
        for tmp in [*self.path.glob(".*.tmp"), *(self.path / "units").glob(".*.tmp")]:
            *_, host, pid, _ = tmp.name.rsplit(".", 3)
            if host == _HOST and pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                gone.append(tmp)
        return gone

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
            _atomic_write(self.path / "errors.parquet", _parquet_bytes(errors))
            _atomic_write(self.path / "index.parquet", _parquet_bytes(ok))
            return True

    # ------------------------------------------------------------------ metadata

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_dict(self.meta["layout"])

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.meta["features"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def unit_rows(self) -> int:
        return int(self.meta["unit_rows"])

    @property
    def num_units(self) -> int:
        return int(self.meta["num_units"])

    @property
    def shards(self) -> list[str]:
        return self.meta["dataset"]["shards"]

    def _record(self, unit: int) -> Path:
        return self.path / "units" / f"{unit:06d}.parquet"

    def _failure(self, unit: int) -> Path:
        return self.path / "units" / f"{unit:06d}.failed"

    def committed_units(self) -> set[int]:
        return {int(p.stem) for p in (self.path / "units").glob("*.parquet")}

    def unit_shard(self, unit: int) -> dict | None:
        """What the input shard was when the unit was committed (path, size, digest), if recorded."""
        meta = pq.read_schema(self._record(unit)).metadata or {}
        return json.loads(meta[b"shard"]) if b"shard" in meta else None

    def unit_samples(self, unit: int) -> int:
        """Input samples a committed unit accounts for: stored (once per key, whatever the views) or failed."""
        t = pq.read_table(self._record(unit), columns=["key", "error"])
        ok = t.filter(pa.compute.is_null(t["error"]))["key"]
        return len(pa.compute.unique(ok)) + len(t) - len(ok)

    def failed_units(self) -> dict[int, str]:
        return {int(p.stem): json.loads(p.read_text())["reason"] for p in (self.path / "units").glob("*.failed")}

    @property
    def complete(self) -> bool:
        return (self.path / "index.parquet").is_file()

    def unusable(self) -> str | None:
        """Why a set whose units are all committed has no index: every sample failed (and the first reasons)."""
        if self.complete or len(self.committed_units()) < self.num_units:
            return None
        ok, errors = self._read_records(range(self.num_units))
        if len(ok):
            return None
        reasons = sorted(set(errors["reason"].to_pylist()))
        return (f"every one of its {len(errors)} samples failed, so nothing usable is stored; reasons: "
                + "; ".join(reasons[:3]) + (" …" if len(reasons) > 3 else ""))

    def array(self, name: str, mode: str = "r"):
        """The Zarr array of one feature (all units, padding included; the index says which rows are real)."""
        import zarr

        if name not in self.features:
            raise StoreError(f"{self.path} has no feature {name!r}; it has {', '.join(self.features)}")
        return zarr.open_array(self.path / ARRAYS / name, mode=mode)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in (self.path / ARRAYS).rglob("*") if f.is_file())

    # ------------------------------------------------------------------ reading

    def _read_records(self, units: Iterable[int]) -> tuple[pa.Table, pa.Table]:
        """The index and errors tables of ``units``, in unit order.

        Exactly once across the whole set: a key already stored by an earlier unit (the same sample
        in two shards, or a shard listed twice) goes to the errors table as a duplicate.
        """
        ok, bad = [], []
        first: dict[str, str] = {}  # key -> the shard that stored it
        for u in units:
            t = pq.read_table(self._record(u))
            shard = pa.array([self.shards[u]] * len(t), pa.string())
            t = t.append_column("shard", shard)
            good = t.filter(pa.compute.is_null(t["error"]))
            keys = good["key"].to_pylist()
            dup = np.fromiter((k in first for k in keys), bool, len(keys))
            if dup.any():
                again = list(dict.fromkeys(k for k, d in zip(keys, dup) if d))
                bad.append(pa.table({"key": again, "shard": [self.shards[u]] * len(again),
                                     "reason": [f"duplicate key: already stored from shard {first[k]}"
                                                for k in again]}))
                good = good.filter(pa.array(~dup))
            first.update((k, self.shards[u]) for k in good["key"].to_pylist())
            ok.append(good.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA))
            failed = t.filter(pa.compute.invert(pa.compute.is_null(t["error"])))
            bad.append(failed.select(["key", "shard", "error"]).rename_columns(["key", "shard", "reason"]))
        empty_bad = pa.table({"key": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
                              "reason": pa.array([], pa.string())})
        return (pa.concat_tables(ok) if ok else INDEX_SCHEMA.empty_table(),
                pa.concat_tables(bad) if bad else empty_bad)

    @cached_property
    def _tables(self) -> tuple[pa.Table, pa.Table]:
        if self.complete:
            return pq.read_table(self.path / "index.parquet"), pq.read_table(self.path / "errors.parquet")
        return self._read_records(sorted(self.committed_units()))

    @property
    def index(self):
        """pandas DataFrame: key, label, shard, view, row, one line per stored row, in dataset order."""
        return self._tables[0].to_pandas()

    @property
    def errors(self):
        """pandas DataFrame: key, shard, reason, one line per sample that could not be used."""
        return self._tables[1].to_pandas()

    def load(self, features: str | Sequence[str] | None = None, *, views: Sequence[int] | None = None,
             concat: bool = True, dtype=np.float32, as_torch: bool = False,
             allow_incomplete: bool = False) -> Features:
        """Features by name (``reg_all`` flattened when concatenated), with labels and keys, in index order."""
        names = parse_features(features) if features is not None else self.features
        if not self.complete and not allow_incomplete:
            missing = self.num_units - len(self.committed_units())
            raise StoreError(f"{self.path} is incomplete ({missing} of {self.num_units} units missing); "
                             "rerun the extract command, or pass allow_incomplete=True")
        idx = self._tables[0]
        if views is not None:
            idx = idx.filter(pa.compute.is_in(idx["view"], pa.array(list(views), pa.int16())))
        rows = idx["row"].to_numpy()
        if concat:  # read each feature straight into its columns: no concatenation copy
            widths = [int(np.prod(self.layout.shape(n))) for n in names]
            x = np.empty((len(rows), sum(widths)), dtype=dtype)
            for name, start, width in zip(names, np.cumsum([0] + widths[:-1]), widths):
                self.read_rows(name, rows, out=x[:, start:start + width])
        else:
            x = {}
            for name in names:
                x[name] = np.empty((len(rows), *self.layout.shape(name)), dtype=dtype)
                self.read_rows(name, rows, out=x[name])
        labels, vs = idx["label"].to_numpy().copy(), idx["view"].to_numpy().copy()  # writable, for torch
        keys = idx["key"].to_numpy(zero_copy_only=False)
        if as_torch:
            import torch

            x = torch.from_numpy(x) if concat else {k: torch.from_numpy(v) for k, v in x.items()}
            labels = torch.from_numpy(labels)
        return Features(x=x, labels=labels, keys=keys, views=vs, names=names)

    def read_rows(self, name: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of one feature, unit by unit; a unit's contiguous rows are one slice read, padding never read.

        ``out`` ([len(rows), ...], any dtype, may be a column block of a wider array) receives them.
        """
        arr = self.array(name)
        NDBuffer = _ndbuffer()
        if out is None:
            out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
        if not len(rows):
            return out
        units = rows // self.unit_rows
        bounds = np.flatnonzero(np.diff(units)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
            r, target = rows[start:stop], out[start:stop]
            if r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
                if NDBuffer is not None and target.dtype == arr.dtype and target.shape == (len(r), *arr.shape[1:]):
                    # zarr decodes straight into our array: one copy fewer
                    arr.get_basic_selection(slice(int(r[0]), int(r[-1]) + 1), out=NDBuffer.from_numpy_array(target))
                    continue
                block = arr[int(r[0]):int(r[-1]) + 1]
            else:
                lo = int(units[start]) * self.unit_rows
                block = arr[lo:int(r.max()) + 1][r - lo]
            target[...] = block.reshape(target.shape)
        return out


def _ndbuffer():
    """zarr's buffer class, to decode into the caller's array. It is private API, so pyproject.toml bounds
    zarr to the tested minor version, and without it reads take the public path (one copy more)."""
    try:
        from zarr.core.buffer.cpu import NDBuffer
    except ImportError:
        return None
    return NDBuffer


def list_feature_sets(root: str | os.PathLike) -> list[FeatureSet]:
    """Every readable feature set under a cache root, sorted by path; an unreadable one is named in a warning."""
    found = []
    for p in sorted(Path(root).expanduser().glob(f"**/{META}")):
        try:
            found.append(FeatureSet(p.parent))
        except StoreError as e:
            log.warning("skipped: %s", e)
    return found


def find_reusable(root: str | os.PathLike, identity: dict) -> FeatureSet | None:
    """A complete feature set with the same identity except that it stores at least the asked features."""
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    want = set(identity["features"])
    same = {k: v for k, v in identity.items() if k != "features"}
    for fs in list_feature_sets(root):
        ident = fs.meta["identity"]
        if {k: v for k, v in ident.items() if k != "features"} == same and want <= set(ident["features"]) \
                and fs.complete:
            return fs
    return None
