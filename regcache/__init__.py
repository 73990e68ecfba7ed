"""regcache: run each frozen ViT over each dataset once, cache every token feature, probe from the cache."""
__version__ = "0.1.0"

from .features import DEFAULT_FEATURES, FEATURES, TokenLayout  # noqa: E402
from .store import FeatureSet, Features, list_feature_sets  # noqa: E402


def open_features(path) -> FeatureSet:
    """Open a feature set directory for reading: ``open_features(p).load("cls,reg")``."""
    return FeatureSet(path)


__all__ = ["DEFAULT_FEATURES", "FEATURES", "FeatureSet", "Features", "TokenLayout", "list_feature_sets",
           "open_features", "__version__"]
