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

from ..digests import file_digest
from ..features import TokenLayout, parse_features
from .meta import ARRAYS, INDEX_SCHEMA, NAMES, DamagedFile, Description, SetRecord, StoreError
from .tables import read_table

_EMPTY = 2 ** 64 - 1  # a shard index entry of an inner chunk never written (all fill value)
_UNSIZED = -1         # a file a committed unit must have, whose size its record does not give (older records)


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
        out = {}
        for unit, p in self._units("failed").items():
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

    def _raw_shards(self, name: str) -> "_RawShards | None":
        """The direct reader of ``name`` when its zarr.json is a layout this version writes or wrote (one shard
        per unit of little-endian inner chunks, raw or each with its crc32c, zero fill); None for any other
        layout (older stores): zarr."""
        meta = self._zarr_json(name)
        shape, codecs = meta.get("shape", []), meta.get("codecs", [])
        little, crc = {"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}
        if (meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
                or meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") != [self.unit_rows, *shape[1:]]
                or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or meta.get("fill_value") != 0
                or np.dtype(meta.get("data_type")).byteorder == ">"):
            return None
        conf = codecs[0]["configuration"]
        inner = conf.get("chunk_shape", [])
        if (conf.get("codecs") not in ([little], [little, crc]) or conf.get("index_location", "end") != "end"
                or conf.get("index_codecs") not in ([little], [little, crc])
                or inner[1:] != shape[1:] or self.unit_rows % inner[0]):
            return None
        return _RawShards(inner[0], self.unit_rows // inner[0],
                          int(np.prod(shape[1:])) * np.dtype(meta["data_type"]).itemsize,
                          index_crc=len(conf["index_codecs"]) == 2, chunk_crc=len(conf["codecs"]) == 2)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in (self.path / ARRAYS).rglob("*") if f.is_file())

    # ------------------------------------------------------------------ checking

    def damage(self) -> list[DamagedFile]:
        """What is wrong with the set that shows without reading its features, one entry a file: tables,
        unit records or array metadata that do not read, and files of committed units missing or of
        another size than committed. Cheap enough for `regcache ls`; `verify` reads everything."""
        found: list[DamagedFile] = []
        _collect(found, lambda: self._tables)
        units = sorted(self.committed_units())
        for unit in units:
            _collect(found, lambda: self._record_meta(unit))
        for name in self.features:
            if _collect(found, lambda: self._zarr_json(name)):
                for unit in units:
                    _collect(found, lambda: self._unit_files(name, unit))
        return _unique(found)

    def verify(self) -> tuple[list[DamagedFile], list[str]]:
        """Everything `damage` checks, then every stored byte: each inner chunk against its crc32c (layouts
        the direct reader does not know are decoded by zarr, which checks what their codecs check), and
        the index and errors tables against the unit records they were written from. The problems, one
        a file, and notes on what could not be checked."""
        found, notes = self.damage(), [] if self.complete else [self._incomplete()]
        units = sorted(self.committed_units())
        tables = {self.path / "index.parquet", self.path / "errors.parquet", *map(self._record, units)}
        if self.complete and not tables & {p.path for p in found}:
            found += self._check_tables(units)
        for name in self.features:
            try:
                raw = self._raw_shards(name)
            except DamagedFile:
                continue  # named by `damage`
            if raw is not None and not raw.chunk_crc:
                notes.append(f"{name}: written before inner chunks had checksums; their shard indexes and sizes "
                             "were checked, not their bytes")
            for unit in units:
                try:
                    self._check_unit(name, unit, raw)
                except DamagedFile as e:
                    found.append(e if e.advice else DamagedFile(e.path, e.reason, self._redo(unit)))
        return _unique(found), notes

    def _check_unit(self, name: str, unit: int, raw: "_RawShards | None") -> None:
        """Every byte of ``unit``'s files of ``name`` against what the unit committed (a `DamagedFile` if not)."""
        files = self._unit_files(name, unit)
        if raw is not None:
            for path in files:
                raw.check(path, unit, self._unit_crcs(name, unit, path))
        elif files:
            self.read_rows(name, unit * self.unit_rows + np.arange(self.unit_rows))

    def unit_damage(self, unit: int) -> DamagedFile | None:
        """What is wrong with a committed unit's record or files, reading every byte (None: it is whole): a unit
        is copied into another set (`adopt_unit`) only when whole."""
        try:
            self._record_meta(unit)
            for name in self.features:
                self._check_unit(name, unit, self._raw_shards(name))
        except DamagedFile as e:
            return e
        return None

    def _check_tables(self, units: list[int]) -> list[DamagedFile]:
        """index.parquet and errors.parquet against the unit records they were written from."""
        advice = ("remove index.parquet and errors.parquet and run the extract command again with --finalize: "
                  "it writes both again from the unit records")
        where = self.path / "index.parquet"
        if len(units) < self.num_units:
            missing = sorted(set(range(self.num_units)) - set(units))
            return [DamagedFile(where, f"written, but the records of units {_few(missing)} are gone",
                                "copy them again from where this set came from, or remove the set and extract again")]
        ok, bad = self._read_records(range(self.num_units))
        found = []
        pairs = ((where, self._tables[0], ok), (self.path / "errors.parquet", self._tables[1], bad))
        for path, stored, records in pairs:
            if not stored.equals(records):
                same = "same count, other content" if len(stored) == len(records) else f"they give {len(records)}"
                found.append(DamagedFile(path, f"not what the unit records say ({len(stored)} rows; {same})", advice))
        return found

    def verify_weights(self) -> tuple[list[DamagedFile], list[str]]:
        """The checkpoint the set was extracted with, hashed whole again, against the sha256 in its identity (the
        digest extraction remembers per file version is not trusted here). Hub and random weights are named by
        the identity itself: nothing to read."""
        recorded, path = self.identity.get("checkpoint"), self.meta.model.checkpoint
        if not recorded:
            seed = self.identity.get("random_init")
            return [], [f"weights: {'random init, seed ' + str(seed) if seed is not None else 'from the hub, ' + self.identity['model']}: nothing to check"]
        if not path or not Path(path).is_file():
            return [DamagedFile(Path(path or "checkpoint"), "the checkpoint this set was extracted with is not there "
                                "(moved or removed): its weights cannot be checked")], []
        now = file_digest(path)
        if now != recorded:
            return [DamagedFile(Path(path), f"{now[7:23]}…, not the {recorded[7:23]}… this set was extracted with: "
                                "the cached features are of other weights")], []
        return [], [f"weights: {path} hashed whole, as recorded"]

    def verify_inputs(self) -> tuple[list[DamagedFile], list[str]]:
        """Each committed unit's input shard against the full sha256 of the bytes it was read from (recorded
        as the extraction read them): the cached features are still those of the shard's bytes. Units
        extracted before the hash was recorded, and remote shards, cannot be checked: the notes say so."""
        found: list[DamagedFile] = []
        checked, unrecorded, remote, moved = 0, [], [], []
        for unit in sorted(self.committed_units()):
            try:
                shard = self.unit_shard(unit) or {}
            except DamagedFile:
                continue  # named by `damage`
            if not shard.get("sha256"):
                unrecorded.append(self.shards[unit])
                continue
            if not shard.get("path"):
                remote.append(shard.get("url") or self.shards[unit])
                continue
            path = Path(shard["path"])
            try:
                digest = _sha256(path)
            except FileNotFoundError:  # the set is whole; its source cannot be compared (moved, or removed)
                moved.append(str(path))
                continue
            except OSError as e:
                found.append(DamagedFile(path, f"unreadable input shard of unit {unit} ({e})"))
                continue
            checked += 1
            if digest != shard["sha256"]:
                found.append(DamagedFile(
                    path, f"sha256 {digest[:16]}…, not the {shard['sha256'][:16]}… it had when unit {unit} was "
                          f"extracted from it ({shard.get('size')} bytes then, {path.stat().st_size} now): the cached "
                          "features are of other bytes",
                    f"restore the shard, or {self._reextract(unit)}"))
        notes = [f"input shards: {checked} of {checked + len(unrecorded) + len(remote) + len(moved)} read again and "
                 "hashed"]
        if moved:
            notes.append(f"input shards: {len(moved)} no longer where they were read from (moved or removed; the "
                         f"set is as it was, its source cannot be compared): {_few(moved)}")
        if unrecorded:
            notes.append(f"input shards: full sha256 not recorded for {len(unrecorded)} (extracted before regcache "
                         f"recorded it): {_few(unrecorded)}")
        if remote:
            notes.append(f"input shards: {len(remote)} remote, not checked: {_few(remote)}")
        return _unique(found), notes

    # ------------------------------------------------------------------ reading

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
                self._zarr_rows(arr, r, target, unit, NDBuffer)
            except StoreError:
                raise
            except Exception as e:  # zarr's errors (a checksum, a codec) do not say which file
                where = files[0] if len(files) == 1 else self.path / ARRAYS / name
                raise DamagedFile(where, f"zarr cannot read unit {unit}'s rows ({type(e).__name__}: {e})",
                                  self._redo(unit)) from None
        return out

    def _zarr_rows(self, arr, r: np.ndarray, target: np.ndarray, unit: int, NDBuffer) -> None:
        """Rows ``r`` (all of one unit) through zarr, for layouts the direct reader does not know."""
        if r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
            if NDBuffer is not None and target.dtype == arr.dtype and target.shape == (len(r), *arr.shape[1:]):
                # zarr decodes straight into our array: one copy fewer
                arr.get_basic_selection(slice(int(r[0]), int(r[-1]) + 1), out=NDBuffer.from_numpy_array(target))
                return
            block = arr[int(r[0]):int(r[-1]) + 1]
        else:
            lo = unit * self.unit_rows
            block = arr[lo:int(r.max()) + 1][r - lo]
        target[...] = block.reshape(target.shape)


