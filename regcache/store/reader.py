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
from .meta import ARRAYS, INDEX_SCHEMA, StoreError, StoreMeta


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
        self.record, self.meta = StoreMeta.read(self.path)

    def __repr__(self) -> str:
        return f"FeatureSet({str(self.path)!r})"


    @property
    def fingerprint(self) -> str:
        return self.record.fingerprint

    @property
    def layout(self) -> TokenLayout:
        return self.record.layout

    @property
    def features(self) -> tuple[str, ...]:
        return self.record.features

    @property
    def dtype(self) -> np.dtype:
        return self.record.dtype

    @property
    def unit_rows(self) -> int:
        return self.record.unit_rows

    @property
    def num_units(self) -> int:
        return self.record.num_units

    @property
    def shards(self) -> tuple[str, ...]:
        return self.record.shards

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
