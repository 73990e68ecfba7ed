"""`distill`: the teacher's targets (cached), the student built and trained, the checkpoint and its record.

The architectures are checked first (on the meta device: nothing loads), then the data are planned and the
teacher loads; its targets come from the cache when another distillation made them. A run whose checkpoint
and record already exist with the same settings is not repeated; a killed one resumes from its saved state.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch

from .. import __version__
from ..digests import file_digest
from ..extract.stream import UnitStream
from ..identity import Plan
from ..models import load_model, resolve_device
from ..settings.distill import DistillSettings
from ..store.meta import fingerprint
from .output import command_line, extract_command, read_record, save_checkpoint, save_record
from .student import DistillError, alias_of, build_student, check_teacher, student_arch, teacher_arch, unlock
from .teacher import Augment, make_targets, targets_identity, teacher_plan
from .train import Schedule, train

log = logging.getLogger("regcache")

PAPER = "PH-Reg: Chen et al., Vision Transformers with Self-Distilled Registers, NeurIPS 2025 (arXiv 2505.21501)"


@dataclass
class DistillResult:
    """What a distillation made and what it cost here."""

    checkpoint: Path
    record: Path
    targets: Path
    reused: bool = False             # checkpoint and record were there already, for these settings
    reused_targets: bool = False
    teacher_images: int = 0          # images the teacher ran on (views each) in this call
    teacher_seconds: float = 0.0
    steps: int = 0
    resumed_at: int = 0              # the step this call started at (a saved state's)
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    command: str = ""                # the `regcache extract` command that reads the student


def state_file(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def record_file(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def distill(settings: DistillSettings, on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Train ``settings.registers`` post-hoc registers into the teacher (see the module doc); ``on_step(step, loss)``
    is called after every optimizer step."""
    s = settings
    tarch = teacher_arch(s)
    with torch.device("meta"):
        check_teacher(tarch.create(), s.model, s.size)
    sarch = student_arch(tarch, s.registers)
    p = teacher_plan(s)
    key = student_key(s, p)
    record = record_file(s.out)
    done = read_record(record)
    if done is not None and done.get("key") == key and s.out.is_file() and \
            file_digest(s.out) == done.get("checkpoint", {}).get("sha256"):
        log.info("%s was made with these settings already (%s): nothing to do", s.out, record)
        losses = list(done.get("losses", []))
        return DistillResult(checkpoint=s.out, record=record, targets=Path(done["targets"]["path"]), reused=True,
                             losses=losses, steps=len(losses), command=done["extract"]["command"])
    device = resolve_device(s.device)
    teacher = load_model(s, p.preprocess.size, p.checkpoint).to(device)
    check_teacher(teacher, s.model, p.preprocess.size)
    targets = make_targets(s, p, teacher, device)
    fs = targets.fs
    index = fs.index
    n = len(index) if s.images is None else min(s.images, len(index))
    if s.images is not None and n < s.images:
        log.warning("%s holds %d usable images, fewer than the %d asked: training on %d", s.data, len(index),
                    s.images, n)
    if n == 0:
        raise DistillError(f"{s.data}: no usable image to train on")
    sched = Schedule.of(s, n)
    result = DistillResult(checkpoint=s.out, record=record, targets=fs.path,
                           reused_targets=targets.reused, teacher_images=targets.images,
                           teacher_seconds=targets.seconds)
    command = extract_command(alias_of(sarch) or sarch.name, sarch.args, s.out, s.data, p.preprocess)
    result.command = command_line(command)
    keys = index["key"].to_numpy(dtype=object)[:n]
    rows = index["row"].to_numpy()[:n]
    images = crops(p, list(keys), s.batch_size, s.out.parent)
    student = build_student(teacher, sarch, p.preprocess.size, s.registers, s.seed).to(device)
    del teacher
    trained = unlock(student, s.unlock)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    losses, result.resumed_at = train(student, images, p.preprocess.normalize, reader(fs, rows), sched,
                                      state_path=state_file(s.out), run=key, save_every=s.save_every,
                                      device=device, on_step=on_step, quiet=s.quiet)
    result.train_seconds, result.steps, result.losses = time.perf_counter() - t0, sched.steps, losses
    digest = save_checkpoint(student, sarch, p.preprocess.size, s.out)
    save_record(result.record, {
        "method": PAPER, "key": key, "schedule": sched.to_dict(), "checkpoint": {"path": str(s.out.resolve()), "sha256": digest},
        "extract": {"command": result.command, "args": command},
        "teacher": {"model": s.model, "timm_name": p.timm_name, "identity": p.identity},
        "data": {"source": s.data, "name": p.dataset.name, "content": p.identity["data"], "images": n,
                 "shards": len(p.dataset.shards)},
        "targets": {"path": str(fs.path), "fingerprint": fs.fingerprint, "reused": targets.reused,
                    "augment": asdict(Augment.of(s)), "dtype": fs.meta.dtype},
        "student": _student(student, sarch, s.registers, trained),
        "settings": s.model_dump(mode="json"),
        "losses": losses,
        "provenance": _provenance(device, result)})
    state_file(s.out).unlink(missing_ok=True)
    return result


