"""Reading a feature set: its records, the one index and errors tables, and rows of features."""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from ..features import TokenLayout
from .checks import Checks
from .meta import ARRAYS, INDEX_SCHEMA, NAMES, DamagedFile, Description, SetRecord, StoreError, weights_tag
from .raw import RawShards, raw_shards
from .rows import Rows
from .tables import read_table

_UNSIZED = -1         # a file a committed unit must have, whose size its record does not give (older records)


class FeatureReader(Rows, Checks):
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

    def model_label(self, typed: str | None = None) -> str:
        """``typed`` (the model's name as a command was given it; default the recorded one) with `weights_tag`:
        a set of a checkpoint that is not the name's own weights, or of random ones, never reads as the hub's."""
        m = self.meta.model
        return (typed or m.name) + weights_tag(m.name, m.checkpoint, self.identity.get("random_init"))

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
        return set(self._units("parquet"))

    def _units(self, suffix: str) -> dict[int, Path]:
        """The store's unit files (``units/NNNNNN.suffix`` of a unit it has); other files there are not its own."""
        found = {}
        for p in (self.path / "units").glob(f"*.{suffix}"):
            if p.stem.isdigit() and p.name == f"{int(p.stem):06d}.{suffix}" and int(p.stem) < self.num_units:
                found[int(p.stem)] = p
        return found

    @cached_property
    def _unit_tables(self) -> dict[int, pa.Table]:
        """The unit records read so far, by unit (`_read_unit`)."""
        return {}

    def _forget(self, unit: int) -> None:
        """Read ``unit``'s record afresh next time (this writer committed it)."""
        self._unit_tables.pop(unit, None)

    @property
    def bound(self) -> bool:
        """Whether this set's records are bound to it (schema 4): each unit record names its set and unit and
        its files' chunk checksums, and every table carries its content digest."""
        return self.meta.schema_version >= 4

    @cached_property
    def _zarr_meta(self) -> dict[str, dict]:
        """The zarr.json of features read so far, by name (`_zarr_json`)."""
        return {}

    def _redo(self, unit: int) -> str:
        """What to do about a damaged file of a committed unit."""
        return f"copy it again from where this set came from, or {self._reextract(unit)}"

    def _reextract(self, unit: int) -> str:
        return (f"re-extract shard {self.shards[unit]}: remove {self._record(unit)}, index.parquet and "
                f"errors.parquet from {self.path} and run the extract command again")

    def _record_meta(self, unit: int) -> dict:
        """The metadata of a unit's commit record (shard, files), JSON-decoded."""
        where = self._record(unit)
        raw = self._read_unit(unit).schema.metadata or {}
        try:
            return {k.decode(): json.loads(v) for k, v in raw.items() if k in (b"shard", b"files")}
        except ValueError as e:
            raise DamagedFile(where, f"unreadable unit record ({e})", self._redo(unit)) from None

    def _read_table(self, where: Path, advice: str) -> pa.Table:
        return read_table(where, advice=advice, require_digest=self.bound)

    def _read_unit(self, unit: int, columns: list[str] | None = None) -> pa.Table:
        """A unit's commit record, checked (its digest; in a bound set, that it is this set's record of this
        unit: a record copied in from another set or unit is an error that names it); read once."""
        if unit not in self._unit_tables:
            where = self._record(unit)
            table = self._read_table(where, self._redo(unit))
            meta = table.schema.metadata or {}
            if self.bound and (meta.get(b"set"), meta.get(b"unit")) != (self.fingerprint.encode(), str(unit).encode()):
                theirs = f"unit {meta.get(b'unit', b'?').decode()} of set {meta.get(b'set', b'?')[:12].decode()}"
                raise DamagedFile(where, f"is the record of {theirs}, not of unit {unit} of this set "
                                         f"({self.fingerprint[:12]}): copied in from elsewhere?", self._redo(unit))
            self._unit_tables[unit] = table
        table = self._unit_tables[unit]
        return table.select(columns) if columns is not None else table

    def unit_shard(self, unit: int) -> dict | None:
        """What the input shard was when the unit was committed (path, size, digest, sha256), if recorded."""
        return self._record_meta(unit).get("shard")

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
        t = self._read_unit(unit, columns=["key", "error"])
        ok = t.filter(pa.compute.is_null(t["error"]))["key"]
        return len(pa.compute.unique(ok)) + len(t) - len(ok)

    def failed_units(self) -> dict[int, str]:
        """Units whose shard failed as a whole and that no writer has committed since (a writer that failed a
        unit another had committed leaves its record: the unit is committed all the same)."""
        out = {}
        committed = self.committed_units()
        for unit, p in self._units("failed").items():
            if unit in committed:
                continue
            try:
                out[unit] = json.loads(p.read_text())["reason"]
            except (OSError, ValueError, KeyError, TypeError) as e:  # cut or overwritten: the unit failed all the same
                out[unit] = f"(the failure record {p} does not read: {type(e).__name__}: {e})"
        return out

    @property
    def complete(self) -> bool:
        return (self.path / "index.parquet").is_file()

    def _incomplete(self) -> str:
        """Why a set has no index, and the command that gives it one."""
        missing = self.num_units - len(self.committed_units())
        if missing:
            return (f"{self.path} is incomplete: {missing} of {self.num_units} shards not committed yet (failed, or "
                    "still being extracted); run the extract command again to extract them (it resumes where it "
                    "stopped), or with --finalize to list them")
        why = self.unusable()
        if why:
            return f"{self.path} is unusable: {why}"
        return (f"{self.path} has every shard committed but no index.parquet (its last writer stopped before "
                "writing it); run the extract command again with --finalize to write it")

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
        self._zarr_json(name)  # a damaged one is named here; zarr's own error does not name it
        try:
            return zarr.open_array(self.path / ARRAYS / name, mode=mode)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DamagedFile(self.path / ARRAYS / name / "zarr.json", f"zarr cannot open the array ({e})",
                              f"restore it from a copy, or remove {self.path} and extract again") from None

    def _zarr_json(self, name: str) -> dict:
        """The zarr.json of one feature, read once; missing or unreadable is an error that names it."""
        if name not in self._zarr_meta:
            where = self.path / ARRAYS / name / "zarr.json"
            advice = f"restore it from a copy, or remove {self.path} and extract again"
            try:
                meta = json.loads(where.read_text())
                shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
                if not (all(isinstance(n, int) and n >= 0 for n in shape) and
                        all(isinstance(n, int) and n > 0 for n in chunks) and len(shape) == len(chunks)):
                    raise ValueError(f"shape {shape} and chunk shape {chunks} are not sizes")
            except FileNotFoundError:
                raise DamagedFile(where, "missing", advice) from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DamagedFile(where, f"unreadable array metadata ({type(e).__name__}: {e})", advice) from None
            self._zarr_meta[name] = meta
        return self._zarr_meta[name]

    def _unit_keys(self, name: str, unit: int) -> list[str]:
        """The files (relative to the array's folder) that hold ``unit``'s rows of ``name``, by zarr.json's
        chunk grid and key encoding: one shard for the layout written now, one chunk for older ones."""
        import itertools

        meta = self._zarr_json(name)
        shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        enc = meta.get("chunk_key_encoding") or {"name": "default"}
        sep = (enc.get("configuration") or {}).get("separator", "/" if enc.get("name") == "default" else ".")
        rows = range(unit * self.unit_rows // chunk[0], ((unit + 1) * self.unit_rows - 1) // chunk[0] + 1)
        grid = [rows] + [range(-(-s // c)) for s, c in zip(shape[1:], chunk[1:])]
        prefix = f"c{sep}" if enc.get("name") == "default" else ""
        return [prefix + sep.join(map(str, coords)) for coords in itertools.product(*grid)]

    def _stores_rows(self, unit: int) -> bool:
        """Whether a committed unit wrote rows into the arrays (its record's rows; older records say no more)."""
        rows = self._read_unit(unit, columns=["row"])["row"]
        return bool(pa.compute.any(pa.compute.greater_equal(rows, 0)).as_py())

    def _unit_files(self, name: str, unit: int) -> list[Path]:
        """The files holding ``unit``'s rows of ``name``, each checked against the unit's commit record: there,
        and of the size committed. A missing or cut file is an error naming it, never rows of fill value.

        A file the record says was not written (every row the fill value: a unit whose samples all
        failed) is not looked for. Older records give no sizes: a unit that stored rows must have its
        files. An uncommitted unit has nothing to check against: the files that exist.
        """
        root = self.path / ARRAYS / name
        keys = self._unit_keys(name, unit)
        if not self._record(unit).is_file():
            return [root / k for k in keys if (root / k).is_file()]
        files = self._record_meta(unit).get("files")
        found = []
        for key in keys:
            path = root / key
            entry = files.get(f"{name}/{key}", _UNSIZED) if files is not None else None
            want = entry["size"] if isinstance(entry, dict) else entry
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                if want is None and (files is not None or not self._stores_rows(unit)):
                    continue
                raise DamagedFile(path, f"missing, but committed unit {unit} (shard {self.shards[unit]}) stored "
                                        "rows in it (a partial copy of the set?)", self._redo(unit)) from None
            if size == 0:  # zarr never writes an empty chunk or shard (it deletes one that would be all fill)
                raise DamagedFile(path, f"empty, but unit {unit} (shard {self.shards[unit]}) was committed with "
                                        "rows in it: cut short", self._redo(unit))
            if want not in (None, _UNSIZED) and size != want:
                raise DamagedFile(path, f"{size} bytes, but {want} when unit {unit} (shard {self.shards[unit]}) was "
                                        "committed: cut short or overwritten", self._redo(unit))
            if want is None and files is not None:
                raise DamagedFile(path, f"there, but unit {unit} (shard {self.shards[unit]}) was committed without "
                                        "it: copied in from elsewhere?", self._redo(unit))
            found.append(path)
        return found

    def _unit_crcs(self, name: str, unit: int, path: Path) -> list[int | None] | None:
        """The crc32c of each inner chunk of ``path`` (one of ``unit``'s files) as committed (None: not recorded,
        an older record or an uncommitted unit), so that a file of another set or unit is found as it is read."""
        if not self._record(unit).is_file():
            return None
        entry = (self._record_meta(unit).get("files") or {}).get(f"{name}/{path.relative_to(self.path / ARRAYS / name)}")
        return entry.get("crc32c") if isinstance(entry, dict) else None

    def _raw_shards(self, name: str) -> RawShards | None:
        """The direct reader of ``name`` (`raw.raw_shards`); None for layouts zarr reads."""
        return raw_shards(self._zarr_json(name), self.unit_rows)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in (self.path / ARRAYS).rglob("*") if f.is_file())

    def _read_records(self, units: Iterable[int]) -> tuple[pa.Table, pa.Table]:
        """The index and errors tables of ``units``, in unit order.

        Exactly once across the whole set: a key already stored by an earlier unit (the same sample
        in two shards, or a shard listed twice) goes to the errors table as a duplicate.
        """
        ok, bad = [], []
        first: dict[str, str] = {}  # key -> the shard that stored it
        for u in units:
            t = self._read_unit(u)
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
            advice = ("remove index.parquet and errors.parquet and run the extract command again with --finalize: "
                      "it writes both again from the unit records")
            return (self._read_bound(self.path / "index.parquet", advice),
                    self._read_bound(self.path / "errors.parquet", advice))
        return self._read_records(sorted(self.committed_units()))

    def _read_bound(self, where: Path, advice: str) -> pa.Table:
        """index.parquet or errors.parquet, checked; in a bound set, that it is this set's (a table copied in from
        another set of the same row count would pair its keys and labels with these rows)."""
        table = self._read_table(where, advice)
        theirs = (table.schema.metadata or {}).get(b"set")
        if self.bound and theirs != self.fingerprint.encode():
            raise DamagedFile(where, f"is the table of set {(theirs or b'?')[:12].decode()}, not of this set "
                                     f"({self.fingerprint[:12]}): copied in from elsewhere?", advice)
        return table

    @property
    def index(self):
        """pandas DataFrame: key, label, shard, view, row, one line per stored row, in dataset order."""
        return self._tables[0].to_pandas()

    @property
    def errors(self):
        """pandas DataFrame: key, shard, reason, one line per sample that could not be used."""
        return self._tables[1].to_pandas()
