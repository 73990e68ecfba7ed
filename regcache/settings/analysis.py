"""Settings of the analyses: norms, featuremap, tokenprobe (cached sets) and attention (a backbone on images).

A cached set is named the same way by every command: a feature-set path, a name as `regcache ls`
prints it, or a dataset name with ``--model``.
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from .base import Cli, Meta, Settings
from .extract import Backbone, Cache, Preprocessing, Registers
from .types import Count, Names, Positive, UserPath

SETS_HELP = ("a feature-set path, a name as `regcache ls` prints it (DATASET/MODEL-FINGERPRINT), or a dataset name "
             "with --model")


class NamedSets(Settings):
    """Cached sets named on the command line, as every command names them."""

    sets: Annotated[Names, Cli(argument=True, multiple=True, metavar="SET..."), Field(
        min_length=1, description=f"The feature sets: {SETS_HELP}.")]
    model: Annotated[Optional[str], Cli(short="-m"), Meta(scope="job"), Field(
        None, description="The model whose sets SET names (alias, timm name or fingerprint prefix).")]
    cache: Cache


class VerifySettings(NamedSets):
    """`regcache verify`: sets checked whole, every byte of them and of their inputs."""


class CachedAnalysis(NamedSets):
    """An analysis of cached sets."""

    out: Annotated[Optional[UserPath], Meta(scope="cli"), Cli(show="runs/COMMAND-TIME"), Field(
        None, description="Output directory (must not exist, or be empty).")]


class NormsSettings(CachedAnalysis):
    """`regcache norms`: token norms from the cache, several sets side by side."""


class FeaturemapSettings(CachedAnalysis):
    """`regcache featuremap`: patch-norm grids of chosen images."""

    keys: Annotated[Names, Cli(metavar="LIST"), Field(min_length=1, description="Sample keys (comma list).")]
    images: Annotated[bool, Field(True, description="Draw the input crops beside the maps when the shards are "
                                                    "still where they were.")]


class TokenprobeSettings(CachedAnalysis):
    """`regcache tokenprobe`: read a patch token's grid position (and pixels) from the token."""

    iterations: Annotated[Count, Field(500, description="Steps of the position probe.")]
    seed: Annotated[int, Field(0, description="Seed of the held-out split and the probe.")]
    pixels: Annotated[bool, Field(False, description="Also: a ridge map from each patch token to its patch's pixels "
                                  "(read back from the shards), held-out RMSE for outlier against normal tokens.")]
    ridge: Annotated[Positive, Field(1.0, description="Ridge penalty of --pixels.")]


class AttentionSettings(Registers, Preprocessing, Backbone):
    """`regcache attention`: a backbone's last-block attention (and more) on a few images."""

    images: Annotated[list[UserPath], Cli(short="-i", multiple=True, metavar="FILE"), Meta(path=True), Field(
        min_length=1, description="Image files (repeat the option).")]
    registers: Annotated[bool, Field(False, description="Also draw each register's attention.")]
    similarity: Annotated[bool, Field(False, description="Also: cosine similarity of each patch embedding to its "
                                                         "neighbours, outliers vs the rest.")]
    qkv: Annotated[int, Cli(metavar="N"), Field(0, ge=0, description="Also: query, key and value norm maps of the "
                   "last N blocks, and their means at outlier patches vs the rest (qkv.json).")]
    display: Annotated[Count, Field(800, description="Pixels of each drawn map.")]
    out: Annotated[Optional[UserPath], Meta(scope="cli"), Cli(show="runs/attention-TIME"), Field(
        None, description="Output directory (must not exist, or be empty).")]


#: analysis kind -> its settings (a pipeline's analyses[].kind)
ANALYSES: dict[str, type[Settings]] = {"norms": NormsSettings, "featuremap": FeaturemapSettings,
                                       "tokenprobe": TokenprobeSettings, "attention": AttentionSettings}
