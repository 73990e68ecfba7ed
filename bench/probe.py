"""Probe speed: all heads in one pass vs one head, vs scikit-learn, and peak memory; one run.

    python bench/probe.py [--rows 200000] [--dim 1024] [--classes 1000] [--iterations 20]
    python bench/probe.py --grid        # the lbfgs C grid against scikit-learn, head by head
    python bench/probe.py --dinov3 SET --feature cls [--baseline REV]   # DINOv3's grid to convergence

--dinov3: the DINOv3 preset's grid (45 C from 1e-6 to 1e5, tol 1e-12, at most 1,000 iterations) on the rows of a
cached set (view 0): regcache's lbfgs_grid (all 45 heads in one call), the same function as of git revision
REV (what this costs against the code before), and scikit-learn's LogisticRegression fitted 45 times one after
another (DINOv3's solver: float64, tol 1e-12, max_iter 1000). Prints each C's objective C·ΣCE + ½‖W‖² for
the three, iterations, and the times.

--grid: 3 feature combinations x 13 C values = 39 heads, fitted by `--solver lbfgs` in one call
per combination and by scikit-learn's LogisticRegression (lbfgs) one after another, both at
scikit-learn's defaults (tol 1e-4, 100 iterations), on two problems (8,000 rows x 768 dims x 100
classes; 50,000 rows x 2048 dims x 10 classes) with anisotropic features (covariance eigenvalues
~ 1/j, as ViT features' spectra decay). Prints both times and every head's held-out accuracy.

Synthetic class-structured features shaped like ImageNet (two features of --dim each, float16,
--classes classes) are written into a regcache store, then:
1. time per iteration for all heads (3 combinations x 4 learning rates) / for one head;
2. regcache vs scikit-learn's LogisticRegression (lbfgs) on a subset where sklearn finishes:
   wall time and held-out accuracy;
3. peak RSS of a child process that loads the set and trains all heads, over the feature bytes.
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


def synthetic(rows: int, dim: int, classes: int, seed: int = 0, signal: float = 0.08):
    """Gaussian classes, close enough together that no linear head reaches 100%."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 2 * dim)).astype(np.float32) * signal
    y = rng.integers(0, classes, rows)
    for start in range(0, rows, 10_000):
        sl = slice(start, min(rows, start + 10_000))
        x = centres[y[sl]] + rng.normal(size=(sl.stop - sl.start, 2 * dim)).astype(np.float32)
        yield x[:, :dim].astype(np.float16), x[:, dim:].astype(np.float16), y[sl]


def write_store(path: Path, rows: int, dim: int, classes: int) -> None:
    from common import set_record
    from regcache.features import TokenLayout
    from regcache.store import FeatureSet

    layout = TokenLayout(has_cls=True, num_reg=4, grid=(16, 16), dim=dim)
    ident = {"model": "synthetic", "weights": "none", "features": ["cls", "patch"], "dataset": f"syn{rows}"}
    n_units = (rows + 9999) // 10_000
    fs = FeatureSet.create(path, ident, set_record(["cls", "patch"], layout, "float16", 10_000, n_units, name="syn"))
    for u, (cls, patch, y) in enumerate(synthetic(rows, dim, classes)):
        fs.commit_unit(u, {"cls": cls, "patch": patch}, [(f"{u}-{i}", int(l), 0) for i, l in enumerate(y)])
    fs.finalize()


def _status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process (getrusage's maxrss would include the parent's, inherited at exec)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_peak(path: Path, classes: int, iterations: int) -> None:
    """Run in a fresh process: load and train all heads, print RSS numbers."""
    from regcache.probe import load_split, train_heads
    from regcache.settings import Training
    from regcache.store import FeatureSet

    import torch  # noqa: F401  (its import is part of the baseline, not of the probe's cost)

    base = _status_kb("VmRSS")
    split = load_split(FeatureSet(path), ["cls", "patch"], "syn")
    feat_bytes = sum(a.nbytes for a in split.x.values())
    train_heads(split, classes, Training(features=[("cls",), ("patch",), ("cls", "patch")],
                                         lr=[0.001, 0.01, 0.1, 1.0], iterations=iterations))
    peak = _status_kb("VmHWM")
    print(json.dumps({"baseline_kb": base, "peak_kb": peak, "feature_bytes": feat_bytes}))


