"""Finding feature sets under a cache root."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from . import FeatureSet
from .meta import META, StoreError

log = logging.getLogger("regcache")


def list_feature_sets(root: str | os.PathLike) -> list[FeatureSet]:
    """Every readable feature set under a cache root, sorted by path; an unreadable one is named in a warning."""
    found = []
    for p in sorted(Path(root).expanduser().glob(f"**/{META}")):
        try:
            found.append(FeatureSet(p.parent))
        except StoreError as e:
            log.warning("skipped: %s", e)
    return found


def find_reusable(root: str | os.PathLike, identity: dict) -> FeatureSet | None:
    """A complete feature set with the same identity except that it stores at least the asked features."""
    identity = json.loads(json.dumps(identity))  # as stored: tuples become lists
    want = set(identity["features"])
    same = {k: v for k, v in identity.items() if k != "features"}
    for fs in list_feature_sets(root):
        ident = fs.meta["identity"]
        if {k: v for k, v in ident.items() if k != "features"} == same and want <= set(ident["features"]) \
                and fs.complete:
            return fs
    return None
