"""What a distillation leaves: the student as a safetensors checkpoint in timm's layout, and FILE.json beside it.

The checkpoint holds every weight of the register architecture, the position table at the training grid:
loaded at that size nothing is resampled (the student's forward exactly); at another size regcache and timm
resample it as they do any checkpoint's table (bicubic), from the trained grid. Both files are written aside
and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import torch
from safetensors.torch import save

from ..files import atomic_write, canonical_safetensors, remove_stale
from ..models import preprocess_for
from .student import Arch, DistillError


def _atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.*.tmp")
    atomic_write(path, data, DistillError)


def save_checkpoint(student: torch.nn.Module, arch: Arch, size: int, path: Path) -> str:
    """Every weight of ``student`` as ``path`` (metadata: the timm model and its arguments, as `models.local_weights`
    reads them); ``sha256:HEX`` of the file's bytes."""
    sd = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    data = canonical_safetensors(save(sd, metadata={
        "timm_model": arch.name, "model_args": json.dumps(arch.args, sort_keys=True), "img_size": str(size),
        "source": "regcache registers distill (PH-Reg)"}))
    _atomic(path, data)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def save_record(path: Path, record: dict) -> None:
    _atomic(path, (json.dumps(record, indent=1, sort_keys=False) + "\n").encode())


def read_record(path: Path) -> dict | None:
    """FILE.json of an earlier distillation, None if absent or unreadable (then it is made again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def extract_command(name: str, model_args: dict, checkpoint: Path, data: str, preprocess) -> list[str]:
    """The `regcache extract` command that reads the student: its model (the alias, else timm's name) and model
    arguments, the checkpoint, and the teacher's preprocessing where the name's own differs."""
    args = ["regcache", "extract", "-m", name, "--checkpoint", str(checkpoint.resolve()), "-d", data,
            "--size", str(preprocess.size), "--resize", str(preprocess.resize)]
    for k, v in model_args.items():
        args += ["--model-arg", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    own = preprocess_for(name, size=preprocess.size, resize=preprocess.resize)
    for field, flag in (("crop_mode", "--crop-mode"), ("interpolation", "--interpolation")):
        if getattr(own, field) != getattr(preprocess, field):
            args += [flag, getattr(preprocess, field)]
    for field in ("mean", "std"):
        if tuple(getattr(own, field)) != tuple(getattr(preprocess, field)):
            args += [f"--{field}", ",".join(repr(float(x)) for x in getattr(preprocess, field))]
    return args


def command_line(args: list[str]) -> str:
    return shlex.join(args)
