"""Datasets: manifests and shard patterns, labels, and what each shard held (its digest)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from braceexpand import braceexpand

from .. import yamlio
from ..digests import file_digest, remembered
from ..names import did_you_mean, slug
from ..settings.choices import ROLES, SPLITS
from .errors import DataError, UnsetVariable
from .tar import open_shard

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


# --------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class Dataset:
    """One dataset split, as extraction needs it. ``shards`` are expanded URLs in their fixed order."""

    name: str
    shards: tuple[str, ...]
    counts: tuple[int | None, ...] | None = None  # per shard; None where unknown
    image_keys: tuple[str, ...] = IMAGE_KEYS
    label_key: str | None = "cls"
    label_field: str | None = None
    classes: tuple[str, ...] | None = None
    role: str | None = None
    split: str | None = None
    subset: tuple[str, ...] | None = None

    @property
    def labels(self) -> str:
        """Where the labels are, as manifests and ``--labels`` spell it: ``cls``, ``json:FIELD`` or ``none``."""
        if self.label_key is None:
            return "none"
        return f"json:{self.label_field}" if self.label_field else self.label_key

    def description(self) -> dict:
        """What a set's rows mean, beyond the rows themselves: its name, role, split and classes. Two
        descriptions of the same shards share one feature set (its rows), each name with its own meaning."""
        return {"name": self.name, "role": self.role, "split": self.split,
                "classes": list(self.classes) if self.classes else None,
                "subset": list(self.subset) if self.subset else None}

    def content_id(self, shards: Sequence["ShardId"]) -> str:
        """Identifies the rows a set of this data holds: the bytes of every shard (their `shard_id` digests, or
        the URL of a remote shard), which members are the image and the label. Not the name, nor where
        ``${VARS}`` point on this machine, nor how the shards were spelled."""
        if any(s.digest == UNHASHED for s in shards):
            raise ValueError("a content id needs every local shard's digest; some were not hashed")
        ids = [s.digest if s.digest not in (None, "missing") else f"url:{s.url}" for s in shards]
        return hashlib.sha256(json.dumps({"shards": ids, "image": list(self.image_keys), "labels": self.labels},
                                         sort_keys=True).encode()).hexdigest()

    def shard_name(self, unit: int) -> str:
        """How the index names a shard: its file name (a 'pipe:' command as it is)."""
        url = self.shards[unit]
        return url if url.startswith("pipe:") else Path(url).name


@dataclass(frozen=True)
class ShardId:
    """What one shard holds: resolved path, size, and the sha256 of every byte (`regcache.digests`).

    The same manifest text can point at other images (another folder, regenerated shards, a label
    fixed in place), so a feature set's identity covers the bytes, not only the text. ``digest`` is
    ``sha256:HEX``; None for remote URLs (only their URL identifies them), "missing" for a local file
    that is not there, and "unhashed" where a dry run found no remembered digest and read nothing.
    """

    url: str
    path: str | None = None
    size: int | None = None
    digest: str | None = None


UNHASHED = "unhashed"


def local_path(url: str) -> str | None:
    """The file a shard URL names on this machine (a plain path or ``file://``), or None for a remote one
    (``http://``, ``s3://``, ``pipe:``), which only its URL identifies."""
    local = url[len("file://"):] if url.startswith("file://") else url
    return None if "://" in local or local.startswith("pipe:") else local


def shard_id(url: str, memo: str | os.PathLike | None = None, read: bool = True) -> ShardId:
    """Size and full sha256 of a local shard, remembered in ``memo`` (`digests.file_digest`); with ``read``
    False only a remembered digest is used (nothing is read: "unhashed" when there is none)."""
    local = local_path(url)
    if local is None:
        return ShardId(url)
    path = os.path.realpath(local)
    try:
        size = os.path.getsize(path)
        if read:
            digest = file_digest(path, memo)
        else:
            digest = (remembered(path, memo) if memo is not None else None) or UNHASHED
    except FileNotFoundError:
        return ShardId(url, path, None, "missing")
    return ShardId(url, path, size, digest)


def shard_ids(ds: "Dataset", memo: str | os.PathLike | None = None, read: bool = True,
              threads: int | None = None) -> list[ShardId]:
    """`shard_id` of every shard, in order; those not remembered are hashed in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or min(16, max(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda u: shard_id(u, memo, read), ds.shards))


VAR = re.compile(r"\$\{(\w+)\}")


def expand_vars(text: str, where: str, env: Mapping[str, str] | None = None,
                missing: dict[str, str] | None = None) -> str:
    """``${NAME}`` from ``env`` (default: the environment). An unset one raises `UnsetVariable` naming it and
    ``where``; given ``missing`` (name -> where first met), it is recorded there instead and left as written."""
    env = os.environ if env is None else env

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name in env:
            return env[name]
        if missing is None:
            raise UnsetVariable(f"{where}: environment variable ${{{name}}} is not set", name)
        missing.setdefault(name, where)
        return m.group(0)

    return VAR.sub(sub, text)


def expand_shards(spec: str | Sequence[str], where: str = "shards") -> tuple[str, ...]:
    """A brace pattern, a list of patterns, or a comma-free path list -> the ordered shard URLs."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for p in patterns for u in braceexpand(expand_vars(str(p), where))]
    if not urls:
        raise DataError(f"{where}: no shard")
    return tuple(urls)


def load_dataset(data: str | os.PathLike, name: str | None = None, labels: str | None = None,
                 role: str | None = None) -> Dataset:
    """A manifest (``*.yaml``/``*.yml``) or a shard pattern such as ``data/train-{000..009}.tar``.

    For a pattern, ``labels`` is ``cls``, ``json:FIELD`` or ``none``; left out, it is ``cls`` if the
    first sample of the first shard has a ``.cls`` and ``none`` (label -1) if not, as a flat folder
    of anomaly images has. ``role`` anomaly means ``none``. A manifest says both itself.
    """
    text = str(data)
    if os.path.isdir(text):  # a folder of shards: its manifest says what they are
        inside = sorted(Path(text).glob("*.yaml")) + sorted(Path(text).glob("*.yml"))
        hint = (f"pass its manifest: {inside[0]}" if len(inside) == 1 else
                f"pass one of its manifests: {', '.join(map(str, inside))}" if inside else
                f"pass its manifest, or its shards as a pattern such as '{Path(text) / '*.tar'}' "
                f"({Path(text) / 'NAME-{000000..000009}.tar'})")
        raise DataError(f"{text} is a folder: {hint}")
    if text.endswith((".yaml", ".yml")):
        ds = load_manifest(text)
        for flag, value in (("--name", name), ("--labels", labels), ("--role", role)):
            if value is not None:
                raise DataError(f"{text} is a manifest: {flag} applies to shard patterns only (set it in the manifest)")
        return ds
    if role is not None and role not in ROLES:
        raise DataError(f"role {role!r}: one of {', '.join(ROLES)}")
    shards = expand_shards(text)
    default = slug(Path(shards[0]).parent.name or "data")
    if labels is None:
        labels = "none" if role == "anomaly" else detect_labels(shards[0])
    label_key, label_field = parse_labels(labels, "--labels")
    if role == "anomaly" and label_key is not None:
        raise DataError(f"--role anomaly stores no labels; drop --labels {labels}")
    return Dataset(name=name or default, shards=shards, label_key=label_key, label_field=label_field, role=role)


def parse_labels(spec: str, where: str) -> tuple[str | None, str | None]:
    """``cls`` / ``json:FIELD`` / ``none`` -> (label key, JSON field)."""
    if spec == "none":
        return None, None
    if spec.startswith("json:") and len(spec) > 5:
        return "json", spec[5:]
    if spec and ":" not in spec:
        return spec, None
    raise DataError(f"{where}: {spec!r} is not cls, json:FIELD or none")


def detect_labels(url: str) -> str:
    """``cls`` if the shard's first sample has a ``.cls`` member, else ``none`` (said in the log)."""
    import logging

    try:
        first = next(iter(open_shard(url, allow_pipe=False)), None)
    except (DataError, OSError):
        return "cls"  # the shard's own error is reported when it is read
    if first is not None and "cls" not in first:
        logging.getLogger("regcache").warning(
            "%s: its first sample has no .cls label; storing the set unlabelled (label -1). "
            "Pass --labels cls to require labels.", url)
        return "none"
    return "cls"


def read_yaml_mapping(path: Path, what: str, error: type[Exception]) -> tuple[str, dict]:
    """The text of a YAML file of fields (a manifest, a pipeline) and its mapping; ``error`` names the file."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        doc = yamlio.load(text)
    except yamlio.DuplicateKey as e:
        raise error(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise error(f"{path}: a {what} is a mapping of fields")
    return text, doc


def load_manifest(path: str | os.PathLike) -> Dataset:
    """Read a manifest (docs/design.md, "Datasets"); every malformed field is an error that names it and the file."""
    path = Path(path)
    text, m = read_yaml_mapping(path, "manifest", DataError)

    def field_(key: str, types: type | tuple[type, ...], required: bool = False) -> Any:
        if key not in m or m[key] is None:
            if required:
                raise DataError(f"{path}: missing field '{key}'")
            return None
        if not isinstance(m[key], types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise DataError(f"{path}: field '{key}' must be {names}, got {type(m[key]).__name__}")
        return m[key]

    unknown = set(m) - {"name", "split", "role", "shards", "counts", "image", "label", "classes",
                        "classes_file", "subset", "subset_file", "description", "source"}
    if unknown:
        raise DataError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
    name = field_("name", str, required=True)
    raw_shards = field_("shards", (str, list), required=True)
    # a relative local path is relative to the manifest, so shards and manifest can move together
    shards = tuple(u if "://" in u or u.startswith("pipe:") or os.path.isabs(u) else str(path.parent / u)
                   for u in expand_shards(raw_shards, f"{path}: field 'shards'"))
    counts = field_("counts", list)
    if counts is not None and (len(counts) != len(shards) or not all(isinstance(c, int) and c >= 0 for c in counts)):
        raise DataError(f"{path}: field 'counts' must list one non-negative integer per shard ({len(shards)})")
    role = field_("role", str)
    if role is not None and role not in ROLES:
        raise DataError(f"{path}: field 'role' is {role!r}; one of {', '.join(ROLES)}")
    split = field_("split", str)
    if split is not None and split not in SPLITS:
        raise DataError(f"{path}: field 'split' is {split!r}{did_you_mean(split, SPLITS)}; one of "
                        + "; ".join(f"{k} ({v})" for k, v in SPLITS.items()))
    image = field_("image", str) or ";".join(IMAGE_KEYS)
    label = field_("label", str) or "cls"
    label_key, label_field = parse_labels(label, f"{path}: field 'label'")
    classes = _name_list(m, "classes", path)
    subset = _name_list(m, "subset", path)
    if subset is not None and role == "anomaly":
        raise DataError(f"{path}: an anomaly set has no class subset")
    if subset is not None:
        if classes is None:
            raise DataError(f"{path}: field 'subset' needs the ID class list in 'classes' or 'classes_file'")
        outside = [c for c in subset if c not in set(classes)]
        if outside:
            raise DataError(f"{path}: field 'subset' names classes outside the ID classes: {', '.join(outside[:5])}")
    return Dataset(name=name, shards=shards, counts=tuple(counts) if counts else None,
                   image_keys=tuple(k.strip().lower() for k in image.split(";") if k.strip()),
                   label_key=label_key if role != "anomaly" else None, label_field=label_field,
                   classes=classes, role=role, split=split, subset=subset)


def _name_list(m: dict, key: str, path: Path) -> tuple[str, ...] | None:
    """An inline list under ``key`` or a one-name-per-line file under ``key_file`` (relative to the manifest)."""
    if m.get(key) is not None and m.get(f"{key}_file") is not None:
        raise DataError(f"{path}: give '{key}' or '{key}_file', not both")
    if m.get(f"{key}_file") is not None:
        f = path.parent / str(m[f"{key}_file"])
        if not f.is_file():
            raise DataError(f"{path}: field '{key}_file': {f} does not exist")
        return _unique(tuple(line.strip() for line in f.read_text().splitlines() if line.strip()), path,
                       f"{key}_file")
    if m.get(key) is None:
        return None
    if not isinstance(m[key], list) or not all(isinstance(c, (str, int)) for c in m[key]):
        raise DataError(f"{path}: field '{key}' must be a list of names")
    return _unique(tuple(str(c) for c in m[key]), path, key)


def _unique(names: tuple[str, ...], path: Path, key: str) -> tuple[str, ...]:
    """Labels are mapped by class name, so two classes of one name would merge silently."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{path}: field '{key}' names {', '.join(twice[:5])} more than once")
    return names


def count_samples(url: str) -> int | None:
    """Samples in a local tar, from its headers alone (seeks past the data); None if unreadable or remote."""
    url = local_path(url)
    if url is None or not os.path.isfile(url):
        return None
    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(url, "r:") as tar:
            keys = {base_plus_ext(m.name)[0] for m in tar if m.isreg() and not Path(m.name).name.startswith("__")}
    except (tarfile.TarError, OSError):
        return None
    return len(keys - {None})