def anisotropic(rows: int, dim: int, classes: int, seed: int = 0, signal: float = 0.15):
    """Gaussian classes in 2 x ``dim`` dims, then mixed so that the covariance's eigenvalues fall as 1/j."""
    rng = np.random.default_rng(seed)
    d = 2 * dim
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = ((np.arange(d) + 1.0) ** -0.5)[:, None] * q
    mix *= np.sqrt(d / np.square(mix).sum()).astype(np.float32)
    y = rng.integers(0, classes, rows)
    x = (rng.normal(size=(classes, d)) * signal)[y] + rng.normal(size=(rows, d))
    x = (x @ mix).astype(np.float16)  # the store's precision
    return x[:, :dim], x[:, dim:], y


def grid(args) -> None:
    """regcache's lbfgs grid vs scikit-learn fitting the same 39 heads one after another."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from common import command, machine
    from regcache.probe import Split, accuracy, fit_heads
    from regcache.settings import Training

    Cs = tuple(float(c) for c in np.logspace(-4, 4, 13))
    combos = [("cls",), ("patch",), ("cls", "patch")]
    report = {"machine": machine(), "command": command(),
              "C": [round(c, 6) for c in Cs], "problems": []}
    for rows, dim, classes in args.problems:
        cls, patch, y = anisotropic(rows + args.test_rows, dim, classes)
        mk = lambda sl: Split("syn", {"cls": cls[sl], "patch": patch[sl]}, y[sl],  # noqa: E731
                              np.arange(len(y))[sl].astype(str), np.zeros(len(y[sl]), np.int16))
        train, test = mk(slice(0, rows)), mk(slice(rows, None))
        cfg = Training(features=combos, solver="lbfgs", C=list(Cs), iterations=100)
        t = time.perf_counter()
        heads = fit_heads(train, classes, cfg)
        ours_s = [time.perf_counter() - t]
        ours = [accuracy(h.logits(test), test.labels) for h in heads]
        sk_s, sk_acc, sk_iters = 0.0, [], []
        for combo in combos:
            xtr, xte = train.combo(combo).numpy(), test.combo(combo).numpy()
            for c in Cs:
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    sk = LogisticRegression(C=c).fit(xtr, train.labels)
                sk_s += time.perf_counter() - t
                sk_acc.append(sk.score(xte, test.labels))
                sk_iters.append(int(sk.n_iter_[0]))
        t = time.perf_counter()  # again after scikit-learn: the machine's load drifts over a long run
        fit_heads(train, classes, cfg)
        ours_s.append(time.perf_counter() - t)
        diff = np.abs(np.array(ours) - np.array(sk_acc)) * 100
        report["problems"].append({
            "train_rows": rows, "test_rows": args.test_rows, "dims": [dim, dim, 2 * dim], "classes": classes,
            "regcache_s_before_after": [round(v, 1) for v in ours_s], "sklearn_s": round(sk_s, 1),
            "speedup": round(sk_s / np.mean(ours_s), 1),
            "heads_within_0.5pt": f"{int((diff <= 0.5).sum())}/{len(diff)}", "max_diff_pt": round(float(diff.max()), 2),
            "heads": [{"features": ",".join(h.features), "C": h.C, "regcache": round(a, 4), "sklearn": round(b, 4),
                       "sklearn_iterations": it} for h, a, b, it in zip(heads, ours, sk_acc, sk_iters)]})
        print(json.dumps(report["problems"][-1]), flush=True)
    print(json.dumps(report, indent=1))


def dinov3(args) -> None:
    """DINOv3's C grid on real cached features: regcache now, regcache at --baseline, scikit-learn."""
    import importlib.util
    import subprocess as sp
    import warnings

    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    import regcache
    from common import command, load_average, machine
    from regcache.probe.solvers import lbfgs_grid

    fs = regcache.open_features(args.dinov3)
    got = fs.load(args.feature, views=[0])
    x, y = got.x.astype(np.float32), got.labels
    classes, n = int(y.max()) + 1, len(y)
    Cs = [10.0 ** (-6 + 11 * i / 44) for i in range(45)]

    def objective(w, b, C):
        z = x.astype(np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
        z -= z.max(1, keepdims=True)
        return float(C * (np.log(np.exp(z).sum(1)) - z[np.arange(n), y]).sum() + 0.5 * (np.asarray(w) ** 2).sum())

    report = {"machine": machine(), "command": command(), "load_before": load_average(), "set": str(fs.path),
              "feature": args.feature, "rows": n, "dim": x.shape[1], "classes": classes}
    solvers = {"regcache": lbfgs_grid}
    if args.baseline:
        src = sp.run(["git", "show", f"{args.baseline}:regcache/probe/solvers.py"], capture_output=True, text=True,
                     check=True, cwd=Path(__file__).resolve().parents[1]).stdout
        path = Path(tempfile.mkdtemp()) / "solvers_before.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("regcache.probe.solvers_before", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        solvers[f"regcache@{args.baseline}"] = module.lbfgs_grid
    rows = {C: {} for C in Cs}
    for name, solve in solvers.items():
        times = []
        for _ in range(2):  # the faster of two calls: the VM's speed drifts
            t = time.perf_counter()
            w, b, iters = solve(torch.from_numpy(x), torch.from_numpy(y), classes, Cs, max_iter=1000, tol=1e-12)
            times.append(round(time.perf_counter() - t, 2))
        report[f"{name}_s"] = min(times)
        report[f"{name}_s_both"] = times
        for i, C in enumerate(Cs):
            rows[C][name] = (objective(w[i].double().numpy(), b[i].double().numpy(), C), int(iters[i]))
    t0 = time.perf_counter()
    for C in Cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk = LogisticRegression(C=C, tol=1e-12, max_iter=1000).fit(x.astype(np.float64), y)
        rows[C]["sklearn"] = (objective(sk.coef_, sk.intercept_, C), int(sk.n_iter_[0]))
    report["sklearn_s"] = round(time.perf_counter() - t0, 2)
    report["speedup"] = round(report["sklearn_s"] / report["regcache_s"], 1)
    report["load_after"] = load_average()
    report["per_C"] = [{"C": float(f"{C:.4g}"), **{k: {"objective": round(o, 6), "iterations": it}
                                                     for k, (o, it) in v.items()},
                        "regcache_vs_sklearn": float(f"{(v['regcache'][0] - v['sklearn'][0]) / v['sklearn'][0]:.3g}")}
                       for C, v in rows.items()]
    print(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--sk-rows", type=int, default=8_000)
    ap.add_argument("--sk-classes", type=int, default=100)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grid", action="store_true", help="Only the lbfgs C grid against scikit-learn.")
    ap.add_argument("--dinov3", type=Path, default=None, help="A cached set: DINOv3's grid on its rows.")
    ap.add_argument("--feature", default="cls", help="--dinov3: the feature combination.")
    ap.add_argument("--baseline", default=None, help="--dinov3: also the solver of this git revision.")
    ap.add_argument("--problems", type=lambda s: [tuple(int(v) for v in p.split("x")) for p in s.split(",")],
                    default=[(8_000, 384, 100), (50_000, 1024, 10)],
                    help="--grid problems: ROWSxDIM_PER_FEATURExCLASSES, comma-separated")
    ap.add_argument("--test-rows", type=int, default=10_000)
    args = ap.parse_args()
    if args.dinov3:
        dinov3(args)
        return
    if args.grid:
        return grid(args)
    if args.child:
        return child_peak(args.child, args.classes, args.iterations)
    with tempfile.TemporaryDirectory(prefix="regcache-bench-") as tmp:  # removed afterwards
        _measure(args, Path(tmp))


def _measure(args, tmp: Path) -> None:
    from common import command, machine
    from regcache.probe import accuracy, load_split, train_heads
    from regcache.settings import Training
    from regcache.store import FeatureSet

    t = time.perf_counter()
    write_store(tmp / "fs", args.rows, args.dim, args.classes)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    split = load_split(FeatureSet(tmp / "fs"), ["cls", "patch"], "syn")
    load_s = time.perf_counter() - t

    def per_iteration(cfg: Training) -> float:
        train_heads(split, args.classes, cfg.model_copy(update={"iterations": 2}))  # warm-up
        t = time.perf_counter()
        train_heads(split, args.classes, cfg)
        return (time.perf_counter() - t) / cfg.iterations

    all_cfg = Training(features=[("cls",), ("patch",), ("cls", "patch")], lr=[0.001, 0.01, 0.1, 1.0],
                       iterations=args.iterations)
    one_cfg = Training(features=[("cls", "patch")], lr=[0.01], iterations=args.iterations)
    one, all_ = per_iteration(one_cfg), per_iteration(all_cfg)
    flops_one = 3 * 2 * all_cfg.batch_size * 2 * args.dim * args.classes  # forward + 2 backward matmuls

    # scikit-learn on a subset: same features, held-out accuracy
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    keep = np.flatnonzero(split.labels < args.sk_classes)[: 2 * args.sk_rows]
    if len(keep) < 2 * args.sk_rows:
        raise SystemExit(f"--sk-rows {args.sk_rows} needs {2 * args.sk_rows} rows of the first --sk-classes classes")
    rng.shuffle(keep)
    tr, te = keep[: args.sk_rows], keep[args.sk_rows:]
    xtr, xte = split.combo(["cls", "patch"], tr).numpy(), split.combo(["cls", "patch"], te).numpy()
    t = time.perf_counter()
    sk = LogisticRegression().fit(xtr, split.labels[tr])  # lbfgs, its default 100 iterations
    sk_s, sk_acc = time.perf_counter() - t, sk.score(xte, split.labels[te])
    sub = split.take(tr)
    cfg = Training(features=[("cls", "patch")], lr=[0.1], wd=[1 / len(tr)], iterations=400, batch_size=1024)
    t = time.perf_counter()
    head = train_heads(sub, args.sk_classes, cfg)[0]
    ours_s = time.perf_counter() - t
    ours_acc = accuracy(head.logits(split.take(te)), split.labels[te])

    child = subprocess.run([sys.executable, __file__, "--child", str(tmp / "fs"), "--classes", str(args.classes),
                            "--iterations", "5"], capture_output=True, text=True, check=True)
    mem = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "machine": machine(), "command": command(),
        "rows": args.rows, "dim_per_feature": args.dim, "classes": args.classes, "batch": all_cfg.batch_size,
        "store_write_s": round(write_s, 1), "store_load_s": round(load_s, 1),
        "one_head_s_per_it": round(one, 3), "all_12_heads_s_per_it": round(all_, 3),
        "all_over_one": round(all_ / one, 2),
        "all_over_one_flops": round((1 + 1 + 2) * 4 / 2, 1),
        "one_head_gflop_s": round(flops_one / one / 1e9, 1),
        "all_heads_gflop_s": round(flops_one * (1 + 1 + 2) * 4 / 2 / all_ / 1e9, 1),
        "all_over_one_gflop_s": round(one / all_ * (1 + 1 + 2) * 4 / 2, 2),
        "sklearn_subset": f"{args.sk_rows} rows x {2 * args.dim} dims x {args.sk_classes} classes",
        "sklearn_s": round(sk_s, 1), "sklearn_acc": round(sk_acc, 4),
        "regcache_s": round(ours_s, 1), "regcache_acc": round(ours_acc, 4), "speedup": round(sk_s / ours_s, 1),
        "peak_rss_over_feature_bytes": round((mem["peak_kb"] - mem["baseline_kb"]) * 1024 / mem["feature_bytes"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
