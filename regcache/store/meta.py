"""What a feature set is: its schema, fingerprint, path, and the typed record of regcache.json.

`SetRecord` is everything regcache.json holds, checked when a set is opened (an unreadable or
malformed record is an error naming the file). Its ``identity`` is the dict that `regcache.identity`
derives from the extraction settings; the rest says what the model, the dataset and the run were.
A dataset's *description* (name, role, split, classes, class subset) is what its rows mean: the same
shards may be described by several manifests, each name with its own `Description` (`names/`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..features import FEATURES, TokenLayout
from ..names import slug
from ..registry import MODELS

#: 4: unit records bound to their set and unit, files with their chunks' crc32c, tables with page checksums and a
#: content digest, the identity from each shard's full sha256; 3: typed record, sampled shard digests (read only)
SCHEMA_VERSION = 4
READABLE = (3, 4)
META = "regcache.json"
ARRAYS = "features.zarr"
NAMES = "names"
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("shard", pa.string()),
                          ("view", pa.int16()), ("row", pa.int64())])
RECORD_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("view", pa.int16()),
                           ("row", pa.int64()), ("error", pa.string())])


class StoreError(RuntimeError):
    """A store that cannot be written or read as asked (fingerprint mismatch, unit overflow, …)."""


class DamagedFile(StoreError):
    """A file of a set (or an input shard) that is missing, cut short, unreadable or fails its checksum.

    ``path`` and ``reason`` apart, so that a check can list every damaged file with its reason.
    """

    def __init__(self, path: str | os.PathLike, reason: str, advice: str = ""):
        self.path, self.reason, self.advice = Path(path), reason, advice
        super().__init__(f"{path}: {reason}" + (f"; {advice}" if advice else ""))


def fingerprint(identity: dict) -> str:
    """sha256 of everything that determines a feature set's content, in canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def feature_set_path(root: str | os.PathLike, dataset: str, model: str, fp: str) -> Path:
    """``ROOT/DATASET/MODEL-FINGERPRINT12``: readable, and distinct for every distinct content."""
    return Path(root) / slug(dataset) / f"{slug(model)}-{fp[:12]}"


class Record(BaseModel):
    """A typed JSON record: unknown fields are refused, so a misspelt or foreign file is noticed."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @classmethod
    def read(cls, path: Path, what: str = "record"):
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as e:
            raise StoreError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "the file"
            raise StoreError(f"{path}: not a valid {what} ({where}: {first['msg']}); remove the set and "
                             "extract it again") from None

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()


class Description(Record):
    """What a dataset's rows mean: its name, role, split, class list and class subset (from its manifest)."""

    name: str
    role: Optional[str] = None
    split: Optional[str] = None
    classes: Optional[list[str]] = None
    subset: Optional[list[str]] = None


class DatasetRecord(Description):
    """The dataset as the set's creator described it, and its shards."""

    labels: str                      # cls, json:FIELD or none
    image: list[str]                 # member extensions tried for the image
    shards: list[str]                # names, as the index names them
    urls: list[str]                  # as read (${VARS} expanded)
    counts: Optional[list[Optional[int]]] = None  # declared per shard
    sizes: list[Optional[int]]       # per shard, declared or counted (for sizing and progress)
    content: str                     # `Dataset.content_id`: the shards' bytes and what the image and label are
    source: str                      # the manifest (absolute path) or shard pattern it was extracted from


class ModelRecord(Record):
    """The backbone as the user named it (the identity holds what it resolves to)."""

    name: str
    timm_name: str
    checkpoint: Optional[str] = None
    test_time_registers: Optional[dict[str, Any]] = None  # file, digest, k, patches, neurons


def weights_tag(model: str, checkpoint: str | os.PathLike | None, random_init: int | None = None) -> str:
    """`` (FILE)`` where the weights are a file the model's name does not imply (a distilled student, fine-tuned
    weights), `` (random-init SEED)`` for timm's random ones, else nothing: such a set never reads as the hub's
    model in a listing or a table."""
    if random_init is not None:
        return f" (random-init {random_init})"
    alias = MODELS.get(model)
    file = Path(checkpoint).name if checkpoint else None
    return f" ({file})" if file and file != (alias.weights if alias is not None else None) else ""


class Provenance(Record):
    created: str
    regcache: str
    timm: str
    torch: str
    zarr: str
    python: str
    host: str
    command: list[str]
    settings: dict[str, Any]  # the extraction settings as given


class SetRecord(Record):
    """regcache.json: written once, when the set is created."""

    schema_version: int
    fingerprint: str
    identity: dict[str, Any]
    features: tuple[str, ...]
    layout: TokenLayout
    dtype: str
    unit_rows: int
    num_units: int
    model: ModelRecord
    dataset: DatasetRecord
    provenance: Provenance

    @field_validator("layout", mode="before")
    @classmethod
    def _layout(cls, v: Any) -> Any:
        return TokenLayout.from_dict(v) if isinstance(v, dict) else v

    @field_validator("features")
    @classmethod
    def _features(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in v if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown features {', '.join(unknown)}")
        return v

    def model_dump(self, **kw) -> dict:
        out = super().model_dump(**kw)
        out["layout"] = self.layout.to_dict()
        return out

    @property
    def preprocess(self) -> dict[str, Any]:
        """The eval transform's settings, from the identity (`models.Preprocess` fields)."""
        i = self.identity
        return {"size": i["size"], "resize": i["resize"], "interpolation": i["interpolation"],
                "mean": tuple(i["mean"]), "std": tuple(i["std"]), "crop_mode": i["crop_mode"],
                "views": i["views"], "seed": i["seed"] or 0}

    @classmethod
    def open(cls, path: Path) -> "SetRecord":
        """The record of the set at ``path``; a set of another schema is refused with what to do."""
        where = path / META
        if not where.is_file():
            raise StoreError(f"{path} is not a regcache feature set (no {META})")
        try:
            version = json.loads(where.read_bytes()).get("schema_version")
        except (OSError, ValueError, AttributeError) as e:
            raise StoreError(f"{where} is unreadable ({e}); remove the set and extract it again") from None
        if version not in READABLE:
            raise StoreError(f"{path} has store schema {version}, which this regcache does not read (it reads "
                             f"schemas {', '.join(map(str, READABLE))}; the identity is derived differently, so the "
                             "set cannot be upgraded in place). Remove it and run the extract command again, or use "
                             "the regcache version that wrote it.")
        record = cls.read(where, "feature-set record")
        if record.fingerprint != fingerprint(record.identity):  # an edited or damaged identity names other settings
            raise StoreError(f"{where}: its identity does not hash to its fingerprint {record.fingerprint[:12]} "
                             "(edited or damaged): the set's features would be served for other settings; restore "
                             "the file from a copy, or remove the set and extract again")
        if record.unit_rows < 1 or len(record.dataset.shards) != record.num_units:
            raise StoreError(f"{where}: inconsistent record ({record.unit_rows} rows per unit, "
                             f"{len(record.dataset.shards)} shards for {record.num_units} units)")
        return record