class _RawShards:
    """Reads rows of one feature from its shard files as the Zarr v3 sharding spec lays them out: inner
    chunks (raw, or followed by their crc32c), and at the end an index of (offset, nbytes) uint64 pairs per
    inner chunk (all ones: not stored, i.e. fill value 0), then its crc32c. One ``preadv`` per inner chunk,
    straight into the caller's array: one pass over memory, as ``numpy.load``; zarr's path makes three.
    The index is checked (its crc32c, and that it points inside the file) and so is every chunk read
    whole; a chunk read in part is read whole into a scratch buffer to check it (at most the first and
    last of a span)."""

    def __init__(self, inner: int, chunks: int, row_bytes: int, index_crc: bool, chunk_crc: bool):
        self.inner, self.chunks, self.row_bytes = inner, chunks, row_bytes  # rows per inner chunk, chunks a shard
        self.index_crc, self.chunk_crc = index_crc, chunk_crc
        self.chunk_bytes = inner * row_bytes + 4 * chunk_crc  # as stored
        self._scratch: np.ndarray | None = None

    def read(self, path: Path | None, unit: int, first: int, out: np.ndarray,
             crcs: list[int | None] | None = None) -> None:
        """Rows [first, first + len(out)) of ``unit``'s shard file ``path`` (None: nothing stored, all fill
        value) into ``out`` (C-contiguous, the stored dtype). ``crcs``: each inner chunk's crc32c as committed
        (None for a chunk not stored), checked against every chunk read."""
        buf = out.reshape(len(out), -1).view(np.uint8)
        if path is None:
            buf[...] = 0
            return
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            index = self._index(fd, path, unit, crcs)
            last = first + len(out)
            for i in range(first // self.inner, (last - 1) // self.inner + 1):
                a, b = max(first, i * self.inner), min(last, (i + 1) * self.inner)
                dst = buf[a - first:b - first].reshape(-1)
                offset, skip = int(index[i, 0]), (a - i * self.inner) * self.row_bytes
                if offset == _EMPTY:
                    dst[...] = 0
                elif not self.chunk_crc:
                    self._pread(fd, path, [dst], offset + skip)
                elif b - a == self.inner:  # a whole chunk: into the caller's array, then its checksum
                    tail = bytearray(4)
                    self._pread(fd, path, [dst, tail], offset)
                    self._check(dst, tail, path, unit, i, crcs)
                else:
                    chunk = self._chunk(fd, path, unit, i, offset, crcs)
                    dst[...] = chunk[skip:skip + len(dst)]

    def check(self, path: Path, unit: int, crcs: list[int | None] | None = None) -> None:
        """Read every stored inner chunk of ``unit``'s shard file and check it (`regcache verify`)."""
        with open(path, "rb", buffering=0) as f:
            index = self._index(f.fileno(), path, unit, crcs)
            if self.chunk_crc:
                for i, offset in enumerate(index[:, 0]):
                    if offset != _EMPTY:
                        self._chunk(f.fileno(), path, unit, i, int(offset), crcs)

    def crcs(self, path: Path, unit: int) -> list[int | None] | None:
        """The stored crc32c of each inner chunk of a shard file (None for a chunk not stored), as the unit's
        record keeps them; None for a layout without chunk checksums."""
        if not self.chunk_crc:
            return None
        with open(path, "rb", buffering=0) as f:
            index = self._index(f.fileno(), path, unit)
            return [None if offset == _EMPTY else
                    int.from_bytes(os.pread(f.fileno(), 4, int(offset) + self.chunk_bytes - 4), "little")
                    for offset in index[:, 0]]

    def _chunk(self, fd: int, path: Path, unit: int, i: int, offset: int,
               crcs: list[int | None] | None = None) -> np.ndarray:
        """Inner chunk ``i`` whole, checked, in the scratch buffer (its rows' bytes, without the checksum)."""
        if self._scratch is None:
            self._scratch = np.empty(self.chunk_bytes, np.uint8)
        self._pread(fd, path, [self._scratch], offset)
        self._check(self._scratch[:-4], self._scratch[-4:], path, unit, i, crcs)
        return self._scratch[:-4]

    def _index(self, fd: int, path: Path, unit: int, crcs: list[int | None] | None = None) -> np.ndarray:
        """The shard index, checked: its crc32c, empty entries wholly empty, and every chunk of the stored
        size and inside the file (a cut file's tail is not an index); with ``crcs``, the chunks stored are
        those the unit committed."""
        size, n = os.fstat(fd).st_size, 16 * self.chunks + 4 * self.index_crc
        if size < n:
            raise DamagedFile(path, f"{size} bytes, shorter than its shard index ({n} bytes): cut short")
        raw = os.pread(fd, n, size - n)
        if self.index_crc and _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise DamagedFile(path, "its shard index fails its crc32c checksum: the file is damaged or cut short")
        index = np.frombuffer(raw, "<u8", count=2 * self.chunks).reshape(-1, 2)
        stored = index[:, 0] != _EMPTY
        limit = size - n - self.chunk_bytes  # the last offset a chunk can start at
        if ((index[~stored, 1] != _EMPTY).any() or (index[stored, 1] != self.chunk_bytes).any()
                or (stored.any() and (limit < 0 or (index[stored, 0] > limit).any()))):
            raise DamagedFile(path, f"its shard index does not fit the file ({size} bytes) or the array's "
                                    "inner chunks: the file is damaged or cut short")
        if crcs is not None and (len(crcs) != self.chunks or list(stored) != [c is not None for c in crcs]):
            raise DamagedFile(path, f"its inner chunks are not those unit {unit} committed: a file of another unit "
                                    "or set (copied in?)")
        return index

    @staticmethod
    def _pread(fd: int, path: Path, bufs: list, offset: int) -> None:
        want = sum(memoryview(b).nbytes for b in bufs)
        if os.preadv(fd, bufs, offset) != want:
            raise DamagedFile(path, "shorter than its shard index says: cut short")

    def _check(self, data: np.ndarray, stored, path: Path, unit: int, i: int,
               crcs: list[int | None] | None = None) -> None:
        rows = unit * self.inner * self.chunks + i * self.inner
        value = int.from_bytes(bytes(stored), "little")
        if _crc32c(data) != value:
            raise DamagedFile(path, f"inner chunk {i} (rows {rows}-{rows + self.inner - 1} of the array) fails its "
                                    "crc32c checksum: the file is damaged")
        if crcs is not None and crcs[i] != value:
            raise DamagedFile(path, f"inner chunk {i} (rows {rows}-{rows + self.inner - 1} of the array) is not the "
                                    f"chunk unit {unit} committed (another crc32c): a file of another unit or set "
                                    "(copied in?)")


def _collect(found: list, check) -> bool:
    """Run ``check``; a damaged file it meets goes to ``found``. Whether it passed."""
    try:
        check()
    except DamagedFile as e:
        found.append(e)
        return False
    return True


def _unique(found: list[DamagedFile]) -> list[DamagedFile]:
    """One entry a file (the first reason found): a damaged record fails every check that reads it."""
    seen: dict[Path, DamagedFile] = {}
    for e in found:
        seen.setdefault(e.path, e)
    return list(seen.values())


def _few(items: Sequence, n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _crc32c(data) -> int:
    """crc32c as the Zarr v3 codec computes it (google-crc32c, which zarr requires; bytes or a contiguous
    numpy array: it takes no writable memoryview)."""
    from google_crc32c import value

    return value(data)


def _ndbuffer():
    """zarr's buffer class, to decode into the caller's array. It is private API, so pyproject.toml bounds
    zarr to the tested minor version, and without it reads take the public path (one copy more)."""
    try:
        from zarr.core.buffer.cpu import NDBuffer
    except ImportError:
        return None
    return NDBuffer
