"""What a feature set is: its schema, identity, fingerprint, path, and the typed record of regcache.json."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..features import FEATURES, TokenLayout

SCHEMA_VERSION = 2  # 2: units record their input shard; keys are unique across shards
META = "regcache.json"
ARRAYS = "features.zarr"
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("shard", pa.string()),
                          ("view", pa.int16()), ("row", pa.int64())])
RECORD_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("view", pa.int16()),
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


@dataclass(frozen=True)
class StoreMeta:
    """The part of ``regcache.json`` that readers rely on, checked when a set is opened."""

    schema_version: int
    fingerprint: str
    identity: dict
    features: tuple[str, ...]
    layout: TokenLayout
    dtype: np.dtype
    unit_rows: int
    num_units: int
    shards: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> tuple["StoreMeta", dict]:
        """The typed record and the whole JSON (provenance and all) of the set at ``path``."""
        where = path / META
        if not where.is_file():
            raise StoreError(f"{path} is not a regcache feature set (no {META})")
        try:
            raw = json.loads(where.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{where} is unreadable ({e}); remove the directory and re-extract") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path} has store schema {version}; this regcache reads schema {SCHEMA_VERSION}. "
                             "Re-extract it (remove the directory), or use the regcache version that wrote it.")
        try:
            meta = cls(schema_version=version, fingerprint=str(raw["fingerprint"]), identity=dict(raw["identity"]),
                       features=tuple(raw["features"]), layout=TokenLayout.from_dict(raw["layout"]),
                       dtype=np.dtype(raw["dtype"]), unit_rows=int(raw["unit_rows"]), num_units=int(raw["num_units"]),
                       shards=tuple(raw["dataset"]["shards"]))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed field {e}; remove the directory and re-extract") from None
        unknown = [f for f in meta.features if f not in FEATURES]
        if unknown or meta.unit_rows < 1 or len(meta.shards) != meta.num_units:
            raise StoreError(f"{where}: inconsistent record (features {', '.join(unknown) or 'ok'}, "
                             f"{meta.unit_rows} rows per unit, {len(meta.shards)} shards for {meta.num_units} units)")
        return meta, raw
