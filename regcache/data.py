"""Datasets: manifests and shard lists, WebDataset streaming, decoding, and per-sample errors.

Each input shard is one unit of work. A worker streams one shard at a time and yields `Batch`es
that never mix shards; the last batch of a shard carries its failed samples, or the reason the
whole shard failed, so that the writer can commit the shard or nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from braceexpand import braceexpand
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
ROLES = ("id-train", "id-val", "ood-gen", "anomaly")


class DataError(ValueError):
    """A manifest or shard list that cannot be used; the message names the file and the field."""


class SampleError(ValueError):
    """One sample that cannot be used (its key and reason go to the errors table)."""


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
    source: str = ""  # what identifies the data, before ${VARS} are expanded: what the digest hashes

    @property
    def digest(self) -> str:
        """Identifies the data independently of where ``${VARS}`` point on this machine."""
        return hashlib.sha256(self.source.encode()).hexdigest()

    def shard_name(self, unit: int) -> str:
        """How the index names a shard: its file name (a 'pipe:' command as it is)."""
        url = self.shards[unit]
        return url if url.startswith("pipe:") else Path(url).name


@dataclass(frozen=True)
class ShardId:
    """What one shard holds, cheaply: resolved path, size, and a digest of sampled bytes.

    The same manifest text can point at other images (another folder, regenerated shards), so a
    feature set's identity covers this, not only the text. ``digest`` is None for remote URLs
    (only their URL identifies them) and "missing" for a local file that is not there.
    """

    url: str
    path: str | None = None
    size: int | None = None
    digest: str | None = None


DIGEST_WINDOWS, DIGEST_WINDOW = 8, 1 << 16


def shard_id(url: str) -> ShardId:
    """Size and sha256 of 8 evenly spaced 64 KiB windows (first and last included; the whole file when small)."""
    if "://" in url or url.startswith("pipe:"):
        return ShardId(url)
    path = os.path.realpath(url)
    try:
        size = os.path.getsize(path)
        h = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            if size <= DIGEST_WINDOWS * DIGEST_WINDOW:
                h.update(f.read())
            else:
                for i in range(DIGEST_WINDOWS):
                    f.seek((size - DIGEST_WINDOW) * i // (DIGEST_WINDOWS - 1))
                    h.update(f.read(DIGEST_WINDOW))
    except FileNotFoundError:
        return ShardId(url, path, None, "missing")
    return ShardId(url, path, size, h.hexdigest())


def shard_ids(ds: "Dataset", threads: int = 8) -> list[ShardId]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(shard_id, ds.shards))


def expand_vars(text: str, where: str) -> str:
    """``${NAME}`` from the environment; an unset one is an error naming it."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise DataError(f"{where}: environment variable ${{{m.group(1)}}} is not set")
        return os.environ[m.group(1)]

    return re.sub(r"\$\{(\w+)\}", sub, text)


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
    if text.endswith((".yaml", ".yml")):
        ds = load_manifest(text)
        for flag, value in (("--name", name), ("--labels", labels), ("--role", role)):
            if value is not None:
                raise DataError(f"{text} is a manifest: {flag} applies to shard patterns only (set it in the manifest)")
        return ds
    if role is not None and role not in ROLES:
        raise DataError(f"role {role!r}: one of {', '.join(ROLES)}")
    shards = expand_shards(text)
    default = re.sub(r"[^\w.-]+", "_", Path(shards[0]).parent.name or "data").strip("_")
    if labels is None:
        labels = "none" if role == "anomaly" else detect_labels(shards[0])
    label_key, label_field = parse_labels(labels, "--labels")
    if role == "anomaly" and label_key is not None:
        raise DataError(f"--role anomaly stores no labels; drop --labels {labels}")
    name = name or default
    return Dataset(name=name, shards=shards, label_key=label_key, label_field=label_field, role=role,
                   source=json.dumps({"pattern": text, "name": name, "labels": labels, "role": role}, sort_keys=True))


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


