"""The sharded embedding store (DESIGN §3).

Layout of one feature set (a directory whose name ends in its fingerprint)::

    regcache.json        identity, fingerprint, token layout, provenance (written once, at creation)
    features.zarr/NAME   one Zarr v3 array per feature, [units * unit_rows, *shape]; unit u owns the
                         rows [u*unit_rows, (u+1)*unit_rows), which are exactly one Zarr shard of
                         raw inner chunks (no codec: float16 features compress by 9% at most);
                         inner chunks that are all padding are not stored. Stores written with a
                         codec (blosc-lz4, before) read through zarr, as any zarr reader does
    units/UNIT.parquet   the commit record of a unit: one line per sample (row, or the error)
    units/UNIT.failed    why a unit (a whole shard) failed; retried by the next run
    index.parquet        key, label, shard, view, row of every stored sample, once all units are in
    errors.parquet       key, shard, reason of every sample that could not be used

The package keeps one concern a module: `meta` (schema, identity, the typed record), `writer`
(create, commit, claims, finalize), `reader` (index, errors, rows) and `resolve` (finding sets).
"""
from __future__ import annotations

from .meta import (ARRAYS, INDEX_SCHEMA, META, SCHEMA_VERSION, StoreError, StoreMeta, feature_set_path,
                   fingerprint, slug)
from .reader import FeatureReader, Features
from .writer import Claims, UnitWriter


class FeatureSet(UnitWriter, FeatureReader):
    """One feature set on disk: read it (`FeatureReader`), or create it and write units into it (`UnitWriter`)."""


from .resolve import find_feature_set, find_reusable, list_feature_sets, open_set  # noqa: E402  (resolve returns FeatureSets)

__all__ = ["ARRAYS", "INDEX_SCHEMA", "META", "SCHEMA_VERSION", "Claims", "FeatureReader", "FeatureSet", "Features",
           "StoreError", "StoreMeta", "UnitWriter", "feature_set_path", "find_feature_set", "find_reusable", "fingerprint",
           "list_feature_sets", "open_set", "slug"]
