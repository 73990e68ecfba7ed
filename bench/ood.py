"""OOD scorers at scale: every registered scorer fitted on a training bank streamed from a store, then scored.

    python bench/ood.py [--rows 1281167] [--dim 1024] [--classes 1000] [--queries 50000] [--scorers all]
                        [--device cpu] [--store DIR]

A synthetic class-structured bank (--rows × --dim float16, ImageNet-1k train's size by default) is
written into a regcache store (kept in --store for reuse), and a fresh process fits and scores every
scorer through the same code path as `regcache score` (the bank read from the store in chunks, one bank
shared by all scorers, so a statistic two scorers need, e.g. the class moments, is computed by the first).
It prints, per scorer, the fit time, the time to score --queries queries, and the peak RSS during that
scorer (the kernel's high-water mark, reset before each scorer) above the process's RSS before the
first scorer (interpreter, torch, index, queries: the fixed allowance, printed first), over the bank's
bytes, and the scorer's notes (e.g. a rank-deficient covariance inverted on its support), as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 10_000  # rows per store unit


def synthetic(rows: int, dim: int, classes: int, seed: int, signal: float = 0.3):
    """Gaussian classes, features LayerNorm-like (signed, unit scale), in blocks of CHUNK rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32) * signal
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        y = rng.integers(0, classes, n)
        yield (centres[y] + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float16), y


def write_store(path: Path, rows: int, dim: int, classes: int) -> None:
    from common import set_record
    from regcache.features import TokenLayout
    from regcache.store import FeatureSet

    n_units = (rows + CHUNK - 1) // CHUNK
    fs = FeatureSet.create(path, {"model": "synthetic", "weights": "none", "features": ["cls"],
                                  "dataset": f"bank{rows}x{dim}"},
                           set_record(["cls"], TokenLayout(has_cls=True, num_reg=0, grid=(16, 16), dim=dim),
                                      "float16", CHUNK, n_units, name="bank"))
    for u, (x, y) in enumerate(synthetic(rows, dim, classes, seed=0)):
        fs.commit_unit(u, {"cls": x}, [(f"{u}-{i}", int(l), 0) for i, l in enumerate(y)])
    fs.finalize()


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(store: Path, classes: int, queries: int, scorers: list[str], device: str) -> None:
    """Fit and score every scorer in this fresh process; one JSON line per scorer."""
    import torch

    from regcache import ood
    from regcache.probe import Head, Split
    from regcache.probe.evaluate import _score
    from regcache.probe.run import _store_bank
    from regcache.store import FeatureSet

    fs = FeatureSet(store)
    idx = fs.index
    dim = fs.layout.dim
    bank = _store_bank(fs, "bank", idx.row.to_numpy(), idx.label.to_numpy(), idx.key.to_numpy())(("cls",), device)
    bank_bytes = len(idx) * dim * 2
    rng = np.random.default_rng(1)
    centres = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32) * 0.3  # the bank's classes
    head = Head(("cls",), 0.0, 0.0, torch.from_numpy(centres), torch.zeros(classes))
    x = np.concatenate([next(synthetic(queries // 2, dim, classes, seed=2))[0],  # ID-like half, far half
                        (rng.normal(size=(queries - queries // 2, dim)) * 1.5).astype(np.float16)])
    split = Split("queries", {"cls": x}, np.zeros(queries, int), np.arange(queries).astype(str), np.zeros(queries, int))
    lin = ood.Linear(head.weight.numpy(), head.bias.numpy())
    base = _kb("VmRSS")
    # the allowance: interpreter, torch, pandas, the index and the queries, before any scorer
    print(json.dumps({"baseline_rss_gb": round(base / 2**20, 2), "bank_gb": bank_bytes / 2**30, "rows": len(idx), "dim": dim,
                      "queries": queries}), flush=True)
    for name in ood.resolve(scorers):
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        t0 = time.perf_counter()
        sc = ood.make(name).fit(bank if ood.SCORERS[name].needs_bank else None, lin)
        t1 = time.perf_counter()
        s = _score(sc, head, split)
        t2 = time.perf_counter()
        print(json.dumps({"scorer": name, "fit_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2),
                          "peak_rss_gb": round(_kb("VmHWM") / 2**20, 2),
                          "peak_over_bank": round((_kb("VmHWM") - base) * 1024 / bank_bytes, 2),
                          "finite": bool(np.isfinite(s).all()), "notes": sc.notes}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_281_167)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--scorers", default="all", help="Comma list of scorer names, or all.")
    ap.add_argument("--device", default="cpu", help="Where k-NN and NNGuide search the bank.")
    ap.add_argument("--store", type=Path, default=None, help="Where the synthetic bank is kept, for reuse [default: a temporary folder, removed afterwards].")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    scorers = a.scorers.split(",")
    if a.child:
        return child(a.child, a.classes, a.queries, scorers, a.device)
    if a.store is None:  # a temporary bank is removed afterwards; --store keeps it for the next run
        with tempfile.TemporaryDirectory(prefix="regcache-bench-") as tmp:
            return measure(a, Path(tmp) / "bank")
    return measure(a, a.store)


def measure(a, store: Path) -> None:
    if not (store / "index.parquet").is_file():
        t0 = time.perf_counter()
        write_store(store, a.rows, a.dim, a.classes)
        print(json.dumps({"store_written_s": round(time.perf_counter() - t0, 1), "store": str(store)}), flush=True)
    from common import command, machine

    print(json.dumps({"machine": machine(), "command": command(), "python": platform.python_version()}), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", str(store), "--classes", str(a.classes), "--queries",
                    str(a.queries), "--scorers", a.scorers, "--device", a.device], check=True)
    print(json.dumps({"total_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
