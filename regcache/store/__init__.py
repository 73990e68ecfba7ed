"""The sharded embedding store (docs/design.md, "Store").

Layout of one feature set (a directory whose name ends in its fingerprint)::

    regcache.json        identity, fingerprint, token layout, provenance (written once, at creation)
    names/NAME.json      other descriptions of the same rows (another manifest's name, split, classes)
    features.zarr/NAME   one Zarr v3 array per feature, [units * unit_rows, *shape]; unit u owns the
                         rows [u*unit_rows, (u+1)*unit_rows), which are exactly one Zarr shard of
                         raw inner chunks (no codec: float16 features compress by 9% at most);
                         inner chunks that are all padding are not stored. Stores written with a
                         codec (blosc-lz4, before) read through zarr, as any zarr reader does
    units/UNIT.parquet   the commit record of a unit: one line per sample (row, or the error)
    units/UNIT.failed    why a unit (a whole shard) failed; retried by the next run
    index.parquet        key, label, shard, view, row of every stored sample, once all units are in
    errors.parquet       key, shard, reason of every sample that could not be used

The package keeps one concern a module: `meta` (schema, the typed record), `writer` (create, commit,
claims, finalize), `reader` (index, errors, rows), `featureset` (both) and `resolve` (finding sets
under a cache root). Importing it loads no torch.
"""
from __future__ import annotations

from .meta import (ARRAYS, INDEX_SCHEMA, META, SCHEMA_VERSION, DatasetRecord, Description, ModelRecord, Provenance,
                   SetRecord, StoreError, feature_set_path, fingerprint, slug)
from .featureset import FeatureSet
from .reader import FeatureReader
from .rows import Features
from .resolve import find_reusable, list_feature_sets
from .writer import Claims, UnitWriter

__all__ = ["ARRAYS", "INDEX_SCHEMA", "META", "SCHEMA_VERSION", "Claims", "DatasetRecord", "Description",
           "FeatureReader", "FeatureSet", "Features", "ModelRecord", "Provenance", "SetRecord", "StoreError",
           "UnitWriter", "feature_set_path", "find_reusable", "fingerprint", "list_feature_sets", "slug"]
