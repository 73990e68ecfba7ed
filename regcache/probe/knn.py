"""Non-parametric and few-shot protocols on cached features: DINOv2's weighted kNN classifier, and
k-shot logistic regression over several seeds.

kNN (DINOv2 eval/knn.py): features L2-normalised, cosine similarity to every training row, the
top-k neighbours vote for their class with weight ``exp(sim / T)``. Test rows are taken a chunk
at a time and training rows a block at a time (a running top-k), so memory stays bounded whatever
the set sizes; on ``device="cuda"`` the matmuls run on the GPU.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..housekeeping import record_run
from ..progress import progress
from ..report import frame_markdown
from ..rundir import check_out, default_run, publish, writing
from ..settings import CachedSets, FewshotSettings, KnnSettings
from .data import ProbeError, Split, class_names, load_split
from .head import predict
from .run import labelled, num_classes_of
from .sets import RunSets, check_apart, find_sets
from .solvers import lbfgs_grid


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
               ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, device: str = "cpu",
               max_bytes: int = 1 << 28) -> dict[int, np.ndarray]:
    """Per k, the class votes [n_test, num_classes] (sum of ``exp((sim - max sim) / T)`` over the k nearest)."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ProbeError("k must be ≥ 1")
    kmax = min(ks[-1], len(train_y))
    dev = torch.device(device)
    bank = F.normalize(train_x.float(), dim=1)
    labels = train_y.to(dev)
    test_rows = max(1, min(4096, max_bytes // (4 * max(len(bank), 1))))
    bank_rows = max(kmax, max_bytes // (4 * test_rows))
    out = {k: np.empty((len(test_x), num_classes), np.float32) for k in ks}
    for s in range(0, len(test_x), test_rows):
        q = F.normalize(test_x[s:s + test_rows].float().to(dev), dim=1)
        best_sim = torch.full((len(q), 0), -2.0, device=dev)
        best_lab = torch.zeros((len(q), 0), dtype=labels.dtype, device=dev)
        for b in range(0, len(bank), bank_rows):  # running top-k over blocks of training rows
            sim = q @ bank[b:b + bank_rows].to(dev).T
            sim, idx = torch.cat([best_sim, sim], 1), torch.cat([best_lab, labels[b:b + bank_rows].expand(len(q), -1)], 1)
            best_sim, pos = sim.topk(min(kmax, sim.shape[1]), dim=1)
            best_lab = idx.gather(1, pos)
        weight = ((best_sim - best_sim[:, :1]) / temperature).exp()   # sorted, so column 0 is the max
        for k in ks:
            votes = torch.zeros(len(q), num_classes, device=dev)
            votes.scatter_add_(1, best_lab[:, :k], weight[:, :k])
            out[k][s:s + len(q)] = votes.cpu().numpy()
    return out


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 5, subset: np.ndarray | None = None) -> float:
    """Fraction of rows whose label is among the k highest scores (within the class subset, if any)."""
    if subset is not None:
        masked = np.full_like(scores, -np.inf)
        masked[:, subset] = scores[:, subset]
        scores = masked
    top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
    return float(np.mean((top == labels[:, None]).any(1)))


def mean_per_class_recall(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of the fraction of their rows predicted right."""
    classes = np.unique(labels)
    return float(np.mean([np.mean(pred[labels == c] == c) for c in classes]))


def shots(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` rows per class (all of a class with fewer), drawn with ``seed``, in row order."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def few_shot(train: Split, test: Split, features: Sequence[str], num_classes: int, shots_per_class: Sequence[int],
             seeds: Sequence[int], C: float = 1.0, device: str = "cpu", max_iter: int = 1000,
             on_fit=lambda n: None) -> list[dict]:
    """k-shot logistic regression (scikit-learn's objective at ``C``, `lbfgs_grid`) on view-0 rows, per k and
    seed: top-1, top-5 and mean-per-class recall on ``test``, one dict per (k, seed)."""
    view0 = np.flatnonzero(train.views == 0)
    xtest = test.combo(features).to(device)
    out = []
    for k in shots_per_class:
        for seed in seeds:
            rows = view0[shots(train.labels[view0], k, seed)]
            w, b, _ = lbfgs_grid(train.combo(features, rows).to(device), torch.from_numpy(train.labels[rows]).to(device),
                                 num_classes, [C], max_iter=max_iter)
            logits = (xtest @ w[0].T + b[0]).cpu().numpy()
            pred = predict(logits, test.subset)
            out.append({"shots": int(k), "seed": int(seed), "train_rows": len(rows),
                        "top1": float(np.mean(pred == test.labels)),
                        "top5": topk_accuracy(logits, test.labels, 5, test.subset),
                        "mean_per_class_recall": mean_per_class_recall(pred, test.labels)})
            on_fit(1)
    return out


def _sets(s: "CachedSets"):
    """The training split (view 0) and the labelled ID test and eval splits, labels in the training classes."""
    union = sorted({f for c in s.features for f in c})
    sets: RunSets = find_sets(s, union)
    check_apart(sets, selected=False)  # a query that is its own neighbour would vote for itself
    id_classes = class_names(sets.train.description)[0]
    train = load_split(sets.train.fs, union, sets.train.name)
    k = num_classes_of(sets.train.name, train.labels, id_classes)
    tests = [("id", labelled(sets.test, union, id_classes, k))]
    tests += [("ood-gen", labelled(n, union, id_classes, k)) for n in sets.eval.values()]
    return train, tests, k, sets


def _top(t: Split, num_classes: int) -> tuple[tuple[str, int], ...]:
    """top-1, and top-5 where it says something: a set scored over more than 5 classes (its class subset's, if it
    has one). Over 5 or fewer, top-5 is 100% whatever the features (DINOv3 reports it from 5 classes on)."""
    scored = len(t.subset) if t.subset is not None else num_classes
    return (("top1", 1), ("top5", 5)) if scored > 5 else (("top1", 1),)


TOP5_NOTE = "top-5 only for sets scored over more than 5 classes"


@dataclass
class Table:
    """A protocol's results: the long table, its summary, and where they were written."""

    results: "object"          # pandas DataFrame, long format
    summary: "object"          # pandas DataFrame, as printed
    out: Path | None = None


def knn(s: "KnnSettings") -> Table:
    """`regcache knn`: top-1 (and top-5) of every combination and k on the test and eval sets."""
    import pandas as pd

    check_out(s.out)
    train, tests, num_classes, sets = _sets(s)
    model = sets.train.fs.model_label(s.model)  # with the checkpoint's file where it is not the name's own
    if max(s.k) > len(train):
        raise ProbeError(f"k={max(s.k)} neighbours, but {s.train} has {len(train)} training rows (view 0): "
                         f"give k at most {len(train)}")
    rows = []
    for combo in s.features:
        bank = train.combo(combo)
        for role, t in tests:
            scores = knn_scores(bank, torch.from_numpy(train.labels), t.combo(combo), num_classes, s.k,
                                s.temperature, s.device)
            for k, sc in scores.items():
                for metric, kk in _top(t, num_classes):
                    rows.append({"model": model, "features": ",".join(combo), "set": t.name, "role": role,
                                 "k": k, "temperature": s.temperature, "metric": metric,
                                 "value": topk_accuracy(sc, t.labels, kk, t.subset), "n": len(t),
                                 "train_rows": len(train)})
    df = pd.DataFrame(rows)
    summary = df.pivot_table(index=["features", "set", "metric"], columns="k", values="value", sort=False) * 100
    return _write(Table(df, summary.round(2)), s, "knn", f"kNN (T = {s.temperature}), %, by k; {TOP5_NOTE}", sets)


def fewshot(s: "FewshotSettings") -> Table:
    """`regcache fewshot`: k-shot logistic regression of every combination, per k and seed, and the mean and
    std over seeds."""
    import pandas as pd


    check_out(s.out)
    train, tests, num_classes, sets = _sets(s)
    model = sets.train.fs.model_label(s.model)  # with the checkpoint's file where it is not the name's own
    rows = []
    work = [(combo, role, t) for combo in s.features for role, t in tests]
    bar = progress(total=len(work) * len(s.shots) * len(s.seeds), desc="fewshot", unit="fit", disable=s.quiet)
    for combo, role, t in work:
        for r in few_shot(train, t, combo, num_classes, s.shots, s.seeds, s.C, s.device, on_fit=bar.update):
            for metric in ("top1", "top5", "mean_per_class_recall"):
                if metric == "top5" and ("top5", 5) not in _top(t, num_classes):
                    continue
                rows.append({"model": model, "features": ",".join(combo), "set": t.name, "role": role,
                             "shots": r["shots"], "seed": r["seed"], "C": s.C, "metric": metric,
                             "value": r[metric], "n": len(t), "train_rows": r["train_rows"]})
    bar.close()
    df = pd.DataFrame(rows)
    keys = ["features", "set", "metric", "shots"]
    g = df.groupby(keys, sort=False)["value"]
    summary = pd.DataFrame({"mean": g.mean() * 100, "std": g.std() * 100, "seeds": g.count()}).round(2)
    return _write(Table(df, summary), s, "fewshot", f"few-shot logistic regression (C = {s.C}), %, mean and std "
                  f"over seeds; {TOP5_NOTE}", sets)


def _write(table: Table, s, command: str, title: str, sets) -> Table:
    """results.parquet and results.csv (long) and results.md (the summary) in the run directory (``s.out``, or a
    new one), written whole or not at all."""
    def write(out: Path) -> None:
        with writing(out / "results.parquet") as f:
            table.results.to_parquet(f, index=False)
        with writing(out / "results.csv") as f:
            table.results.to_csv(f, index=False)
        with writing(out / "results.md") as f:
            f.write_text(f"### {title}\n\n{frame_markdown(table.summary)}\n")

    table.out = publish(s.out, default_run(command, s.model), write)
    record_run(s.cache, table.out, [n.fs.path for _, n in sets.items()])
    return table
