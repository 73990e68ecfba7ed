"""A feature set on disk: the reading and writing halves in one class."""
from __future__ import annotations

from .reader import FeatureReader
from .writer import UnitWriter


class FeatureSet(UnitWriter, FeatureReader):
    """One feature set on disk: read it (`FeatureReader`), or create it and write units into it (`UnitWriter`)."""
