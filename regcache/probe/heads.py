"""Training linear heads: every head of a grid shares each mini-batch.

Per feature combination the heads' weights are one stacked tensor, so a step is one matmul per
combination, and each head keeps its own optimiser state.
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
    """Heads and their training; defaults follow the paper (SGD, lr 0.01, 10k iterations, batch 4096)."""

    features: list[tuple[str, ...]]
    lrs: tuple[float, ...] = (0.01,)
    wds: tuple[float, ...] = (0.0,)
    optimizer: str = "sgd"
    iterations: int = 10_000
    batch_size: int = 4096
    momentum: float = 0.9
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.1
    stream: bool = False        # read the training set window by window instead of loading it
    stream_window: int = 16     # units (input shards) per shuffle window when streaming

    def __post_init__(self) -> None:
        self.features = [parse_features(f) for f in self.features]
        if self.optimizer not in ("sgd", "adamw"):
            raise ProbeError("optimizer must be sgd or adamw")
        if not self.features:
            raise ProbeError("no feature combination")

    @property
    def grid(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.wds]


@dataclass
class Head:
    """One trained linear head: ``logits = x @ weight.T + bias`` on the concatenation of ``features``."""

    features: tuple[str, ...]
    lr: float
    wd: float
    weight: torch.Tensor
    bias: torch.Tensor
    val_acc: float = float("nan")

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
        info.append({"features": list(h.features), "lr": h.lr, "wd": h.wd, "val_acc": h.val_acc})
    save_file(tensors, str(path), metadata={"heads": json.dumps(info), **{k: json.dumps(v) for k, v in meta.items()}})


def load_heads(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["heads"])
        return [Head(tuple(h["features"]), h["lr"], h["wd"], f.get_tensor(f"{','.join(h['features'])}/weight"),
                     f.get_tensor(f"{','.join(h['features'])}/bias"), h["val_acc"]) for h in info]


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
