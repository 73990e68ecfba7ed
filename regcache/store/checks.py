"""`regcache verify` and the cheaper checks (`FeatureReader.damage`): a set's files against its records.

A mixin of `FeatureReader`: every method reads the set through the reader's record accessors. `damage` reads
no feature bytes (cheap enough for `regcache ls`); `verify` reads every byte, `verify_weights` the checkpoint
and `verify_inputs` the input shards, each against what the extraction recorded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..digests import file_digest
from .meta import DamagedFile
from .raw import RawShards


class Checks:
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

    def _check_unit(self, name: str, unit: int, raw: RawShards | None) -> None:
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
            what = f"random init, seed {seed}" if seed is not None else f"from the hub, {self.identity['model']}"
            return [], [f"weights: {what}: nothing to check"]
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
