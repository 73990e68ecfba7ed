"""Stage 1: stream a dataset through a frozen ViT once and store every token feature.

`extract` takes `regcache.settings.ExtractSettings` (the CLI and pipelines build them the same way),
`extract_many` several models' settings for one pass over the data. `run` prepares the stores, `passes`
runs the models over the stream, `stream` turns shards into batches.
"""
from .run import (ExtractResult, default_workers, extract, extract_many, resolve_device, usable_cores,
                  verify_shards)
from .stream import Batch, UnitStream

__all__ = ["Batch", "ExtractResult", "UnitStream", "default_workers", "extract", "extract_many",
           "resolve_device", "usable_cores", "verify_shards"]
