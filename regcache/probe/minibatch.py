"""The minibatch solver: SGD or AdamW over a grid of heads in one pass (the paper's and DINOv2's protocol).

Per feature combination the heads' weights are one stacked tensor, so a step is one matmul per
combination, and each head keeps its own optimiser state; works on streamed sets too.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from ..progress import progress as progress_bar
from ..settings import Training
from .data import Split, StreamedSplit
from .head import Head

log = logging.getLogger("regcache")


class _Stacked:
    """SGD (momentum, cosine schedule) or AdamW over a stack of heads, each with its own lr and weight decay."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, wd: torch.Tensor, s: Training):
        self.params, self.s, self.t = params, s, 0
        self.lr, self.wd = lr, wd
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        scale = 0.5 * (1 + math.cos(math.pi * (self.t - 1) / self.s.max_iter))
        for p, (m, v) in zip(self.params, self.state):
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd = (self.lr * scale).view(shape), self.wd.view(shape)
            if self.s.optimizer == "sgd":
                m.mul_(self.s.momentum).add_(p.grad + wd * p)
                p.sub_(lr * m)
            else:
                b1, b2 = 0.9, 0.999
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                mhat, vhat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
                p.sub_(lr * (mhat / (vhat.sqrt() + 1e-8) + wd * p))
            p.grad = None


def initial_weights(shape: tuple[int, ...], s: Training, generator: torch.Generator) -> torch.Tensor:
    """Heads' starting weights (``s.init``): zeros, or N(0, init_std²) drawn on the CPU from ``generator`` (the same
    draws on every device and rank), as DINOv2's LinearClassifier does with ``weight.normal_(0, 0.01)``."""
    w = torch.zeros(shape)
    if s.init == "normal":
        w.normal_(0.0, s.init_std, generator=generator)
    return w


def train_heads(train: "Split | StreamedSplit", num_classes: int, s: Training,
                progress: bool = False) -> list[Head]:
    """Train every head of ``s`` in one pass over shared mini-batches; returns them in grid order per combo.

    Under torch.distributed (torchrun), every rank draws the same global batch, computes the loss
    on its slice, and gradients are summed across ranks: the result equals a single process.
    """
    device = torch.device(s.device)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    gen = torch.Generator().manual_seed(s.seed)
    grid = s.grid
    lr = torch.tensor([g[0] for g in grid], device=device)
    wd = torch.tensor([g[1] for g in grid], device=device)
    names = sorted({f for combo in s.features for f in combo})
    width = train.dims(names)
    weights, biases = {}, {}
    init = torch.Generator().manual_seed(s.seed)  # its own stream: the batches are those of zero init
    for combo in s.features:
        dim = sum(width[f] for f in combo)
        weights[combo] = initial_weights((len(grid), dim, num_classes), s, init).to(device).requires_grad_()
        biases[combo] = torch.zeros(len(grid), 1, num_classes, device=device, requires_grad=True)
    params = [*weights.values(), *biases.values()]
    opt = _Stacked(params, lr, wd, s)
    batch = min(s.batch_size, len(train))
    epochs = s.max_iter * batch / max(len(train), 1)
    if epochs > 200 and progress and rank == 0:
        log.warning("%d steps of %d rows go over the %d training rows %.0f times; the heads have long converged "
                    "before that (--iterations %d is %.0f passes)", s.max_iter, batch, len(train), epochs,
                    max(1, round(50 * len(train) / batch)), 50)
    batches = train.batches(batch, gen, device)
    for _ in progress_bar(range(s.max_iter), disable=not progress or rank != 0, desc="heads", unit="it"):
        xb, yb = next(batches)
        n = len(yb)
        xb, yb = {f: v[rank::world].float() for f, v in xb.items()}, yb[rank::world]
        loss = 0.0
        for combo in s.features:
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
                 biases[combo][i, 0].detach().cpu().clone(), iterations=s.max_iter)
            for combo in s.features for i, g in enumerate(grid)]


