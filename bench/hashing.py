"""Shard identity costs (issue 25): the full sha256 of every input shard, remembered per file version.

Measures, on ``--shards`` files of ``--mb`` MiB each in a temporary folder:

- ``recheck_s``: `shard_ids` over a cache whose digests are all remembered (a rerun, a pipeline's plan):
  one stat and one small memo read per shard, nothing hashed. Target: ≤ 1 s for 1,000 shards.
- ``hash_mb_s`` per thread count: `shard_ids` with an empty memo (a copy on a new machine, a new cache),
  every byte read and hashed, from the page cache (``--cold`` drops it first when run as root, so the disk
  is read). Beside it, ``read_mb_s``: the same files read without hashing (what the disk or the page
  cache gives), so hashing "at disk speed" is a ratio of one run.

    python bench/hashing.py --shards 1000 --mb 2 [--cold]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, load_average, machine  # noqa: E402

from regcache.data import Dataset, shard_ids  # noqa: E402


def drop_caches(cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 22):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--mb", type=float, default=2.0, help="MiB per shard")
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each read (root only)")
    args = ap.parse_args()
    load_before = load_average()
    root = Path(tempfile.mkdtemp(prefix="regcache-bench-hash-"))
    try:
        size = int(args.mb * (1 << 20))
        paths = []
        for i in range(args.shards):
            p = root / "shards" / f"s-{i:06d}.tar"
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(os.urandom(size))
            paths.append(p)
        old = time.time() - 3600
        for p in paths:  # settled files (older than the racy window), as a cache's shards are
            os.utime(p, (old, old))
        time.sleep(2.5)  # the change time that utime set is in the past too
        ds = Dataset("bench", tuple(map(str, paths)))
        total_mb = args.shards * size / (1 << 20)
        out = {"machine": machine(), "command": command(), "load_before": load_before, "shards": args.shards,
               "mib_per_shard": args.mb, "cold": args.cold}
        drop_caches(args.cold)
        t = time.perf_counter()
        read_all(paths)
        out["read_mb_s"] = round(total_mb / (time.perf_counter() - t), 1)
        for n in (int(x) for x in args.threads.split(",")):
            memo = root / f"memo-{n}"
            drop_caches(args.cold)
            t = time.perf_counter()
            ids = shard_ids(ds, memo, threads=n)
            out.setdefault("hash_mb_s", {})[n] = round(total_mb / (time.perf_counter() - t), 1)
        t = time.perf_counter()
        again = shard_ids(ds, memo)
        out["recheck_s"] = round(time.perf_counter() - t, 3)
        assert [i.digest for i in again] == [i.digest for i in ids]
        out["load_after"] = load_average()
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
