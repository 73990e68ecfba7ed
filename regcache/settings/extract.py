"""Settings of the commands that run a backbone: extract, registers find, and what they share.

`Backbone` (which weights, built how) and `Preprocessing` (the eval transform) are bases of every
model-running command, so that each of those fields is written once. Fields marked with an
`Identity` make up a feature set's identity (`regcache.identity`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

from pydantic import Field, field_validator, model_validator

from ..features import DEFAULT_FEATURES, FEATURES, LAYER_FEATURES
from ..registry import MODELS
from .base import Cli, Meta, Settings, fields, meta
from .choices import (BACKBONE_DEVICE, CROP_MODES, DECODERS, DTYPES, EXTRACT_LAUNCHERS, HANDLERS, INTERPOLATIONS,
                      NEURON_AVERAGING, OUTLIER_TOKENS, PATCH_MODES, POS_EMBED, PRECISIONS, REGISTER_VALUES, ROLES,
                      literal)
from .types import RGB, Count, FeatureList, Layers, Pairs, PositiveRGB, UserPath


def default_cache_root() -> Path:
    """``$REGCACHE_CACHE``, else ``~/.cache/regcache``: where feature sets live."""
    return Path(os.environ.get("REGCACHE_CACHE") or Path.home() / ".cache" / "regcache").expanduser()


def weights_dir() -> Path:
    """``$REGCACHE_WEIGHTS``, else ``~/.cache/regcache/weights``: where weights made without a hub live."""
    return Path(os.environ.get("REGCACHE_WEIGHTS") or Path.home() / ".cache" / "regcache" / "weights").expanduser()


def split_spec(spec: str) -> tuple[str, int]:
    """``FILE[:K]`` -> (FILE, K), K registers, 1 when not given."""
    head, sep, tail = spec.rpartition(":")
    return (head, int(tail)) if sep and tail.lstrip("-").isdigit() else (spec, 1)


Cache = Annotated[UserPath, Cli(show="$REGCACHE_CACHE or ~/.cache/regcache"), Meta(scope="job"),
                  Field(default_factory=default_cache_root, description="Cache root for feature sets.")]


class Backbone(Settings):
    """Which weights, built how: what every command that runs a backbone takes."""

    model: Annotated[str, Cli(short="-m"), Meta(identity="backbone", scope="job", per_model=True), Field(
        description=f"Alias ({', '.join(MODELS)}; `regcache models` lists them) or any timm ViT name[.tag].")]
    checkpoint: Annotated[Optional[UserPath], Cli(metavar="FILE"), Meta(identity="backbone", scope="job", path=True, per_model=True),
                          Field(
        None, description="Local weights (.safetensors, or a torch file read weights-only) instead of the hub.")]
    random_init: Annotated[Optional[int], Cli(metavar="SEED"), Meta(identity="backbone", scope="job", per_model=True), Field(
        None, description="timm's random weights under this seed, no hub or checkpoint: smoke tests only "
                          "(recorded in the set; probe refuses it without --allow-random-init).")]
    model_args: Annotated[Pairs, Cli(flag="--model-arg", multiple=True, metavar="KEY=VALUE"),
                          Meta(identity="backbone", scope="job"), Field(
        default_factory=dict, description="Extra timm.create_model argument (repeatable), e.g. depth=2.")]
    pos_embed: Annotated[literal(POS_EMBED), Meta(identity="backbone", per_model=True), Field(
        "timm", description="Position-table resampling when the crop differs from the weights' size: "
                            + "; ".join(f"{k}: {v}" for k, v in POS_EMBED.items()) + ".")]

    @model_validator(mode="after")
    def _one_source(self):
        if self.checkpoint is not None and self.random_init is not None:
            raise ValueError("give either a checkpoint or random_init (--random-init), not both")
        return self

    @model_validator(mode="after")
    def _local_weights(self):
        """An alias whose weights come from a package registry (vits_offline) names its file in the weights
        folder; `regcache.offline` makes it on first use (`models.local_weights`)."""
        alias = MODELS.get(self.model)
        if alias is not None and alias.weights and self.checkpoint is None and self.random_init is None:
            object.__setattr__(self, "checkpoint", weights_dir() / alias.weights)
        return self


class Preprocessing(Settings):
    """The PIL eval transform (resize the shorter side, center-crop, normalise); None: the model's own."""

    size: Annotated[Optional[Count], Cli(show="the model's; 224 for the DINOv2/v3 aliases"),
                    Meta(identity="backbone", per_model=True), Field(None, description="Crop size (pixels).")]
    resize: Annotated[Optional[Count], Cli(show="size / the model's crop_pct; 256 for the aliases"),
                      Meta(identity="backbone", per_model=True), Field(
        None, description="The shorter side is resized to this before the crop.")]
    crop_mode: Annotated[Optional[literal(CROP_MODES)], Cli(show="the model's"), Meta(identity="backbone", per_model=True), Field(
        None, description="; ".join(f"{k}: {v}" for k, v in CROP_MODES.items()) + ".")]
    interpolation: Annotated[Optional[literal(INTERPOLATIONS)], Cli(show="the model's"), Meta(identity="backbone", per_model=True),
                             Field(None, description="Resize interpolation.")]
    mean: Annotated[Optional[RGB], Cli(metavar="R,G,B", show="the model's pretrained_cfg; ImageNet's for the aliases"),
                    Meta(identity="backbone", per_model=True), Field(None, description="Normalisation mean, e.g. 0.485,0.456,0.406.")]
    std: Annotated[Optional[PositiveRGB], Cli(metavar="R,G,B", show="the model's"), Meta(identity="backbone", per_model=True), Field(
        None, description="Normalisation std, e.g. 0.229,0.224,0.225 (each > 0).")]

    @model_validator(mode="after")
    def _resize_covers_crop(self):
        if self.size is not None and self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least the crop size ({self.size})")
        return self


