"""What can be wrong with input data: a manifest or shard list, a whole shard, one sample."""
from __future__ import annotations


class DataError(ValueError):
    """A manifest or shard list that cannot be used; the message names the file and the field."""


class UnsetVariable(DataError):
    """A ``${NAME}`` that the environment (or a pipeline's ``vars``) does not set; ``name`` is NAME."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class MissingShards(DataError):
    """Local shards a dataset names that are not there (often: its ``${VARS}`` point elsewhere)."""


class SampleError(ValueError):
    """One sample that cannot be used (its key and reason go to the errors table)."""


#: what a missing, truncated or damaged input raises once the readers have named it (`ShardError` is a DataError;
#: the tar reader turns tar, zlib and lzma errors into it): recorded against the shard or sample. Anything else is
#: a bug in regcache and propagates with its traceback (settings.choices.HANDLERS).
DATA_ERRORS: tuple[type[BaseException], ...] = (DataError, SampleError, OSError, EOFError)
