"""Finding feature sets under a cache root: every readable one, or the one with an exact identity."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .featureset import FeatureSet
from .meta import META, StoreError

log = logging.getLogger("regcache")


def list_feature_sets(root: str | os.PathLike, damaged: list | None = None) -> list[FeatureSet]:
    """Every readable feature set under a cache root, sorted by path. One that cannot be read is named in a
    warning, and appended to ``damaged`` as (path, reason) when that list is given."""
    found = []
    for p in sorted(Path(root).expanduser().glob(f"**/{META}")):
        try:
            found.append(FeatureSet(p.parent))
        except StoreError as e:
            log.warning("skipped: %s", e)
            if damaged is not None:
                damaged.append((p.parent, str(e)))
    return found


def find_reusable(root: str | os.PathLike, identity: dict,
                  sets: list[FeatureSet] | None = None) -> FeatureSet | None:
    """A complete feature set with the same identity, except that it may store more features than asked."""
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    want = set(identity["features"])
    same = {k: v for k, v in identity.items() if k != "features"}
    for fs in sets if sets is not None else list_feature_sets(root):
        ident = fs.identity
        if {k: v for k, v in ident.items() if k != "features"} == same and want <= set(ident["features"]) \
                and fs.complete:
            return fs
    return None