class Registers(Settings):
    """Test-time registers (Jiang et al. 2025) added to a backbone trained without them."""

    test_time_registers: Annotated[Optional[str], Cli(metavar="FILE[:K]"), Meta(identity="backbone", path=True, per_model=True), Field(
        None, description="Add K test-time registers (default 1) driven by the neuron file of 'regcache registers "
                          "find': the set then has reg and reg_all (registers at the end of the layout).")]
    test_time_patches: Annotated[literal(PATCH_MODES), Meta(identity="backbone", per_model=True), Field(
        "zero", description="What the register neurons do at the patch tokens: "
                            + "; ".join(f"{k}: {v}" for k, v in PATCH_MODES.items()) + ".")]
    test_time_value: Annotated[literal(REGISTER_VALUES), Meta(identity="backbone", per_model=True), Field(
        "block", description="The activation each register neuron takes in the registers: "
                             + "; ".join(f"{k}: {v}" for k, v in REGISTER_VALUES.items()) + ".")]

    @field_validator("test_time_registers")
    @classmethod
    def _registers(cls, spec: str | None) -> str | None:
        if spec is not None and split_spec(spec)[1] < 1:
            raise ValueError(f"{spec!r}: K (after the colon) must be at least 1")
        return spec

    @property
    def register_file(self) -> tuple[Path, int] | None:
        """The neuron file and K of ``test_time_registers``."""
        if self.test_time_registers is None:
            return None
        file, k = split_spec(self.test_time_registers)
        return Path(os.path.expanduser(file)), k


