"""The student's training loop: AdamW on the unlocked weights, PH-Reg's loss, resumable to the bit.

Everything a step depends on is a function of the step number and the settings: the learning rate
(`lr_at`), the images (`batch_rows`: a permutation per epoch drawn from (seed, epoch)). The state saved every
``save_every`` steps (trained weights, AdamW's moments, the step, the losses) is therefore all a rerun needs
to continue exactly where the last save left off; it is written aside and renamed into place, so a kill
leaves the previous state or the new one, never half of one.
"""
from __future__ import annotations

import io
import math
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..extract.passes import AUTOCAST
from ..files import atomic_write, remove_stale
from ..progress import progress
from ..settings.distill import DistillSettings
from .student import DistillError, patch_tokens


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: the optimizer's settings and the steps they run for."""

    images: int
    batch_size: int
    steps: int               # optimizer steps in all
    lr: float = 1e-4
    end_lr: float = 5e-6
    kind: str = "epoch"      # `settings.distill.SCHEDULES`
    weight_decay: float = 0.01
    mse_scale: float = 1.0
    seed: int = 0
    precision: str = "fp32"

    @classmethod
    def of(cls, s: DistillSettings, images: int) -> "Schedule":
        """The schedule that settings ``s`` ask for over ``images`` images: --steps, else --epochs of them."""
        return cls(images=images, batch_size=s.batch_size, steps=s.steps or s.epochs * math.ceil(images / s.batch_size),
                   lr=s.lr, end_lr=s.end_lr, kind=s.schedule, weight_decay=s.weight_decay, mse_scale=s.mse_scale,
                   seed=s.seed, precision=s.precision)

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.images / self.batch_size)

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.per_epoch)

    def to_dict(self) -> dict:
        return {**asdict(self), "steps_per_epoch": self.per_epoch, "epochs": self.epochs}


def lr_at(step: int, s: Schedule) -> float:
    """The learning rate of step ``step`` (from 0). ``epoch``: the authors set lr * r^((e + 1) / E) after every
    step of epoch e, so step k runs at the rate set after step k - 1 (step 0 at lr); ``step``: lr * r^(k / (T-1))."""
    ratio = s.end_lr / s.lr
    if s.kind == "step":
        return s.lr * ratio ** (step / max(1, s.steps - 1))
    if s.kind != "epoch":
        raise DistillError(f"unknown schedule {s.kind!r} (epoch or step)")
    if step == 0:
        return s.lr
    return s.lr * ratio ** (min(s.epochs, (step - 1) // s.per_epoch + 1) / s.epochs)


def batch_rows(step: int, s: Schedule) -> np.ndarray:
    """The images (positions 0..images-1) of step ``step``: the epoch's permutation, drawn from (seed, epoch), cut
    into batches; the last batch of an epoch may be smaller (no image is dropped)."""
    epoch, k = divmod(step, s.per_epoch)
    order = np.random.default_rng([s.seed, epoch]).permutation(s.images)
    return order[k * s.batch_size:(k + 1) * s.batch_size]


def loss_terms(pred: torch.Tensor, target: torch.Tensor, mse_scale: float) -> tuple[torch.Tensor, float, float]:
    """PH-Reg's loss on [B, L, D] patch tokens: (1 - cosine, per token then averaged) + mse_scale x MSE (over every
    element, raw values); with the mean cosine and the MSE."""
    a = pred / (pred.norm(dim=-1, keepdim=True) + 1e-8)
    b = target / (target.norm(dim=-1, keepdim=True) + 1e-8)
    cos = (a * b).sum(-1).mean()
    mse = torch.nn.functional.mse_loss(pred, target)
    return 1 - cos + mse_scale * mse, float(cos.detach()), float(mse.detach())


def save_state(path: Path, state: dict) -> None:
    """``state`` as ``path``, whole or not at all (`files.atomic_write`)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    remove_stale(path.parent, f".{path.name}.*.tmp")
    atomic_write(path, buf.getvalue(), DistillError)


def load_state(path: Path, run: dict) -> dict | None:
    """The saved state of this run (``run``: what determines its trajectory), None if there is none; the state of
    another run is refused, naming what differs."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # a damaged file
        raise DistillError(f"{path}: not a readable training state ({type(e).__name__}: {e}); remove it to start "
                           "over") from None
    if state.get("run") != run:
        old = state.get("run") or {}
        diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
        raise DistillError(f"{path} is the saved state of another distillation to the same file (it differs in "
                           f"{', '.join(diff)}): remove it to start this one, or give another --out")
    return state


def train(student: torch.nn.Module, images: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
          targets: Callable[[np.ndarray], torch.Tensor], s: Schedule, *, state_path: Path, run: dict,
          save_every: int, device: torch.device, on_step: Callable[[int, float], None] | None = None,
          quiet: bool = False) -> tuple[list[float], int]:
    """Train ``student``'s parameters that require grad on ``images`` (uint8 [N, 3, S, S]) against
    ``targets(positions)`` ([B, L, D]); resume from ``state_path`` if it holds this ``run``'s state. Returns the
    loss of every step, and the step this call started at. ``on_step(step, loss)`` after every step."""
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not params:
        raise DistillError("nothing to train: no parameter is unlocked")
    opt = torch.optim.AdamW([p for _, p in params], lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
    losses: list[float] = []
    start = 0
    state = load_state(state_path, run)
    if state is not None:
        with torch.no_grad():
            for n, p in params:
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
    student.train()
    dtype = AUTOCAST[s.precision]
    bar = progress(total=s.steps - start, desc="distill", unit="step", disable=quiet)
    try:
        for step in range(start, s.steps):
            rows = batch_rows(step, s)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, s)
            x = normalize(images[torch.from_numpy(rows)].to(device))
            y = targets(rows).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                pred = patch_tokens(student, x)
            loss, cos, mse = loss_terms(pred.float(), y, s.mse_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
            bar.desc = f"distill (loss {losses[-1]:.4f}, cos {cos:.4f}, mse {mse:.4f})"
            bar.update(1)
            if (step + 1) % save_every == 0 and step + 1 < s.steps:
                save_state(state_path, {"run": run, "step": step + 1, "losses": losses, "optimizer": opt.state_dict(),
                                        "params": {n: p.detach().cpu().clone() for n, p in params}})
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        bar.close()
    student.eval()
    return losses, start
