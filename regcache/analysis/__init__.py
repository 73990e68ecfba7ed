"""Why registers help: token norms, outlier tokens and feature maps from the cache (`norm_stats`); attention
maps and patch-embedding similarity from a small backbone pass (`backbone`); token probes (`token_probes`).
The claims are those of the reproducibility study of "Vision Transformers Need Registers".
"""
from .actions import Analysis, attention, featuremap, norms, tokenprobe
from .backbone import (attention_figure, attention_maps, attention_parts, last_block_attention,
                       neighbour_similarity, qkv_norms, qkv_report, similarity_report, token_norms)
from .norm_stats import (OUTLIER_PERCENTILE, NormSummary, feature_maps, load_norms, norms_report, outliers,
                    split_norms, summarize)
from .token_probes import PixelProbe, TokenProbe, pixel_probe, token_probe

#: analysis kind -> its action (`regcache.settings.ANALYSES` has their settings, by the same names)
ACTIONS = {"norms": norms, "featuremap": featuremap, "tokenprobe": tokenprobe, "attention": attention}

__all__ = ["ACTIONS", "Analysis", "attention", "featuremap", "norms", "tokenprobe", "OUTLIER_PERCENTILE", "NormSummary", "TokenProbe", "attention_figure", "attention_maps",
           "attention_parts", "feature_maps", "qkv_norms", "qkv_report", "PixelProbe", "pixel_probe",
           "last_block_attention", "load_norms", "neighbour_similarity", "norms_report", "outliers",
           "similarity_report", "split_norms", "summarize", "token_norms", "token_probe"]
