"""Non-parametric and few-shot protocols on cached features: DINOv2's weighted kNN classifier, and
k-shot logistic regression over several seeds.

kNN (DINOv2 eval/knn.py): features L2-normalised, cosine similarity to every training row, the
top-k neighbours vote for their class with weight ``exp(sim / T)``. Test rows are taken a chunk
at a time and training rows a block at a time (a running top-k), so memory stays bounded whatever
the set sizes; on ``device="cuda"`` the matmuls run on the GPU.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import ProbeError, Split


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
             seeds: Sequence[int], C: float = 1.0, device: str = "cpu", max_iter: int = 1000) -> list[dict]:
    """k-shot logistic regression (scikit-learn's objective at ``C``, `lbfgs_grid`) on view-0 rows, per k and
    seed: top-1, top-5 and mean-per-class recall on ``test``, one dict per (k, seed)."""
    from .heads import predict
    from .solvers import lbfgs_grid

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
    return out


def _sets(job, combos: Sequence[Sequence[str]]):
    """The training split (view 0) and the labelled ID test and eval splits of a job, labels in the training classes."""
    from .data import class_names, load_split
    from .run import _check_apart, _find_sets, _labelled, _num_classes

    if not job.test:
        raise ProbeError("give the ID set to report on with --test")
    union = sorted({f for c in combos for f in c})
    sets = _find_sets(job, union)
    _check_apart(sets, selected=False)  # a query that is its own neighbour would vote for itself
    id_classes = class_names(sets["train"].meta["dataset"])[0]
    train = load_split(sets["train"], union, job.train)
    k = _num_classes(job.train, train.labels, id_classes)
    tests = [("id", _labelled(sets["test"], union, job.test, id_classes, k))]
    tests += [("ood-gen", _labelled(sets[n], union, n, id_classes, k)) for n in job.eval]
    return train, tests, k


def run_knn(job, combos: Sequence[Sequence[str]], ks: Sequence[int] = (10, 20, 100, 200),
            temperature: float = 0.07, device: str = "cpu"):
    """kNN top-1 / top-5 of every combination and k on the job's test and eval sets (long DataFrame)."""
    import pandas as pd

    train, tests, num_classes = _sets(job, combos)
    rows = []
    for combo in combos:
        bank = train.combo(combo)
        for role, s in tests:
            scores = knn_scores(bank, torch.from_numpy(train.labels), s.combo(combo), num_classes, ks, temperature,
                                device)
            for k, sc in scores.items():
                for metric, kk in (("top1", 1), ("top5", 5)):
                    rows.append({"model": job.model, "features": ",".join(combo), "set": s.name, "role": role,
                                 "k": k, "temperature": temperature, "metric": metric,
                                 "value": topk_accuracy(sc, s.labels, kk, s.subset), "n": len(s),
                                 "train_rows": len(train)})
    return pd.DataFrame(rows)


def run_few_shot(job, combos: Sequence[Sequence[str]], shots_per_class: Sequence[int] = (1, 2, 5, 10),
                 seeds: Sequence[int] = (0, 1, 2), C: float = 1.0, device: str = "cpu"):
    """k-shot logistic regression of every combination, per k and seed, plus mean and std over seeds."""
    import pandas as pd

    train, tests, num_classes = _sets(job, combos)
    rows = []
    for combo in combos:
        for role, s in tests:
            for r in few_shot(train, s, combo, num_classes, shots_per_class, seeds, C, device):
                for metric in ("top1", "top5", "mean_per_class_recall"):
                    rows.append({"model": job.model, "features": ",".join(combo), "set": s.name, "role": role,
                                 "shots": r["shots"], "seed": r["seed"], "C": C, "metric": metric,
                                 "value": r[metric], "n": len(s), "train_rows": r["train_rows"]})
    df = pd.DataFrame(rows)
    keys = ["model", "features", "set", "role", "shots", "C", "metric"]
    summary = df.groupby(keys, sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
    return df, summary.rename(columns={"count": "seeds"})
