"""The presets beside their sources' rules, on real cached features (issue 26): the numbers docs/probing.md quotes.

    python bench/presets.py --cache CACHE -m MODEL --train fmnist-train --test fmnist-val [--features cls,cls,patch]

1. dinov3-logreg: `regcache probe --preset dinov3-logreg` against DINOv3's procedure written out with
   scikit-learn (dinov3/eval/log_regression.py): the stratified 10% split of dinov3/eval/data.py (torch.randperm
   under seed 0, per class the first floor(10%)), LogisticRegression(C, tol=1e-12, max_iter=1000) in float64 for
   each of the 45 C, the C of the best validation top-1 (the first on ties), refit on train + val, top-1 on the
   test set. Prints the C each picks and their test top-1.
2. dinov2-linear: the preset with its heads drawn from N(0, 0.01^2) (DINOv2's LinearClassifier) against zero
   init, at a few learning rates (--iterations steps of --batch-size, scaled down for a CPU): test top-1 of each.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, load_average, machine  # noqa: E402

from regcache.probe import probe  # noqa: E402
from regcache.sets import Cache  # noqa: E402
from regcache.settings import ProbeSettings  # noqa: E402


def dinov3_by_hand(x, y, xt, yt, seed: int = 0) -> dict:
    """DINOv3's logistic-regression evaluation with scikit-learn, from its source's definitions."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    val = []
    for c in np.unique(y):
        members = [p for p in perm if y[p] == c]
        val += members[:max(1, int(0.1 * len(members))) if len(members) > 1 else 0]
    is_val = np.zeros(len(y), bool)
    is_val[val] = True
    Cs = [float(c) for c in 10 ** torch.linspace(-6, 5, 45)]
    best, best_acc = None, -1.0
    for C in Cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m = LogisticRegression(C=C, tol=1e-12, max_iter=1000).fit(x[~is_val], y[~is_val])
        acc = m.score(x[is_val], y[is_val])
        if acc > best_acc:
            best, best_acc = C, acc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        final = LogisticRegression(C=best, tol=1e-12, max_iter=1000).fit(x, y)
    return {"C": best, "val_top1": round(100 * best_acc, 2), "test_top1": round(100 * final.score(xt, yt), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--features", default="cls;cls,patch", help="combinations, ';'-separated")
    ap.add_argument("--lr", default="1e-4,1e-3,1e-2", help="dinov2-linear: base learning rates (before ×batch/256)")
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    combos = args.features.split(";")
    out = {"machine": machine(), "command": command(), "load_before": load_average()}
    cache = Cache(args.cache)
    tmp = Path(tempfile.mkdtemp())

    # 1. dinov3-logreg
    rows = []
    for combo in combos:
        t = time.perf_counter()
        r = probe(ProbeSettings.make({"model": args.model, "train": args.train, "test": args.test, "cache": args.cache,
                                      "preset": "dinov3-logreg", "features": [combo], "quiet": True,
                                      "out": tmp / f"v3-{combo}", "plots": False}))
        ours_s = time.perf_counter() - t
        df = r.results
        test = df[(df.role == "id") & (df.metric == "top1")].value.iloc[0]
        head = r.heads[tuple(combo.split(","))]
        train = cache.find(args.train, args.model, combo.split(",")).fs.load(combo, views=[0])
        test_set = cache.find(args.test, args.model, combo.split(",")).fs.load(combo)
        t = time.perf_counter()
        ref = dinov3_by_hand(train.x.astype(np.float64), train.labels, test_set.x.astype(np.float64), test_set.labels)
        rows.append({"features": combo, "regcache": {"C": float(f"{head.C:.4g}"),
                                                     "val_top1": round(100 * head.val_acc, 2),
                                                     "test_top1": round(100 * test, 2), "s": round(ours_s, 1)},
                     "dinov3_by_hand": {**ref, "C": float(f"{ref['C']:.4g}"),
                                        "s": round(time.perf_counter() - t, 1)}})
        print(json.dumps(rows[-1]), flush=True)
    out["dinov3_logreg"] = rows

    # 2. dinov2-linear: the heads' start
    rows = []
    lrs = [float(v) for v in args.lr.split(",")]
    for init in ("normal", "zeros"):
        r = probe(ProbeSettings.make({"model": args.model, "train": args.train, "test": args.test, "cache": args.cache,
                                      "preset": "dinov2-linear", "features": combos, "lr": lrs, "init": init,
                                      "iterations": args.iterations, "batch_size": args.batch_size, "quiet": True,
                                      "out": tmp / f"v2-{init}", "plots": False}))
        for h in r.candidates:  # every head on the test set, not only the selected ones
            from regcache.probe import accuracy, load_split, map_labels
            named = cache.find(args.test, args.model, list(h.features))
            split = map_labels(load_split(named.fs, list(h.features), named.name), named, r.classes, len(r.classes))
            rows.append({"init": init, "features": h.name, "lr": h.lr,
                         "test_top1": round(100 * accuracy(h.logits(split), split.labels), 2)})
    out["dinov2_linear_init"] = rows
    for row in rows:
        print(json.dumps(row))
    out["load_after"] = load_average()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
