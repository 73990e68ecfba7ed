"""Datasets: manifests and shard lists, reading tar shards whole, decoding, and the extraction's stream.

Each input shard is one unit of work. A worker streams one shard at a time and yields `Batch`es
that never mix shards; the last batch of a shard carries its failed samples, or the reason the
whole shard failed, so that the writer can commit the shard or nothing.
"""
from .dataset import (IMAGE_KEYS, ROLES, DataError, Dataset, SampleError, ShardId, count_samples, detect_labels,
                      expand_shards, expand_vars, load_dataset, load_manifest, parse_labels, shard_id, shard_ids)
from .decode import check_resize, decode_image, decode_label
from .stream import Batch, UnitStream, check_pipes
from .tar import ShardError, open_shard, tar_problem

__all__ = ["IMAGE_KEYS", "ROLES", "Batch", "DataError", "Dataset", "SampleError", "ShardError", "ShardId",
           "UnitStream", "check_pipes", "check_resize", "count_samples", "decode_image", "decode_label",
           "detect_labels", "expand_shards", "expand_vars", "load_dataset", "load_manifest", "open_shard",
           "parse_labels", "shard_id", "shard_ids", "tar_problem"]
