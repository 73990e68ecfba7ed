"""Stage 1: stream a dataset through a frozen ViT once and store every token feature.

`extract` takes `regcache.settings.ExtractSettings` (the CLI and pipelines build them the same way);
`run` holds the loop, `stream` the input (shards to batches).
"""
from .run import ExtractResult, default_workers, extract, resolve_device, usable_cores, verify_shards
from .stream import Batch, UnitStream

__all__ = ["Batch", "ExtractResult", "UnitStream", "default_workers", "extract", "resolve_device", "usable_cores",
           "verify_shards"]
