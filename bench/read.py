"""Store read throughput against ``numpy.load`` of the same bytes, per on-disk layout and read path; one run.

    python bench/read.py [--rows 200000] [--dim 1024] [--rounds 3]

Random float16 features (cls and patch of --dim each; real features compress by 9% at most, and
random ones not at all) are written as:
- ``raw shards + crc32c``: what the store writes now: one Zarr shard per unit of uncompressed inner
  chunks each followed by its crc32c, read straight from the shard files into the caller's array
  and checked (``--inner`` rows per inner chunk, several);
- ``raw shards, no checksums``: what it wrote before checksums, read the same way unchecked;
- ``blosc-lz4 chunk per unit``: what it wrote before that, read through zarr (decode into the array);
and as one uncompressed ``.npy``. Best of --rounds alternating rounds, all from the page cache.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def write(path: Path, rows: int, dim: int, layout, unit_rows: int = 10_000) -> None:
    import regcache.store.writer as writer
    from common import set_record
    from regcache.features import TokenLayout
    from regcache.store import FeatureSet

    old = writer.UnitWriter._create_arrays, writer.inner_rows
    if layout == "blosc":
        writer.UnitWriter._create_arrays = staticmethod(_blosc_arrays)
    elif isinstance(layout, tuple):  # ("unchecked", inner rows)
        writer.UnitWriter._create_arrays = staticmethod(lambda path, record: _unchecked_arrays(path, record, layout[1]))
    else:
        writer.inner_rows = lambda r, b: layout
    try:
        n_units = (rows + unit_rows - 1) // unit_rows
        fs = FeatureSet.create(path, {"model": "bench", "features": ["cls", "patch"], "layout": str(layout)}, set_record(
            ["cls", "patch"], TokenLayout(has_cls=True, num_reg=0, grid=(16, 16), dim=dim), "float16", unit_rows, n_units,
            model="bench"))
        rng = np.random.default_rng(0)
        for u in range(n_units):
            n = min(unit_rows, rows - u * unit_rows)
            fs.commit_unit(u, {f: rng.normal(size=(n, dim)).astype(np.float16) for f in ("cls", "patch")},
                           [(f"{u}-{i}", 0, 0) for i in range(n)])
        fs.finalize()
    finally:
        writer.UnitWriter._create_arrays, writer.inner_rows = old


def _blosc_arrays(path: Path, record) -> None:
    import zarr
    from zarr.codecs import BloscCodec

    group = zarr.open_group(path / "features.zarr", mode="a", zarr_format=3)
    dim = record.layout.dim
    for name in record.features:
        group.create_array(name, shape=(record.unit_rows * record.num_units, dim), chunks=(record.unit_rows, dim),
                           dtype="float16", fill_value=0, overwrite=True,
                           compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))


def _unchecked_arrays(path: Path, record, inner: int) -> None:
    import zarr

    group = zarr.open_group(path / "features.zarr", mode="a", zarr_format=3)
    dim = record.layout.dim
    for name in record.features:
        group.create_array(name, shape=(record.unit_rows * record.num_units, dim), shards=(record.unit_rows, dim),
                           chunks=(inner, dim), dtype="float16", fill_value=0, compressors=None, overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inner", default="250,1000", help="Rows per inner chunk of the raw layouts (comma list; divisors of the 10,000-row units).")
    args = ap.parse_args()
    from common import command, machine
    from regcache.store import FeatureSet

    with tempfile.TemporaryDirectory(prefix="regcache-read-") as tmp:
        tmp = Path(tmp)
        layouts = {f"raw shards + crc32c, {r}-row inner chunks": int(r) for r in args.inner.split(",")}
        last = int(args.inner.split(",")[-1])
        layouts[f"raw shards, no checksums (before), {last}-row inner chunks"] = ("unchecked", last)
        layouts["blosc-lz4 chunk per unit (before that)"] = "blosc"
        for i, (name, lay) in enumerate(layouts.items()):
            write(tmp / f"s{i}", args.rows, args.dim, lay)
        sets = {name: FeatureSet(tmp / f"s{i}") for i, name in enumerate(layouts)}
        x = next(iter(sets.values())).load(["cls", "patch"], concat=False, dtype=np.float16).x
        np.save(tmp / "cls.npy", x["cls"])
        np.save(tmp / "patch.npy", x["patch"])
        nbytes = x["cls"].nbytes + x["patch"].nbytes
        reuse = {f: np.empty_like(a) for f, a in x.items()}
        del x
        rows = next(iter(sets.values())).index.row.to_numpy()
        paths = {
            "numpy.load of .npy (fresh arrays)": lambda: [np.load(tmp / f"{f}.npy") for f in ("cls", "patch")],
        }
        for name, fs in sets.items():
            paths[f"{name}: load per feature (the probe's)"] = \
                lambda fs=fs: fs.load(["cls", "patch"], concat=False, dtype=np.float16)
            paths[f"{name}: load concatenated"] = lambda fs=fs: fs.load(["cls", "patch"], dtype=np.float16)
            paths[f"{name}: read_rows into reused arrays"] = \
                lambda fs=fs: [fs.read_rows(f, rows, out=reuse[f]) for f in ("cls", "patch")]
        best = dict.fromkeys(paths, 0.0)
        for _ in range(args.rounds):
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                best[name] = max(best[name], nbytes / (time.perf_counter() - t) / 1e9)
        npy = best["numpy.load of .npy (fresh arrays)"]
        print(json.dumps({
            "machine": machine(), "command": command(),
            "rows": args.rows, "bytes": nbytes, "on_disk": {n: fs.nbytes() for n, fs in sets.items()},
            "gb_s": {n: round(v, 2) for n, v in best.items()},
            "over_npy": {n: round(v / npy, 2) for n, v in best.items()}}, indent=1))


if __name__ == "__main__":
    main()
