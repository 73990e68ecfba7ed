"""Removing feature sets (`regcache rm`, `regcache gc`), never one a run still reads unless asked.

A run's numbers are traced to its sets by their paths (config.json); removing a set a run names
would leave those numbers without their rows. So every run that reads sets records itself under the
cache root (``CACHE/.runs/*.json``: the run folder and the set paths), and `rm` and `gc` refuse a set
a run still names without ``force``. A record whose run folder is gone no longer counts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .sets import Cache, of_model
from .store import StoreError, list_feature_sets
from .store.meta import META

RUNS = ".runs"


def record_run(cache: str | os.PathLike, run: Path, sets: Iterable[Path]) -> None:
    """Remember that the run in folder ``run`` read ``sets`` (under ``cache``): `rm` and `gc` keep them."""
    folder = Path(cache).expanduser() / RUNS
    run = Path(run).resolve()
    entry = folder / f"{hashlib.sha256(str(run).encode()).hexdigest()[:16]}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"run": str(run), "sets": sorted({str(Path(s).resolve()) for s in sets})}))
        tmp.replace(entry)
    except OSError:  # a read-only cache: the run is not protected, nothing else is lost
        pass


def runs_naming(cache: str | os.PathLike) -> dict[Path, list[Path]]:
    """Set path -> the runs (folders that are still there) that read it."""
    out: dict[Path, list[Path]] = {}
    for entry in sorted((Path(cache).expanduser() / RUNS).glob("*.json")):
        try:
            d = json.loads(entry.read_text())
            run = Path(d["run"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not run.is_dir():
            continue
        for s in d.get("sets", []):
            out.setdefault(Path(s), []).append(run)
    return out


@dataclass
class Candidate:
    """A set `rm` or `gc` would remove, and why; ``runs``: the runs that still read it."""

    path: Path
    why: str
    runs: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.path} ({self.why})" + (f"; read by {len(self.runs)} run(s): {', '.join(map(str, self.runs[:3]))}"
                                              if self.runs else "")


def named(cache: Cache, refs: Iterable[str], model: str | None) -> list[Candidate]:
    """The sets ``refs`` name: a path or a name as `regcache ls` prints it (whatever the set's state), or a dataset
    name with ``model`` (every set of that name and model, complete or not)."""
    out = []
    for ref in refs:
        path = Path(os.path.expanduser(ref))
        hits = [p for p in (path, cache.root / ref) if (p / META).is_file() or (p / ".lock").is_file()]
        if hits:
            out.append(Candidate(hits[0].resolve(), "named"))
            continue
        if model is None:
            raise StoreError(f"{ref}: not a feature-set path, nor a name under {cache.root}; name a dataset with "
                             "--model (regcache ls lists the sets)")
        found = [fs for fs in cache.sets if of_model(fs, model) and ref in fs.names()]
        if not found:
            cache.find(ref, model)  # its error names what there is (and a near miss)
        out += [Candidate(fs.path.resolve(), "named") for fs in found]
    return out


def garbage(cache: Cache, unreferenced: bool = False) -> list[Candidate]:
    """The sets no one needs: empty (nothing committed), incomplete or unusable with no writer at work, folders
    a failed creation left, and with ``unreferenced`` complete sets no recorded run reads."""
    reads = runs_naming(cache.root)
    out = []
    for fs in list_feature_sets(cache.root):
        if fs.claims().holders():
            continue  # a writer is at work on it
        committed = fs.committed_units()
        if not fs.complete:
            why = ("empty: nothing committed" if not committed else
                   f"unusable: {fs.unusable()}" if fs.unusable() else
                   f"incomplete: {len(committed)} of {fs.num_units} shards committed, no writer at work")
        elif unreferenced and not reads.get(fs.path.resolve()):
            why = "unreferenced: no recorded run reads it"
        else:
            continue
        out.append(Candidate(fs.path.resolve(), why, reads.get(fs.path.resolve(), [])))
    for lock in Path(cache.root).glob("*/*/.lock"):  # a set folder whose creation failed (no record)
        folder = lock.parent
        if not (folder / META).is_file() and all(p.name == ".lock" for p in folder.iterdir()):
            out.append(Candidate(folder.resolve(), "no record: a creation that failed"))
    return out


def remove(candidates: list[Candidate], cache: Cache, force: bool = False) -> tuple[list[Candidate], list[Candidate]]:
    """Remove each candidate a run does not read (or every one, with ``force``); (removed, kept)."""
    reads = runs_naming(cache.root)
    removed, kept = [], []
    for c in candidates:
        c.runs = reads.get(c.path, [])
        if c.runs and not force:
            kept.append(c)
            continue
        shutil.rmtree(c.path)
        try:
            c.path.parent.rmdir()  # the dataset's folder, when no other set is in it
        except OSError:
            pass
        removed.append(c)
    return removed, kept


def listing(root: str | os.PathLike) -> list[dict]:
    """Every set under ``root`` as `regcache ls` shows it (``--json`` prints these): model, dataset names, features,
    counts, units, preprocessing, size on disk, when made, and each damaged file with why. A set whose record
    does not read is listed too, as damaged."""
    rows, unreadable = [], []
    for fs in list_feature_sets(root, damaged=unreadable):
        i, damage = fs.identity, fs.damage()
        try:
            counts = {"rows": len(fs.index), "failed": len(fs.errors)}
        except StoreError:  # a table that does not read: named in damage
            counts = {"rows": None, "failed": None}
        rows.append({"path": str(fs.path), "model": fs.meta.model.name, "label": fs.model_label(),
                     "checkpoint": fs.meta.model.checkpoint,
                     "dataset": list(fs.names()),
                     "features": list(fs.features), **counts,
                     "units": f"{len(fs.committed_units())}/{fs.num_units}", "complete": fs.complete,
                     "size": i["size"], "resize": i["resize"], "crop": i["crop_mode"], "decode": i.get("decode", "pil"),
                     "precision": i["precision"], "bytes": fs.nbytes(), "created": fs.meta.provenance.created,
                     "fingerprint": fs.fingerprint,
                     "damaged": [{"file": str(d.path), "reason": d.reason} for d in damage]})
    for path, reason in unreadable:
        rows.append({"path": str(path), "model": None, "label": None, "checkpoint": None, "dataset": None, "features": None, "rows": None,
                     "failed": None, "units": None, "complete": False, "size": None, "resize": None, "crop": None,
                     "decode": None, "precision": None, "bytes": None, "created": None, "fingerprint": None,
                     "damaged": [{"file": str(path / META), "reason": reason}]})
    return rows
