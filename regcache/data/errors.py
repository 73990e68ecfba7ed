"""What can be wrong with input data: a manifest or shard list, a whole shard, one sample."""
from __future__ import annotations


class DataError(ValueError):
    """A manifest or shard list that cannot be used; the message names the file and the field."""


class MissingShards(DataError):
    """Local shards a dataset names that are not there (often: its ``${VARS}`` point elsewhere)."""


class SampleError(ValueError):
    """One sample that cannot be used (its key and reason go to the errors table)."""
