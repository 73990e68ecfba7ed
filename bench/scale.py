"""Scaling figures in one run: images/s vs DataLoader workers, store read throughput vs .npy,
and peak RSS of extraction at 1x, 2x and 4x the data.

    python bench/scale.py [--images 96] [--workers 0,1,2] [--read-rows 200000]

Uses the same photo-sized JPEG shards as bench/extract.py and a random-weights ViT-S/14 checkpoint, at 224 px
(resize 256; a timm name alone would get timm's 518 px), bf16, batch 32.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_data(tmp: Path, images: int, per_shard: int = 32) -> str:
    sys.path.insert(0, str(HERE))
    from common import photo_samples

    from regcache.shards import write_shards

    paths = write_shards(photo_samples(images), str(tmp / f"s{images}" / "b-%04d.tar"), per_shard, ext="jpg")
    return str(tmp / f"s{images}" / f"b-{{0000..{len(paths) - 1:04d}}}.tar")


def extract_child(args) -> None:
    """In a fresh process: extract and print peak RSS (KB, VmHWM: getrusage would include the parent's) and img/s."""
    import regcache.extract.run as run
    from regcache.extract import extract
    from regcache.settings import ExtractSettings

    # the stream alone (first batch read to last commit): ExtractResult.stream_seconds now includes model loading
    stream, spent = run.run_pass, []

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return stream(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t)

    run.run_pass = timed
    res = extract(ExtractSettings(model="vit_small_patch14_reg4_dinov2", checkpoint=args.child_ckpt, data=args.child,
                                  cache=Path(args.child_cache), size=224, resize=256, precision="bf16", batch_size=32,
                                  workers=args.child_workers, quiet=True))
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_kb": hwm,
                      "img_s": res.ok / sum(spent), "rows": res.ok}))


def run_child(data: str, ckpt: Path, cache: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", data, "--child-ckpt", str(ckpt), "--child-cache",
                          str(cache), "--child-workers", str(workers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_throughput(tmp: Path, rows: int, dim: int = 1024) -> dict:
    """GB/s of FeatureSet.load (float16, the store's layout now) vs numpy reading the same bytes from an
    uncompressed .npy."""
    sys.path.insert(0, str(HERE))
    from probe import write_store

    from regcache.store import FeatureSet

    write_store(tmp / "read", rows, dim, 1000)
    fs = FeatureSet(tmp / "read")
    x = fs.load("cls,patch", dtype=np.float16).x
    np.save(tmp / "plain.npy", x)
    nbytes = x.nbytes
    del x
    subprocess.run(["sync"])
    best = {"store": 0.0, "npy": 0.0}
    for _ in range(3):  # alternate; the page cache holds both after the first round
        t = time.perf_counter()
        FeatureSet(tmp / "read").load("cls,patch", dtype=np.float16)
        best["store"] = max(best["store"], nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        np.load(tmp / "plain.npy")
        best["npy"] = max(best["npy"], nbytes / (time.perf_counter() - t) / 1e9)
    on_disk = fs.nbytes()
    return {"rows": rows, "bytes": nbytes, "store_gb_s": round(best["store"], 2), "npy_gb_s": round(best["npy"], 2),
            "store_over_npy": round(best["store"] / best["npy"], 2), "compression": round(nbytes / on_disk, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--read-rows", type=int, default=200_000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return extract_child(args)
    with tempfile.TemporaryDirectory(prefix="regcache-bench-") as tmp:  # removed afterwards
        _measure(args, Path(tmp))


def _measure(args, tmp: Path) -> None:
    import timm
    from safetensors.torch import save_file

    ckpt = tmp / "w.safetensors"
    save_file(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                img_size=224).state_dict(), str(ckpt))
    data = {k: make_data(tmp, k * args.images) for k in (1, 2, 4)}
    workers = {w: round(run_child(data[1], ckpt, tmp / f"cw{w}", w)["img_s"], 2)
               for w in (int(x) for x in args.workers.split(","))}
    memory = {f"{k}x": run_child(data[k], ckpt, tmp / f"cm{k}", 0) for k in (1, 2, 4)}
    from common import command, machine

    print(json.dumps({
        "machine": machine(), "command": command(),
        "img_s_by_workers": workers,
        "peak_rss_mb_by_data": {k: round(v["peak_kb"] / 1024) for k, v in memory.items()},
        "rows_by_data": {k: v["rows"] for k, v in memory.items()},
        "read": read_throughput(tmp, args.read_rows),
    }, indent=2))


if __name__ == "__main__":
    main()