#: the settings that shape training; with the targets and the architectures they determine the student bit for bit
TRAINING = ("registers", "unlock", "images", "epochs", "steps", "batch_size", "lr", "end_lr", "schedule",
            "weight_decay", "mse_scale", "seed", "precision")


def student_key(s: DistillSettings, p: Plan) -> dict:
    """What determines the student, known before any image is read: the targets set's fingerprint (the teacher's
    identity with its weights' bytes, the data's bytes, the views), the student's architecture and the training
    settings (not the device, the output or how often state is saved). The record keeps it and so does the saved
    state (a state of another key is refused); a rerun with the same key does nothing, and a pipeline names the
    checkpoint by its digest."""
    return {"targets": fingerprint(targets_identity(p, Augment.of(s))),
            "student": asdict(student_arch(teacher_arch(s), s.registers)),
            **{f: sorted(getattr(s, f)) if f == "unlock" else getattr(s, f) for f in TRAINING}}


def reader(fs, rows: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
    """positions (into the training images) -> their targets [B, L, D] as float32, read from the set."""
    def read(positions: np.ndarray) -> torch.Tensor:
        r = rows[positions]
        order = np.argsort(r, kind="stable")
        got = fs.read_rows("tokens", r[order])
        out = np.empty((len(r), *got.shape[1:]), dtype=np.float32)
        out[order] = got
        return torch.from_numpy(out)
    return read


def crops(p: Plan, keys: list[str], batch_size: int, folder: Path) -> torch.Tensor:
    """The uint8 crops [N, 3, S, S] of the samples ``keys`` (in that order): view 0 of the teacher, what the student
    sees. Read shard by shard until every key is found, into an unnamed file in ``folder`` mapped to memory (at
    ImageNet scale they outgrow RAM: 1.28M crops of 224 px are 193 GB), its space reserved first so that a full
    disk is an error here, not a crash on a page write later."""
    want = {k: i for i, k in enumerate(keys)}  # not yet found
    size = p.preprocess.size
    shape = (len(keys), 3, size, size)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as f:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, math.prod(shape))
            else:  # macOS: no reservation, the file only grows as crops are written
                f.truncate(math.prod(shape))
        except OSError as e:
            raise DistillError(f"{folder}: no room for the student's {len(keys):,} crops ({math.prod(shape) / 1e9:.1f} "
                               f"GB): {e.strerror or e}") from e
        out = torch.from_numpy(np.memmap(f, dtype=np.uint8, mode="r+", shape=shape))
    for unit in range(len(p.dataset.shards)):
        for batch in UnitStream(p.dataset, [unit], [p.preprocess], batch_size=batch_size).read_unit(unit):
            if batch.end and batch.shard_error:
                raise DistillError(f"shard {p.dataset.shard_name(unit)}: {batch.shard_error}")
            for key, img in zip(batch.keys, batch.images if batch.has_rows else []):
                if key in want:  # the first sample of a key, as the index keeps it
                    out[want.pop(key)] = img
        if not want:
            return out
    raise DistillError(f"{len(want)} images of the teacher's targets are no longer in {p.dataset.name}'s "
                       "shards (changed since?)")


def _student(student: torch.nn.Module, arch, registers: int, trained: list[str]) -> dict:
    return {"arch": arch.name, "model_args": arch.args, "alias": alias_of(arch), "registers": registers,
            "size": int(student.patch_embed.img_size[0]), "pos_embed_grid": list(student.patch_embed.grid_size),
            "unlocked": trained, "trained_parameters": sum(student.get_parameter(n).numel() for n in trained)}


def _provenance(device: torch.device, result: DistillResult) -> dict:
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "regcache": __version__,
            "timm": timm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "host": socket.gethostname(), "device": str(device), "resumed_at": result.resumed_at,
            "teacher_seconds": round(result.teacher_seconds, 3), "train_seconds": round(result.train_seconds, 3)}