def load_manifest(path: str | os.PathLike) -> Dataset:
    """Read a manifest (DESIGN §4); every malformed field is an error that names it and the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    text = path.read_text()
    try:
        m = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(m, dict):
        raise DataError(f"{path}: a manifest is a mapping of fields")

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
    split = field_("split", str)
    # what identifies the data: everything but the counts (which a scan may add) and free text
    identity = {"name": name, "split": split, "role": role, "shards": raw_shards, "image": image, "label": label,
                "classes": classes, "subset": subset}
    return Dataset(name=name, shards=shards, counts=tuple(counts) if counts else None,
                   image_keys=tuple(k.strip().lower() for k in image.split(";") if k.strip()),
                   label_key=label_key if role != "anomaly" else None, label_field=label_field,
                   classes=classes, role=role, split=split, subset=subset,
                   source=json.dumps(identity, sort_keys=True))


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
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
        return None
    from webdataset.tariterators import base_plus_ext

    try:
        with tarfile.open(url, "r:") as tar:
            keys = {base_plus_ext(m.name)[0] for m in tar if m.isreg() and not Path(m.name).name.startswith("__")}
    except (tarfile.TarError, OSError):
        return None
    return len(keys - {None})


# --------------------------------------------------------------------------- decoding

def decode_image(sample: dict, image_keys: Sequence[str]) -> Image.Image:
    """The sample's image as RGB; corrupt, empty, odd-mode and decompression-bomb images raise SampleError."""
    ext = next((k for k in image_keys if k in sample), None)
    if ext is None:
        raise SampleError(f"no image (looked for {', '.join(image_keys)}; has {', '.join(_exts(sample))})")
    data = sample[ext]
    if not data:
        raise SampleError(f"zero-length .{ext}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            # 16-bit and float modes would be clipped to 8 bits by convert(): refuse rather than guess
            if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
                raise SampleError(f"unsupported image mode {img.mode} (16-bit or float pixels)")
            return img.convert("RGB")
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError(f"decompression bomb: {e}") from e
    except Exception as e:
        raise SampleError(f"cannot decode .{ext}: {type(e).__name__}: {e}") from e


def check_resize(img: Image.Image, shorter: int | None) -> None:
    """Refuse an image whose resize (shorter side to ``shorter``) would exceed PIL's bomb limit.

    A 1x50000 strip passes PIL's own check yet resizes to 256 x 12.8M pixels (13.8 GB).
    """
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if shorter and limit and shorter * shorter * max(w, h) / max(1, min(w, h)) > limit:
        long_side = round(shorter * max(w, h) / max(1, min(w, h)))
        raise SampleError(f"{w}x{h} image would be resized to {shorter}x{long_side} pixels, over the "
                          f"{limit}-pixel limit (extreme aspect ratio; refused like a decompression bomb)")


def decode_label(sample: dict, ds: Dataset) -> int:
    """Class index, checked against the class list; -1 for unlabelled sets."""
    if ds.label_key is None:
        return -1
    if ds.label_key not in sample:
        raise SampleError(f"no label .{ds.label_key} (has {', '.join(_exts(sample))})")
    raw = sample[ds.label_key]
    try:
        value = json.loads(raw)[ds.label_field] if ds.label_field else raw.decode().strip()
        label = int(value)
        if str(label) != str(value).strip():
            raise ValueError
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, json.JSONDecodeError):
        shown = raw[:40].decode(errors="replace") if isinstance(raw, bytes) else raw
        raise SampleError(f"label {shown!r} is not an integer" +
                          (f" in json field '{ds.label_field}'" if ds.label_field else "")) from None
    if label >= 2 ** 63:
        raise SampleError(f"label {label} does not fit in 64 bits")
    if label < 0 or (ds.classes is not None and label >= len(ds.classes)):
        top = f"0..{len(ds.classes) - 1}" if ds.classes else "0.."
        raise SampleError(f"label {label} outside {top}")
    return label


def _exts(sample: dict) -> list[str]:
    return [k for k in sample if not k.startswith("__")]


# --------------------------------------------------------------------------- reading shards

TAR_BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as webdataset does


class ShardError(DataError):
    """A shard that cannot be read whole: missing, unreachable, truncated or damaged."""


