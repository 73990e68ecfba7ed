"""Reading a feature set: its records, the one index and errors tables, and rows of features."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..features import TokenLayout, parse_features
from .meta import ARRAYS, INDEX_SCHEMA, NAMES, Description, SetRecord, StoreError


@dataclass
class Features:
    """Rows read from a feature set: ``x`` is one [N, sum(D)] array, or a dict by name when not concatenated."""

    x: np.ndarray | dict[str, np.ndarray]
    labels: np.ndarray
    keys: np.ndarray
    views: np.ndarray
    names: tuple[str, ...]


class FeatureReader:
    """One feature set on disk, for reading; opening checks its record (`StoreMeta`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.meta: SetRecord = SetRecord.open(self.path)

    def __repr__(self) -> str:
        return f"FeatureSet({str(self.path)!r})"

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def identity(self) -> dict:
        return self.meta.identity

    @property
    def layout(self) -> TokenLayout:
        return self.meta.layout

    @property
    def features(self) -> tuple[str, ...]:
        return self.meta.features

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta.dtype)

    @property
    def unit_rows(self) -> int:
        return self.meta.unit_rows

    @property
    def num_units(self) -> int:
        return self.meta.num_units

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(self.meta.dataset.shards)

    def names(self) -> dict[str, Description]:
        """Every description of this set's rows, by dataset name: its creator's, and one per other manifest
        whose shards turned out to hold the same rows (`UnitWriter.add_name`)."""
        d = self.meta.dataset
        out = {d.name: Description(**{k: getattr(d, k) for k in Description.model_fields})}
        for f in sorted((self.path / NAMES).glob("*.json")):
            desc = Description.read(f, "dataset description")
            out[desc.name] = desc
        return out

    def description(self, name: str | None = None) -> Description:
        """What the rows mean under ``name`` (default: the creator's name)."""
        names = self.names()
        if name is None:
            return names[self.meta.dataset.name]
        if name not in names:
            raise StoreError(f"{self.path} holds no dataset named {name!r} (it holds {', '.join(names)})")
        return names[name]

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

    def shard_digests(self) -> dict[int, str]:
        """Per committed unit, the digest of the shard bytes it was read from; where the bytes could not be
        digested (a remote shard) or were not recorded (older stores), the shard's URL stands for them."""
        urls = self.meta.dataset.urls
        return {u: (self.unit_shard(u) or {}).get("digest") or f"url:{urls[u]}" for u in sorted(self.committed_units())}

    def content_id(self) -> str:
        """What the rows were read from: a hash of the shard digests of every committed unit.

        The fingerprint names the settings and the dataset's description; a set re-extracted from other
        images under the same description keeps its fingerprint, but not its content id. Runs record it
        so that their numbers are never mixed with, or rescored on, other data.
        """
        import hashlib

        return hashlib.sha256(json.dumps(sorted(self.shard_digests().items())).encode()).hexdigest()

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

    def _raw_shards(self, name: str) -> "_RawShards | None":
        """The direct reader of ``name`` when its zarr.json is the layout this version writes (one shard per
        unit of raw little-endian inner chunks, zero fill); None for any other layout (older stores): zarr."""
        meta = json.loads((self.path / ARRAYS / name / "zarr.json").read_text())
        shape, codecs = meta.get("shape", []), meta.get("codecs", [])
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        if (meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
                or meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") != [self.unit_rows, *shape[1:]]
                or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or meta.get("fill_value") != 0
                or np.dtype(meta.get("data_type")).byteorder == ">"):
            return None
        conf = codecs[0]["configuration"]
        inner = conf.get("chunk_shape", [])
        if (conf.get("codecs") != [little] or conf.get("index_location", "end") != "end"
                or conf.get("index_codecs") not in ([little], [little, {"name": "crc32c"}])
                or inner[1:] != shape[1:] or self.unit_rows % inner[0]):
            return None
        return _RawShards(self.path / ARRAYS / name, len(shape), inner[0], self.unit_rows // inner[0],
                          int(np.prod(shape[1:])) * np.dtype(meta["data_type"]).itemsize,
                          len(conf["index_codecs"]) == 2)

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
        raw = self._raw_shards(name)
        scratch = np.empty(0, arr.dtype)  # reused across units: a fresh buffer per unit costs its page faults
        units = rows // self.unit_rows
        bounds = np.flatnonzero(np.diff(units)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
            r, target = rows[start:stop], out[start:stop]
            if raw is not None:  # read the span of rows straight from the shard file, then pick
                lo, hi = int(r.min()), int(r.max()) + 1
                whole = hi - lo == len(r) and np.all(np.diff(r) == 1)
                direct = whole and target.dtype == arr.dtype and target.flags.c_contiguous
                if not direct and len(scratch) < (hi - lo) * int(np.prod(arr.shape[1:])):
                    scratch = np.empty((hi - lo) * int(np.prod(arr.shape[1:])), arr.dtype)
                block = target if direct else scratch[:(hi - lo) * int(np.prod(arr.shape[1:]))].reshape(
                    hi - lo, *arr.shape[1:])
                raw.read(int(units[start]), lo - int(units[start]) * self.unit_rows, block)
                if not direct:
                    target[...] = (block if whole else block[r - lo]).reshape(target.shape)
                continue
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


@dataclass(frozen=True)
class _RawShards:
    """Reads rows of one feature from its shard files as the Zarr v3 sharding spec lays them out: raw
    inner chunks, and at the end an index of (offset, nbytes) uint64 pairs per inner chunk (all ones:
    not stored, i.e. fill value 0), then a crc32c. One ``readinto`` per inner chunk, straight into the
    caller's array: one pass over memory, as ``numpy.load``; zarr's path makes three."""

    root: Path
    ndim: int
    inner: int        # rows per inner chunk
    chunks: int       # inner chunks per shard
    row_bytes: int
    crc: bool

    def read(self, unit: int, first: int, out: np.ndarray) -> None:
        """Rows [first, first + len(out)) of ``unit``'s shard into ``out`` (C-contiguous, the stored dtype)."""
        buf = out.reshape(len(out), -1).view(np.uint8)
        path = self.root / "c" / str(unit) / "/".join(["0"] * (self.ndim - 1))
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # a shard never written holds the fill value
            buf[...] = 0
            return
        with f:
            f.seek(-(16 * self.chunks + 4 * self.crc), os.SEEK_END)
            index = np.frombuffer(f.read(16 * self.chunks), "<u8").reshape(-1, 2)
            last = first + len(out)
            for i in range(first // self.inner, (last - 1) // self.inner + 1):
                a, b = max(first, i * self.inner), min(last, (i + 1) * self.inner)
                dst = buf[a - first:b - first]
                offset = int(index[i, 0])
                if offset == 2 ** 64 - 1:
                    dst[...] = 0
                    continue
                f.seek(offset + (a - i * self.inner) * self.row_bytes)
                if f.readinto(memoryview(dst).cast("B")) != dst.nbytes:
                    raise StoreError(f"{path}: shard shorter than its index says; re-extract this set")


def _ndbuffer():
    """zarr's buffer class, to decode into the caller's array. It is private API, so pyproject.toml bounds
    zarr to the tested minor version, and without it reads take the public path (one copy more)."""
    try:
        from zarr.core.buffer.cpu import NDBuffer
    except ImportError:
        return None
    return NDBuffer
