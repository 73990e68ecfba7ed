"""What the benchmarks share: a feature set's record for stores written without a backbone, and the machine.

A store is created with its identity (any dict: its fingerprint names the set) and the rest of its
typed record (`regcache.store.SetRecord`): `set_record` fills the fields extraction would write
(dataset, model, provenance) for a synthetic bank of ``num_units`` units, as tests/conftest.py's
``record`` does.
"""
from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone


def set_record(features, layout, dtype: str, unit_rows: int, num_units: int, *, name: str = "bench",
               model: str = "synthetic", classes: list[str] | None = None) -> dict:
    """The non-identity fields of a `SetRecord` for a hand-made set (``layout``: a `TokenLayout`)."""
    import timm
    import torch
    import zarr

    import regcache

    shards = [f"{name}-{u:06d}.tar" for u in range(num_units)]
    return {
        "features": list(features), "layout": layout, "dtype": dtype, "unit_rows": unit_rows, "num_units": num_units,
        "model": {"name": model, "timm_name": model},
        "dataset": {"name": name, "classes": classes, "labels": "cls", "image": ["jpg"], "shards": shards,
                    "urls": shards, "sizes": [None] * num_units, "content": f"synthetic:{name}",
                    "source": "synthetic (bench)"},
        "provenance": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "regcache": regcache.__version__, "timm": timm.__version__, "torch": torch.__version__,
                       "zarr": zarr.__version__, "python": platform.python_version(), "host": platform.node(),
                       "command": sys.argv, "settings": {}},
    }


def machine() -> str:
    """Host, CPU and the cores this process may use (its affinity), for the JSON reports."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.node()}: {cpu}, {cores} cores, {torch.get_num_threads()} torch threads{gpu}"


def command() -> str:
    """The command line that ran this benchmark, as one could paste it."""
    import shlex

    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def photo_samples(n: int, seed: int = 0):
    """``(key, JPEG bytes, label)``: random ~500x375 crops of scikit-image's photos, quality 90 (photo-sized
    JPEGs, the decode cost of ImageNet's)."""
    import io

    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    photos = [np.asarray(getattr(skdata, k)()) for k in ("astronaut", "coffee", "chelsea", "rocket", "retina")]
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = min(375, p.shape[0]), min(500, p.shape[1])
        y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
        buf = io.BytesIO()
        Image.fromarray(p[y:y + h, x:x + w]).save(buf, format="JPEG", quality=90)
        yield f"{i:06d}", buf.getvalue(), i % 10
