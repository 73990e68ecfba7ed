"""Datasets: manifests and shard lists, reading tar shards whole, and decoding one sample.

Each input shard is one unit of work; a shard is read whole or fails by name, and a sample that
cannot be used fails alone, with its key and the reason. Importing this package loads no torch.
"""
from .dataset import (IMAGE_KEYS, UNHASHED, VAR, Dataset, ShardId, count_samples, detect_labels, expand_shards, expand_vars,
                      load_dataset, load_manifest, local_path, parse_labels, shard_id, shard_ids)
from .decode import IMAGE_ERRORS, check_resize, decode_image, decode_label
from .errors import DATA_ERRORS, DataError, MissingShards, SampleError, UnsetVariable
from .tar import ShardError, open_shard, tar_problem

__all__ = ["DATA_ERRORS", "IMAGE_ERRORS", "IMAGE_KEYS", "UNHASHED", "VAR", "DataError", "Dataset", "MissingShards", "SampleError", "ShardError", "ShardId", "UnsetVariable", "check_resize",
           "count_samples", "decode_image", "decode_label", "detect_labels", "expand_shards", "expand_vars",
           "load_dataset", "load_manifest", "local_path", "open_shard", "parse_labels", "shard_id", "shard_ids", "tar_problem"]
