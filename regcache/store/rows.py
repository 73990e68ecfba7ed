"""Reading features: whole sets (`Rows.load`) and rows of one feature (`Rows.read_rows`), each unit's files checked
against its record first and every checksum on the way; a mixin of `FeatureReader`. The shard files of the
layouts regcache writes are read directly (`raw`), any other through zarr's public API."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from ..features import parse_features
from .meta import ARRAYS, DamagedFile, StoreError


@dataclass
class Features:
    """Rows read from a feature set: ``x`` is one [N, sum(D)] array, or a dict by name when not concatenated."""

    x: np.ndarray | dict[str, np.ndarray]
    labels: np.ndarray
    keys: np.ndarray
    views: np.ndarray
    names: tuple[str, ...]



class Rows:
    def load(self, features: str | Sequence[str] | None = None, *, views: Sequence[int] | None = None,
             concat: bool = True, dtype=np.float32, as_torch: bool = False,
             allow_incomplete: bool = False) -> Features:
        """Features by name (``reg_all`` flattened when concatenated), with labels and keys, in index order."""
        names = parse_features(features) if features is not None else self.features
        if not self.complete and not allow_incomplete:
            raise StoreError(self._incomplete())
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
            import torch  # only here: the store loads without torch

            x = torch.from_numpy(x) if concat else {k: torch.from_numpy(v) for k, v in x.items()}
            labels = torch.from_numpy(labels)
        return Features(x=x, labels=labels, keys=keys, views=vs, names=names)

    def read_rows(self, name: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of one feature, unit by unit; a unit's contiguous rows are one slice read, padding never read.

        ``out`` ([len(rows), ...], any dtype, may be a column block of a wider array) receives them.
        Each committed unit's files are checked against its record first (`_unit_files`), and every
        checksum on the way is verified: a damaged file is an error that names it.
        """
        arr = self.array(name)
        if out is None:
            out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
        if not len(rows):
            return out
        raw = self._raw_shards(name)
        scratch = np.empty(0, arr.dtype)  # reused across units: a fresh buffer per unit costs its page faults
        units = rows // self.unit_rows
        bounds = np.flatnonzero(np.diff(units)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
            r, target, unit = rows[start:stop], out[start:stop], int(units[start])
            files = self._unit_files(name, unit)
            if raw is not None:  # read the span of rows straight from the shard file, then pick
                lo, hi = int(r.min()), int(r.max()) + 1
                whole = hi - lo == len(r) and np.all(np.diff(r) == 1)
                direct = whole and target.dtype == arr.dtype and target.flags.c_contiguous
                if not direct and len(scratch) < (hi - lo) * int(np.prod(arr.shape[1:])):
                    scratch = np.empty((hi - lo) * int(np.prod(arr.shape[1:])), arr.dtype)
                block = target if direct else scratch[:(hi - lo) * int(np.prod(arr.shape[1:]))].reshape(
                    hi - lo, *arr.shape[1:])
                try:
                    raw.read(files[0] if files else None, unit, lo - unit * self.unit_rows, block,
                             self._unit_crcs(name, unit, files[0]) if files else None)
                except DamagedFile as e:
                    raise DamagedFile(e.path, e.reason, self._redo(unit)) from None
                if not direct:
                    target[...] = (block if whole else block[r - lo]).reshape(target.shape)
                continue
            try:
                self._zarr_rows(arr, r, target, unit)
            except StoreError:
                raise
            except Exception as e:  # zarr's errors (a checksum, a codec) do not say which file
                where = files[0] if len(files) == 1 else self.path / ARRAYS / name
                raise DamagedFile(where, f"zarr cannot read unit {unit}'s rows ({type(e).__name__}: {e})",
                                  self._redo(unit)) from None
        return out

    def _zarr_rows(self, arr, r: np.ndarray, target: np.ndarray, unit: int) -> None:
        """Rows ``r`` (all of one unit) through zarr's public API, for layouts the direct reader does not know."""
        if r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
            block = arr[int(r[0]):int(r[-1]) + 1]
        else:
            lo = unit * self.unit_rows
            block = arr[lo:int(r.max()) + 1][r - lo]
        target[...] = block.reshape(target.shape)
