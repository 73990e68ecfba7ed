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
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .features import FEATURES, TokenLayout, parse_features

SCHEMA_VERSION = 1
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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


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
            meta = {**(meta() if callable(meta) else meta), "fingerprint": fp, "identity": identity}
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
                    errors: Sequence[tuple[str, str]] = ()) -> None:
        """Write one unit's rows (``records`` = (key, label, view) in row order) and commit it atomically."""
        rows, n = self.unit_rows, len(records)
        if n > rows:
            raise StoreError(f"shard {self.shards[unit]} gives {n} rows but a unit holds {rows}; "
                             "recreate the store with a larger --unit-rows")
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
        }, schema=_RECORD_SCHEMA)
        _atomic_write(self._record(unit), _parquet_bytes(table))
        self._failure(unit).unlink(missing_ok=True)

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
            _atomic_write(self.path / "errors.parquet", _parquet_bytes(errors))
            _atomic_write(self.path / "index.parquet", _parquet_bytes(ok))
            return True

    # ------------------------------------------------------------------ metadata

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())

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

    def failed_units(self) -> dict[int, str]:
        return {int(p.stem): json.loads(p.read_text())["reason"] for p in (self.path / "units").glob("*.failed")}

    @property
    def complete(self) -> bool:
        return (self.path / "index.parquet").is_file()

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
        ok, bad = [], []
        for u in units:
            t = pq.read_table(self._record(u))
            shard = pa.array([self.shards[u]] * len(t), pa.string())
            t = t.append_column("shard", shard)
            good = t.filter(pa.compute.is_null(t["error"]))
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
        from zarr.core.buffer.cpu import NDBuffer

        arr = self.array(name)
        if out is None:
            out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
        if not len(rows):
            return out
        units = rows // self.unit_rows
        bounds = np.flatnonzero(np.diff(units)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
            r, target = rows[start:stop], out[start:stop]
            if r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
                if target.dtype == arr.dtype and target.shape == (len(r), *arr.shape[1:]):
                    # zarr decodes straight into our array: one copy fewer
                    arr.get_basic_selection(slice(int(r[0]), int(r[-1]) + 1), out=NDBuffer.from_numpy_array(target))
                    continue
                block = arr[int(r[0]):int(r[-1]) + 1]
            else:
                lo = int(units[start]) * self.unit_rows
                block = arr[lo:int(r.max()) + 1][r - lo]
            target[...] = block.reshape(target.shape)
        return out


def list_feature_sets(root: str | os.PathLike) -> list[FeatureSet]:
    """Every feature set under a cache root, sorted by path."""
    return [FeatureSet(p.parent) for p in sorted(Path(root).glob(f"**/{META}"))]


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