class ExtractSettings(Registers, Preprocessing, Backbone):
    """`regcache extract`: stream a dataset through a backbone once and store its token features."""

    data: Annotated[str, Cli(short="-d"), Meta(identity="rows", scope="job"), Field(
        description="Manifest (manifests/NAME.yaml) or shard pattern such as 'shards/train-{000..099}.tar'.")]
    name: Annotated[Optional[str], Meta(scope="cli"), Field(
        None, description="Dataset name of a shard pattern, used by the cache path and by probe [default: its "
                          "folder's name]. Manifests name themselves.")]
    labels: Annotated[Optional[str], Cli(metavar="cls|json:FIELD|none"), Meta(identity="rows", scope="cli"), Field(
        None, description="Where a shard pattern's labels are [default: cls if the first sample has a .cls, else "
                          "none: stored unlabelled, label -1]. Manifests say it in their 'label' field.")]
    role: Annotated[Optional[literal(ROLES)], Meta(scope="cli"), Field(
        None, description="A shard pattern's role (anomaly: unlabelled). Manifests say it in their 'role' field.")]
    features: Annotated[Optional[FeatureList], Cli(short="-f", metavar="LIST",
                                                    show=f"{','.join(DEFAULT_FEATURES)}, those the model has"),
                        Meta(identity="rows"), Field(
        None, description=f"Comma list of {', '.join(FEATURES)}; {'/'.join(LAYER_FEATURES)}@-k of block -k "
                          "(counted from the last).")]
    layers: Annotated[Optional[Layers], Cli(metavar="LIST|lastN"), Meta(identity="rows"), Field(
        None, description=f"Also store {', '.join(LAYER_FEATURES)} (those in --features) of these blocks, named "
                          "NAME@-k, from the same forward pass: e.g. -4,-3,-2,-1 or last4 (DINOv2's linear "
                          "protocol), or block numbers from 0. Earlier blocks' tokens go through the final norm.")]
    decode: Annotated[literal(DECODERS), Meta(identity="backbone", per_model=True), Field(
        "pil", description="Where images are decoded and resized: "
                           + "; ".join(f"{k}: {v}" for k, v in DECODERS.items()) + ".")]
    views: Annotated[Count, Meta(identity="rows"), Field(
        1, description="Rows per image: view 0 is the plain crop, views 1.. are seeded random-resized crops.")]
    seed: Annotated[int, Meta(identity="rows"), Field(0, description="Seed of the augmented views.")]
    precision: Annotated[literal(PRECISIONS), Meta(identity="backbone"), Field(
        "fp32", description="Forward-pass precision (autocast): "
                            + "; ".join(f"{k}: {v}" for k, v in PRECISIONS.items()) + ".")]
    dtype: Annotated[literal(DTYPES), Meta(identity="rows"), Field("float16", description="Stored dtype.")]
    batch_size: Annotated[Count, Cli(short="-b"), Field(64, description="Images per forward pass.")]
    workers: Annotated[Optional[Annotated[int, Field(ge=0)]], Cli(short="-j", show="min(4, cores); 0 on a CPU "
                                                                                  "with 2 cores or fewer"), Field(
        None, description="DataLoader decode workers.")]
    device: Annotated[str, Field(**BACKBONE_DEVICE)]
    cache: Cache
    store: Annotated[Optional[UserPath], Meta(scope="cli"), Field(
        None, description="Write to this feature-set directory instead of the fingerprinted path under --cache.")]
    part: Annotated[int, Meta(scope="job"), Field(0, ge=0, description="With --num-parts: which part of the "
                                                                         "shards to do.")]
    num_parts: Annotated[Count, Meta(scope="job"), Field(
        1, description="Split the shards into this many parts (array jobs); the last part to finish writes the "
                       "index.")]
    unit_rows: Annotated[Optional[Count], Cli(show="the largest shard's samples × views"), Field(
        None, description="Rows reserved per shard in a new store.")]
    allow_pipe: Annotated[bool, Field(False, description="Permit 'pipe:' shard URLs, which run shell commands.")]
    compile: Annotated[bool, Field(False, description="torch.compile the model (pays off on long GPU runs).")]
    handler: Annotated[literal(HANDLERS), Field("record", description="Data errors: " + "; ".join(
        f"{k}: {v}" for k, v in HANDLERS.items()) + ".")]
    finalize: Annotated[bool, Meta(scope="cli"), Field(
        False, description="Extract nothing and load no model: find the set the other options make (give the "
                           "parts' options) and write its index if every part is committed, else list the missing "
                           "shards and exit 1.")]
    quiet: Annotated[bool, Meta(scope="cli"), Cli(short="-q"), Field(
        False, description="No progress bar, warnings only.")]
    launcher: Annotated[literal(EXTRACT_LAUNCHERS), Meta(scope="cli"), Field(
        "none", description="Where it runs: " + "; ".join(f"{k}: {v}" for k, v in EXTRACT_LAUNCHERS.items())
                            + " (as 'torchrun --nproc-per-node=N -m regcache extract ...').")]
    nproc_per_node: Annotated[Count, Meta(scope="cli"), Field(1, description="Ranks for --launcher torchrun.")]

    @model_validator(mode="after")
    def _part_in_range(self):
        if not self.part < self.num_parts:
            raise ValueError(f"part {self.part} is not in 0..{self.num_parts - 1} (num_parts {self.num_parts})")
        return self

    @model_validator(mode="after")
    def _device_decode(self):
        if self.decode == "device" and self.views > 1:
            raise ValueError("decode 'device' makes the plain crop only: use views 1, or decode 'pil' for "
                             "augmented views")
        if self.decode == "device" and self.device == "auto":  # planned on a login node, run on a GPU node
            raise ValueError("decode 'device' names its decoder in the set's identity: say which device decodes "
                             "(--device cuda for nvJPEG, or --device cpu), not auto")
        return self