class _Watched:
    """A read-only byte stream that counts what passes and remembers where the last non-zero byte was.

    Python's stream-mode tarfile takes a damaged or truncated header for the end of the archive;
    what was read past the last member tells the two apart: a real end is all zero bytes.
    """

    def __init__(self, raw):
        self.raw, self.pos, self.last_nonzero = raw, 0, -1

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        nonzero = len(data.rstrip(b"\0"))  # scans only the trailing zeros
        if nonzero:
            self.last_nonzero = self.pos + nonzero - 1
        self.pos += len(data)
        return data


def _decompressed(raw):
    """The tar bytes of a plain or gzip/bz2/xz-compressed shard (the decompressors detect truncation)."""
    import bz2
    import gzip
    import lzma

    head = raw.read(6)
    prefixed = _Prefixed(head, raw)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=prefixed)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(prefixed)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(prefixed)
    return prefixed


class _Prefixed:
    """``raw`` with bytes already read from it put back in front."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size is None or size < 0:
            out, self.head = self.head + self.raw.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out + (self.raw.read(size - len(out)) if len(out) < size else b"")


def tar_problem(size: int, end: int, last_nonzero: int, last: str | None) -> str | None:
    """Why a tar of ``size`` bytes whose last readable member ends at byte ``end`` is not whole, or None.

    Whole means: everything after that member is zero, and at least one zero block of the
    end-of-archive marker is there (a cut inside the marker's padding loses nothing).
    """
    after = f"after member {last!r} (byte {end})" if last else "at its start"
    if size == 0:
        return "read 0 bytes (an empty file, or a URL that could not be reached)"
    if last_nonzero >= end:
        return (f"damaged: unreadable tar header {after}; the {size - end} bytes that follow are not the "
                "end-of-archive marker, so the samples they hold would be lost")
    if size < -(-end // TAR_BLOCK) * TAR_BLOCK + TAR_BLOCK:
        return f"truncated: the file ends {after} with no end-of-archive marker ({size} bytes)"
    return None


def _open_url(url: str, allow_pipe: bool):
    if url.startswith("pipe:") and not allow_pipe:
        raise DataError(f"{url}: 'pipe:' URLs run shell commands; pass --allow-pipe to permit them")
    if "://" not in url and not url.startswith("pipe:"):
        if not os.path.exists(url):
            raise ShardError(f"{url}: no such file")
        return open(url, "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # a pipe's exit status: the error being raised already says what went wrong
        pass


def open_shard(url: str, allow_pipe: bool) -> Iterator[dict]:
    """WebDataset samples of one shard, grouped by key as webdataset groups them.

    Raises `ShardError` (after the samples read so far) when the shard is not whole, so that the
    caller commits the shard or nothing: a damaged tar never passes for a shorter one.
    """
    from webdataset.tariterators import group_by_keys

    import lzma
    import zlib

    raw = _open_url(url, allow_pipe)
    try:
        watched = _Watched(_decompressed(raw))
    except OSError as e:  # a 'pipe:' command or download that failed before its first bytes
        _close_quietly(raw)
        raise ShardError(f"could not be read: {e}") from None
    state = {"end": 0, "last": None}

    def members() -> Iterator[dict]:
        try:
            tar = tarfile.open(fileobj=watched, mode="r|")
        except tarfile.ReadError as e:
            if watched.pos == 0:
                return  # tar_problem names the empty file
            raise ShardError(f"not a tar file, or damaged at its start ({e})") from None
        for info in tar:
            state["end"], state["last"] = info.offset_data + info.size, info.name
            if info.isreg() and not _META.match(info.name):
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # stream mode would keep every header

    try:
        yield from group_by_keys(members())
        while watched.read(1 << 20):
            pass
    except (EOFError, OSError, tarfile.ReadError, zlib.error, lzma.LZMAError) as e:
        _close_quietly(raw)  # member data or a compressed stream cut short, or a source that gave nothing
        what = "could not be read" if watched.pos == 0 else "truncated or unreadable"
        raise ShardError(f"{what}: {type(e).__name__}: {e}") from None
    except BaseException:  # the reader stopped early, or another error: nothing more to check
        _close_quietly(raw)
        raise
    try:
        raw.close()
    except Exception as e:  # a failed 'pipe:' command or download says so on close
        raise ShardError(f"could not be read: {e}") from None
    problem = tar_problem(watched.pos, state["end"], watched.last_nonzero, state["last"])
    if problem:
        raise ShardError(problem)


# --------------------------------------------------------------------------- streaming

@dataclass
class Batch:
    """Up to ``batch_size`` rows of one unit (shard); ``end`` closes the unit with its accounting."""

    unit: int
    images: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    views: list[int] = field(default_factory=list)
    end: bool = False
    samples: int = 0                       # on `end`: samples read from the shard
    errors: list[tuple[str, str]] = field(default_factory=list)  # on `end`: (key, reason)
    shard_error: str | None = None         # on `end`: the shard failed as a whole
    shard: ShardId | None = None           # on `end`: what the shard held when it was read
    skipped: bool = False                  # on `end`: committed or claimed by another writer

    def pin_memory(self) -> "Batch":
        return replace(self, images=self.images.pin_memory()) if self.images is not None else self


def check_pipes(ds: Dataset, allow_pipe: bool) -> None:
    """'pipe:' URLs run shell commands: refused unless the user asked for them."""
    pipes = [u for u in ds.shards if u.startswith("pipe:")]
    if pipes and not allow_pipe:
        raise DataError(f"{ds.name}: {pipes[0]!r} runs a shell command; pass --allow-pipe to permit 'pipe:' URLs")


class UnitStream(torch.utils.data.IterableDataset):
    """Streams the given units (shard indices) split across DataLoader workers, shard by shard.

    ``transform(img, view, key)`` makes one view; each sample gives ``views`` rows.
    """

    def __init__(self, ds: Dataset, units: Sequence[int], transform: Callable[..., torch.Tensor],
                 views: int = 1, batch_size: int = 64, allow_pipe: bool = False, resize: int | None = None,
                 claim: Callable[[int], bool] | None = None):
        self.ds, self.units, self.transform, self.resize, self.claim = ds, list(units), transform, resize, claim
        self.views, self.batch_size, self.allow_pipe = views, batch_size, allow_pipe

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            yield from self.read_unit(unit)

    def read_unit(self, unit: int) -> Iterator[Batch]:
        """The batches of one unit; only an end batch marked ``skipped`` if another writer has it."""
        if self.claim is not None and not self.claim(unit):
            yield Batch(unit=unit, end=True, skipped=True)
            return
        url, ds = self.ds.shards[unit], self.ds
        rows: list[tuple[str, int, int, torch.Tensor]] = []
        errors: list[tuple[str, str]] = []
        seen: set[str] = set()
        n = 0
        sid = shard_id(url)  # what the shard holds as it is read, checked against the set's identity
        try:
            for sample in open_shard(url, self.allow_pipe):
                key = sample["__key__"]
                n += 1
                try:
                    if key in seen:
                        raise SampleError("duplicate key in shard")
                    seen.add(key)
                    img, label = decode_image(sample, ds.image_keys), decode_label(sample, ds)
                    check_resize(img, self.resize)
                    rows.extend((key, label, v, self.transform(img, v, key)) for v in range(self.views))
                except SampleError as e:
                    errors.append((key, str(e)))
                while len(rows) >= self.batch_size:
                    yield self._batch(unit, rows[: self.batch_size])
                    rows = rows[self.batch_size:]
            expected = ds.counts[unit] if ds.counts else None  # known counts catch a cut at a file boundary
            if expected is not None and n != expected:
                raise DataError(f"expected {expected} samples, read {n} (truncated or changed shard?)")
        except Exception as e:  # the shard as a whole: missing, truncated, unreadable
            # webdataset appends the stream and URL to args; the first is the message
            yield Batch(unit=unit, end=True, samples=n, shard=sid,
                        shard_error=f"{type(e).__name__}: {e.args[0] if e.args else e}")
            return
        if rows:
            yield self._batch(unit, rows)
        yield Batch(unit=unit, end=True, samples=n, errors=errors, shard=sid)

    @staticmethod
    def _batch(unit: int, rows: list) -> Batch:
        keys, labels, views, images = zip(*rows)
        return Batch(unit=unit, images=torch.stack(images), keys=list(keys), labels=list(labels), views=list(views))
