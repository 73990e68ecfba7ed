"""Training linear heads: every head of a grid in one pass over the data.

Two solvers. ``minibatch`` (SGD or AdamW, the paper's and DINOv2's protocol; also for streamed
sets): per feature combination the heads' weights are one stacked tensor, so a step is one matmul
per combination, and each head keeps its own optimiser state. ``lbfgs`` (sets in memory): every
head of a C grid is scikit-learn's ``LogisticRegression(C)``, fitted full-batch together
(`solvers.lbfgs_grid`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..features import parse_features
from .data import ProbeError, Split, StreamedSplit


# --------------------------------------------------------------------------- training

@dataclass
class ProbeConfig:
    """Heads and their training; defaults follow the paper (SGD, lr 0.01, 10k iterations, batch 4096).

    ``solver="lbfgs"`` fits one head per ``Cs`` value instead of the lr × wd grid; ``iterations`` is then
    its iteration cap (default 1,000) and ``tol`` its gradient tolerance (scikit-learn's). ``refit``:
    after selection, train the chosen setting again on train + val (DINOv3's protocol).
    """

    features: list[tuple[str, ...]]
    lrs: tuple[float, ...] = (0.01,)
    wds: tuple[float, ...] = (0.0,)
    optimizer: str = "sgd"
    iterations: int | None = None  # default: 10,000 (minibatch), 1,000 (lbfgs)
    batch_size: int = 4096
    momentum: float = 0.9
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.1
    stream: bool = False        # read the training set window by window instead of loading it
    stream_window: int = 16     # units (input shards) per shuffle window when streaming
    solver: str = "minibatch"
    Cs: tuple[float, ...] = (1.0,)  # lbfgs: inverse regularisation, scikit-learn's C (one head each)
    tol: float = 1e-4               # lbfgs: stop a head when every gradient entry is below this
    refit: bool = False

    def __post_init__(self) -> None:
        self.features = [parse_features(f) for f in self.features]
        if self.optimizer not in ("sgd", "adamw"):
            raise ProbeError("optimizer must be sgd or adamw")
        if self.solver not in SOLVERS:
            raise ProbeError(f"solver must be one of {', '.join(SOLVERS)}")
        if not self.features:
            raise ProbeError("no feature combination")
        if self.solver == "lbfgs" and (not self.Cs or min(self.Cs) <= 0):
            raise ProbeError("lbfgs needs one or more C values, all > 0")
        if self.solver == "lbfgs" and self.stream:
            raise ProbeError("lbfgs is full-batch: it needs the training set in memory; drop --stream or use "
                             "--solver minibatch")
        if self.iterations is None:
            self.iterations = 1_000 if self.solver == "lbfgs" else 10_000
        # values that would train nothing, or train backwards, and still report a number
        checks = {"iterations": self.iterations >= 1, "batch size": self.batch_size >= 1,
                  "stream window": self.stream_window >= 1, "tolerance": self.tol > 0,
                  "learning rates (one or more, all > 0)": bool(self.lrs) and min(self.lrs) > 0,
                  "weight decays (one or more, all >= 0)": bool(self.wds) and min(self.wds) >= 0,
                  "validation fraction (between 0 and 0.5)": 0 < self.val_fraction <= 0.5,
                  "momentum (in [0, 1))": 0 <= self.momentum < 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ProbeError(f"invalid {', '.join(bad)}: got iterations={self.iterations}, "
                             f"batch_size={self.batch_size}, lrs={list(self.lrs)}, wds={list(self.wds)}, "
                             f"val_fraction={self.val_fraction}, momentum={self.momentum}, "
                             f"stream_window={self.stream_window}, tol={self.tol}")

    @property
    def grid(self) -> list[tuple[float, float]]:
        """The minibatch solver's (lr, wd) pairs, one head each per combination."""
        return [(lr, wd) for lr in self.lrs for wd in self.wds]

    @property
    def heads_per_combination(self) -> int:
        return len(self.Cs) if self.solver == "lbfgs" else len(self.grid)


SOLVERS = ("minibatch", "lbfgs")


@dataclass
class Head:
    """One trained linear head: ``logits = x @ weight.T + bias`` on the concatenation of ``features``.

    An lbfgs head has ``C`` (scikit-learn's) and ``wd = 1/(C·n)``, its weight decay on the mean loss.
    """

    features: tuple[str, ...]
    lr: float
    wd: float
    weight: torch.Tensor
    bias: torch.Tensor
    val_acc: float = float("nan")
    C: float = float("nan")

    def logits(self, split: Split, chunk: int = 65536) -> np.ndarray:
        out = [split.combo(self.features, np.arange(i, min(i + chunk, len(split)))) @ self.weight.T + self.bias
               for i in range(0, len(split), chunk)]
        return torch.cat(out).numpy()

    @property
    def name(self) -> str:
        return ",".join(self.features)


def save_heads(path: Path, heads: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors, info = {}, []
    for h in heads.values():
        tensors[f"{h.name}/weight"], tensors[f"{h.name}/bias"] = h.weight.contiguous(), h.bias.contiguous()
        info.append({"features": list(h.features), "lr": h.lr, "wd": h.wd, "val_acc": h.val_acc, "C": h.C})
    save_file(tensors, str(path), metadata={"heads": json.dumps(info), **{k: json.dumps(v) for k, v in meta.items()}})


def load_heads(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["heads"])
        return [Head(tuple(h["features"]), h["lr"], h["wd"], f.get_tensor(f"{','.join(h['features'])}/weight"),
                     f.get_tensor(f"{','.join(h['features'])}/bias"), h["val_acc"], h.get("C", float("nan")))
                for h in info]


class _Stacked:
    """SGD (momentum, cosine schedule) or AdamW over a stack of heads, each with its own lr and weight decay."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, wd: torch.Tensor, cfg: ProbeConfig):
        self.params, self.cfg, self.t = params, cfg, 0
        self.lr, self.wd = lr, wd
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        scale = 0.5 * (1 + math.cos(math.pi * (self.t - 1) / self.cfg.iterations))
        for p, (m, v) in zip(self.params, self.state):
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd = (self.lr * scale).view(shape), self.wd.view(shape)
            if self.cfg.optimizer == "sgd":
                m.mul_(self.cfg.momentum).add_(p.grad + wd * p)
                p.sub_(lr * m)
            else:
                b1, b2 = 0.9, 0.999
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                mhat, vhat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
                p.sub_(lr * (mhat / (vhat.sqrt() + 1e-8) + wd * p))
            p.grad = None


def fit_heads(train: "Split | StreamedSplit", num_classes: int, cfg: ProbeConfig,
              progress: bool = False) -> list[Head]:
    """Every head of ``cfg`` with its solver, in combination-major grid order."""
    if cfg.solver == "lbfgs":
        from .solvers import lbfgs_heads

        return lbfgs_heads(train, num_classes, cfg)
    return train_heads(train, num_classes, cfg, progress)


def train_heads(train: "Split | StreamedSplit", num_classes: int, cfg: ProbeConfig,
                progress: bool = False) -> list[Head]:
    """Train every head of ``cfg`` in one pass over shared mini-batches; returns them in grid order per combo.

    Under torch.distributed (torchrun), every rank draws the same global batch, computes the loss
    on its slice, and gradients are summed across ranks: the result equals a single process.
    """
    import torch.distributed as dist

    from ..progress import progress as progress_bar

    device = torch.device(cfg.device)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    grid = cfg.grid
    lr = torch.tensor([g[0] for g in grid], device=device)
    wd = torch.tensor([g[1] for g in grid], device=device)
    names = sorted({f for combo in cfg.features for f in combo})
    width = train.dims(names)
    weights, biases = {}, {}
    for combo in cfg.features:  # zero init, as DINOv2's linear eval heads are near zero
        dim = sum(width[f] for f in combo)
        weights[combo] = torch.zeros(len(grid), dim, num_classes, device=device, requires_grad=True)
        biases[combo] = torch.zeros(len(grid), 1, num_classes, device=device, requires_grad=True)
    params = [*weights.values(), *biases.values()]
    opt = _Stacked(params, lr, wd, cfg)
    batches = train.batches(min(cfg.batch_size, len(train)), gen, device)
    for _ in progress_bar(range(cfg.iterations), disable=not progress or rank != 0, desc="heads", unit="it"):
        xb, yb = next(batches)
        n = len(yb)
        xb, yb = {f: v[rank::world].float() for f, v in xb.items()}, yb[rank::world]
        loss = 0.0
        for combo in cfg.features:
            xc = torch.cat([xb[f] for f in combo], 1)
            logits = torch.matmul(xc, weights[combo]) + biases[combo]  # [heads, batch, classes]
            loss = loss + torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), yb.repeat(len(grid)), reduction="sum") / n
        loss.backward()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
        opt.step()
    return [Head(combo, g[0], g[1], weights[combo][i].detach().T.cpu().contiguous(),
                 biases[combo][i, 0].detach().cpu().clone())
            for combo in cfg.features for i, g in enumerate(grid)]


def accuracy(logits: np.ndarray, labels: np.ndarray, subset: np.ndarray | None = None) -> float:
    """Top-1; with a class subset, the logits are restricted to its columns before the argmax."""
    return float(np.mean(predict(logits, subset) == labels))


def predict(logits: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
    if subset is None:
        return logits.argmax(1)
    return np.asarray(subset)[logits[:, subset].argmax(1)]


def select(heads: list[Head], val: Split) -> dict[tuple[str, ...], Head]:
    """Per feature combination, the head with the best validation accuracy (first on ties)."""
    best: dict[tuple[str, ...], Head] = {}
    for h in heads:
        h.val_acc = accuracy(h.logits(val), val.labels, val.subset)
        if h.features not in best or h.val_acc > best[h.features].val_acc:
            best[h.features] = h
    return best


def refit(chosen: dict[tuple[str, ...], Head], train: "Split | StreamedSplit", val: Split, num_classes: int,
          cfg: ProbeConfig) -> dict[tuple[str, ...], Head]:
    """Train each combination's chosen setting again on train + val (DINOv3): the selection used val,
    the final head may learn from it too. Each refit head keeps the chosen head's validation accuracy."""
    from dataclasses import replace

    if isinstance(train, StreamedSplit):
        raise ProbeError("refit needs the training set in memory (drop --stream)")
    both = Split(f"{train.name}+{val.name}", {f: np.concatenate([train.x[f], val.x[f]]) for f in train.x},
                 np.concatenate([train.labels, val.labels]), np.concatenate([train.keys, val.keys]),
                 np.concatenate([train.views, val.views]))
    out = {}
    for combo, h in chosen.items():
        setting = {"Cs": (h.C,)} if cfg.solver == "lbfgs" else {"lrs": (h.lr,), "wds": (h.wd,)}
        one = replace(cfg, features=[combo], refit=False, **setting)
        new = fit_heads(both, num_classes, one)[0]
        new.val_acc = h.val_acc
        out[combo] = new
    return out