class RegistersFindSettings(Preprocessing, Backbone):
    """`regcache registers find`: which MLP neurons write a model's high-norm tokens."""

    data: Annotated[str, Cli(short="-d"), Field(description="Manifest or shard pattern to take the images from.")]
    images: Annotated[Count, Cli(short="-n"), Field(500, description="Images to look at (the first ones).")]
    detect_layer: Annotated[Optional[int], Cli(show="the block whose patch norms are most heavy-tailed: 99th "
                                                    "percentile over median"), Field(
        None, description="Block (from 0, or -k from the last) whose high-norm patch tokens are the outliers.")]
    threshold: Annotated[Optional[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Cli(show="--percentile"),
                         Field(None, description="Outliers: patch-token norm above this at the detection block.")]
    percentile: Annotated[float, Field(99.0, gt=0, lt=100, description="Outliers: norm above this percentile of "
                                       "the detection block's patch norms (without --threshold).")]
    max_layer: Annotated[Optional[int], Cli(show="the detection block"), Field(
        None, description="Neurons of blocks up to this one compete.")]
    top_k: Annotated[Count, Cli(short="-k"), Field(10, description="Neurons kept.")]
    outliers: Annotated[literal(OUTLIER_TOKENS), Field("all", description="Which tokens can be outliers: " + "; ".join(
        f"{k}: {v}" for k, v in OUTLIER_TOKENS.items()) + ".")]
    averaging: Annotated[literal(NEURON_AVERAGING), Field("per-image", description="A neuron's score: " + "; ".join(
        f"{k}: {v}" for k, v in NEURON_AVERAGING.items()) + ".")]
    sparsity: Annotated[bool, Field(True, description="The authors' sparsity filter (their published notebook): in "
                                    "each image, a neuron scores only if its activation is below 0.5 at half of "
                                    "the tokens or more.")]
    batch_size: Annotated[Count, Cli(short="-b"), Field(16, description="Images per forward pass.")]
    out: Annotated[UserPath, Cli(short="-o", metavar="FILE"), Field(
        description="The neuron file (JSON) to write, for 'regcache extract --test-time-registers FILE[:K]'.")]


def backbone(identity: dict) -> dict:
    """The part of a set's identity every set that one head reads must share (weights, preprocessing, precision):
    its fields marked ``identity="backbone"``."""
    return {k: identity.get(k) for k in fields(ExtractSettings, identity=("backbone",))}


#: fields each model of a multi-model extraction has its own value of (`extract.extract_many`); the rest are the pass's
PER_MODEL: tuple[str, ...] = tuple(n for n in ExtractSettings.model_fields if meta(ExtractSettings, n).per_model)


class ListSettings(Settings):
    """`regcache ls`: the feature sets under a cache root."""

    cache: Cache
    as_json: Annotated[bool, Cli(flag="--json"), Field(False, description="One JSON object per feature set, for "
                                                                          "other tools.")]
