"""Getting data in: WebDataset shards from folders or arrays, manifests, and scanning shards once.

Shards written here are byte-identical on rerun (sorted input, fixed keys, fixed tar headers).
"""
from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from .data import (DATA_ERRORS, IMAGE_KEYS, DataError, Dataset, SampleError, decode_image, decode_label, load_manifest,
                   open_shard)

SUFFIXES = {f".{k}" for k in IMAGE_KEYS}


def write_shards(samples: Iterable[tuple], pattern: str, per_shard: int = 1000, ext: str = "png") -> list[str]:
    """Write ``(key, image, label[, ext])`` tuples as WebDataset tars ``pattern % i``; byte-identical on rerun.

    ``image`` is a PIL image, a uint8 array (H, W[, C]) or encoded bytes (stored as they are, under
    the sample's ``ext`` or the default); ``label`` None for unlabelled sets.
    """
    import numpy as np
    import webdataset as wds

    paths: list[str] = []
    writer = None
    try:
        for i, (key, image, label, *own_ext) in enumerate(samples):
            e = own_ext[0] if own_ext else ext
            if i % per_shard == 0:
                if writer is not None:
                    writer.close()
                paths.append(pattern % len(paths))
                Path(paths[-1]).parent.mkdir(parents=True, exist_ok=True)
                writer = wds.TarWriter(paths[-1], mtime=0.0, encoder=False)
            if not isinstance(image, bytes):
                img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
                buf = io.BytesIO()
                img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(e, e.upper()))
                image = buf.getvalue()
            record = {"__key__": key, e: image}
            if label is not None:
                record["cls"] = str(int(label)).encode()
            writer.write(record)
    finally:
        if writer is not None:
            writer.close()
    return paths


def manifest_text(name: str, shards: str, *, role: str | None = None, split: str | None = None,
                  counts: Sequence[int] | None = None, classes: Sequence[str] | None = None,
                  classes_file: str | None = None, subset_file: str | None = None, image: str | None = None,
                  label: str | None = "cls", description: str | None = None) -> str:
    """A manifest in the field order of docs/design.md ("Datasets") (flow lists keep it short and diff-friendly)."""
    lines = [f"name: {name}"]
    if description:
        lines.append(f"description: {json.dumps(description)}")
    lines += [f"{k}: {v}" for k, v in (("split", split), ("role", role)) if v]
    lines.append(f"shards: {json.dumps(shards)}")
    if counts is not None:
        lines.append(f"counts: [{', '.join(str(c) for c in counts)}]")
    if image:
        lines.append(f"image: {json.dumps(image)}")
    if label and role != "anomaly":
        lines.append(f"label: {label}")
    if classes is not None:
        lines.append(f"classes: [{', '.join(json.dumps(c) for c in classes)}]")
    if classes_file:
        lines.append(f"classes_file: {classes_file}")
    if subset_file:
        lines.append(f"subset_file: {subset_file}")
    return "\n".join(lines) + "\n"


def describe(ds: Dataset) -> str:
    """A manifest in one line: its name, role, split, shards, images and classes."""
    images = f"{sum(ds.counts):,} images" if ds.counts and None not in ds.counts else "images uncounted"
    classes = (f"{len(ds.classes)} classes" if ds.classes else "unlabelled" if ds.label_key is None else
               "no class list")
    subset = f" (a subset of {len(ds.subset)})" if ds.subset else ""
    role = ", ".join(x for x in (ds.role, ds.split) if x) or "no role"
    return f"{ds.name} ({role}): {images}, {classes}{subset}, {len(ds.shards)} shard{'s' if len(ds.shards) > 1 else ''}"


def write_new(path: Path, text: str) -> bool:
    """Write ``text`` unless the file holds it already (False); refuse to replace different content."""
    if path.exists():
        if path.read_text() == text:
            return False
        raise DataError(f"{path} exists with different content; remove it or choose another output")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


@dataclass
class FolderPlan:
    """What `from_folder` found: (key, file, label) in order, and the classes."""

    files: list[tuple[str, Path, int | None]]
    classes: list[str] | None
    subset: list[str] | None


