"""The unlabelled images the PH-Reg measurements distil on (docs/registers.md, "Post-hoc registers"):
Fashion-MNIST training images the demo never uses (it takes each class's first --per-class, at most 333), as
shards with a manifest of role anomaly (no labels are read).

    python bench/phreg_data.py OUT_DIR [--per-class 210] [--skip 400]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from regcache.demo import fashion_mnist, per_class
from regcache.shards import write_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=210, help="images of each of the 10 classes")
    ap.add_argument("--skip", type=int, default=400, help="each class's first images, left out (the demo's)")
    ap.add_argument("--sources", type=Path, default=Path("demo/sources"), help="where a download is kept")
    a = ap.parse_args()
    x, y = fashion_mnist("train", a.sources)
    idx = per_class(y, a.per_class, a.skip)
    n = len(idx)
    about = (f"{n} unlabelled Fashion-MNIST training images, each class's images {a.skip}..{a.skip + a.per_class - 1} "
             "(the demo uses the first)")
    manifest = write_set(a.out, "phreg-fmnist", ((f"fm-train-{i:05d}", x[i], None) for i in idx), n, 500,
                         role="anomaly", description=about)
    print(f"{n} images: {manifest}")


if __name__ == "__main__":
    main()