def plan_folder(src: Path, classes: Sequence[str] | None = None, flat: bool = False) -> FolderPlan:
    """Sorted image files under ``src``; labelled by first-level folder unless ``flat``."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src} is not a folder")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{src}: no images ({', '.join(sorted(SUFFIXES))})")

    def key(p: Path) -> str:  # stable, and free of the dots webdataset splits keys on
        return re.sub(r"[.\s]", "_", str(p.relative_to(src).with_suffix("")))

    seen: dict[str, Path] = {}
    for p in files:  # x.png beside x.jpg, or "a b.png" beside "a_b.png": one key, and the shard would fail whole
        if (other := seen.setdefault(key(p), p)) != p:
            raise DataError(f"{other} and {p} would both be sample {key(p)!r}: rename one of them")

    if flat:
        return FolderPlan([(key(p), p, None) for p in files], None, None)
    folders = sorted({p.relative_to(src).parts[0] for p in files if len(p.relative_to(src).parts) > 1})
    loose = [p for p in files if len(p.relative_to(src).parts) == 1]
    if loose:
        raise DataError(f"{src}: {loose[0].name} is not inside a class folder (use --flat for unlabelled sets)")
    class_list = list(classes) if classes is not None else folders
    index = {c: i for i, c in enumerate(class_list)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataError(f"{src}: folders not in the class list: {', '.join(unknown[:5])}")
    subset = folders if classes is not None and len(folders) < len(class_list) else None
    return FolderPlan([(key(p), p, index[p.relative_to(src).parts[0]]) for p in files], class_list, subset)


def from_folder(src: str | os.PathLike, out: str | os.PathLike, name: str, *, classes: Sequence[str] | None = None,
                per_shard: int = 1000, flat: bool = False, role: str | None = None,
                split: str | None = None) -> Path:
    """An ImageFolder tree (or a flat folder) -> ``OUT/NAME-000000.tar``… and the manifest ``OUT/NAME.yaml``.

    Image bytes are stored as they are. A class list that the folders only partly cover (ImageNet-A
    and -R use 200 of the 1000 classes) makes them the set's class subset.
    """
    out = Path(out)
    plan = plan_folder(Path(src), classes, flat)
    extras: dict[str, Any] = {}
    if plan.classes is not None:
        if len(plan.classes) <= 50:
            extras["classes"] = plan.classes
        else:
            write_new(out / f"{name}.classes.txt", "\n".join(plan.classes) + "\n")
            extras["classes_file"] = f"{name}.classes.txt"
    if plan.subset is not None:
        write_new(out / f"{name}.subset.txt", "\n".join(plan.subset) + "\n")
        extras["subset_file"] = f"{name}.subset.txt"
    def samples():
        for key, path, label in plan.files:
            yield key, path.read_bytes(), label, path.suffix.lower().lstrip(".")

    return write_set(out, name, samples(), len(plan.files), per_shard,
                     role=role or ("anomaly" if flat else None), split=split, **extras)


def write_set(folder: Path, name: str, samples: Iterable[tuple], n: int, per_shard: int = 1000,
              **fields: Any) -> Path:
    """``n`` samples as ``FOLDER/NAME-000000.tar``… plus the manifest ``FOLDER/NAME.yaml`` (``fields`` go into it).

    An identical set already there is kept; a different one is refused before anything is written.
    """
    n_shards = max(1, -(-n // per_shard))
    counts = [min(per_shard, n - i * per_shard) for i in range(n_shards)]
    text = manifest_text(name, f"{name}-{{000000..{n_shards - 1:06d}}}.tar", counts=counts, **fields)
    manifest = folder / f"{name}.yaml"
    if manifest.exists():
        if manifest.read_text() != text:
            raise DataError(f"{manifest} exists with different content; remove {folder} or choose another output")
        if all((folder / f"{name}-{i:06d}.tar").is_file() for i in range(n_shards)):
            return manifest  # already written: shards are byte-identical by construction
    write_shards(samples, str(folder / f"{name}-%06d.tar"), per_shard)
    write_new(manifest, text)
    return manifest


# --------------------------------------------------------------------------- scanning

@dataclass
class ShardScan:
    shard: str
    count: int = 0
    labels: dict[int, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


def scan_shard(ds: Dataset, unit: int, allow_pipe: bool = False) -> ShardScan:
    """Decode every sample of one shard once (the same decoding extraction uses)."""
    url = ds.shards[unit]
    scan = ShardScan(ds.shard_name(unit))
    labels, formats = Counter(), Counter()
    try:
        for sample in open_shard(url, allow_pipe):
            scan.count += 1
            try:
                img = decode_image(sample, ds.image_keys)
                label = decode_label(sample, ds)
            except SampleError as e:
                scan.failures.append((sample["__key__"], str(e)))
                continue
            labels[label] += 1
            formats[next(k for k in ds.image_keys if k in sample)] += 1
            scan.widths.append(img.width)
            scan.heights.append(img.height)
    except DATA_ERRORS as e:  # the shard as a whole
        scan.error = f"{type(e).__name__}: {e.args[0] if e.args else e}"
    scan.labels, scan.formats = dict(labels), dict(formats)
    return scan


def check_keys(ds: Dataset, samples: int = 20, allow_pipe: bool = False) -> list[str]:
    """Warnings for image or label keys that none of the first samples of the first shard has (a typo in
    the manifest's ``image:`` or ``label:`` would otherwise fail every sample, or store none)."""
    try:
        head = [s for _, s in zip(range(samples), open_shard(ds.shards[0], allow_pipe))]
    except (DataError, OSError) as e:
        return [f"{ds.shards[0]}: cannot be read: {e}"]
    if not head:
        return [f"{ds.shards[0]}: holds no sample"]
    has = sorted({k for s in head for k in s if not k.startswith("__")})
    where = f"none of the first {len(head)} samples of {ds.shards[0]} has"
    warnings = []
    if not any(k in s for s in head for k in ds.image_keys):
        warnings.append(f"{where} an image under {';'.join(ds.image_keys)} (they have: {', '.join(has)})")
    if ds.label_key is not None and not any(ds.label_key in s for s in head):
        warnings.append(f"{where} a label .{ds.label_key} (they have: {', '.join(has)})")
    return warnings


@dataclass
class ManifestScan:
    manifest: str
    shards: list[ShardScan]

    @property
    def counts(self) -> list[int] | None:
        return None if any(s.error for s in self.shards) else [s.count for s in self.shards]

    def summary(self) -> str:
        import numpy as np

        n = sum(s.count for s in self.shards)
        labels, formats = Counter(), Counter()
        for s in self.shards:
            labels.update(s.labels)
            formats.update(s.formats)
        w = np.array([x for s in self.shards for x in s.widths])
        h = np.array([x for s in self.shards for x in s.heights])
        fails = [(s.shard, k, r) for s in self.shards for k, r in s.failures]
        lines = [f"{self.manifest}: {len(self.shards)} shards, {n} samples, {len(fails)} undecodable",
                 f"  formats: {', '.join(f'{k} {v}' for k, v in formats.most_common())}"]
        if len(w):
            lines.append(f"  size (w x h): min {w.min()}x{h.min()}, median {int(np.median(w))}x{int(np.median(h))}, "
                         f"max {w.max()}x{h.max()}")
        if labels:
            top = sorted(labels.items())
            shown = ", ".join(f"{k}: {v}" for k, v in top[:12]) + (" …" if len(top) > 12 else "")
            lines.append(f"  labels ({len(labels)} classes, {min(labels.values())}..{max(labels.values())} "
                         f"per class): {shown}")
        lines += [f"  failed sample {k} in {s}: {r}" for s, k, r in fails[:20]]
        if len(fails) > 20:
            lines.append(f"  … {len(fails) - 20} more in the sidecar")
        lines += [f"  failed shard {s.shard}: {s.error}" for s in self.shards if s.error]
        return "\n".join(lines)


def scan_manifest(path: str | os.PathLike, workers: int = 1, write: bool = True,
                  allow_pipe: bool = False) -> ManifestScan:
    """Read every shard once; write the per-shard counts into the manifest and the details to NAME.scan.json."""
    path = Path(path)
    ds = load_manifest(path)
    units = range(len(ds.shards))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            shards = list(pool.map(scan_shard, [ds] * len(units), units, [allow_pipe] * len(units)))
    else:
        shards = [scan_shard(ds, u, allow_pipe) for u in units]
    result = ManifestScan(str(path), shards)
    if write:
        path.with_suffix(".scan.json").write_text(json.dumps([asdict(s) for s in shards]))
        if result.counts is not None:
            path.write_text(set_counts(path.read_text(), result.counts))
    return result


def set_counts(text: str, counts: Sequence[int]) -> str:
    """Replace (or add) the manifest's ``counts`` field, leaving every other line as it was."""
    line = f"counts: [{', '.join(str(c) for c in counts)}]"
    pattern = re.compile(r"^counts:[^\n]*(?:\n[ \t]+-[^\n]*)*", re.M)
    if pattern.search(text):
        return pattern.sub(line, text, count=1)
    return text.rstrip("\n") + "\n" + line + "\n"
