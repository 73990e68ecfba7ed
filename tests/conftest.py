"""Shared fixtures: tiny random-init timm ViTs of the real architectures, and small WebDataset shards."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from regcache.shards import write_shards
from regcache.extract import ExtractConfig
from regcache.models import Preprocess

REG = "vit_small_patch14_reg4_dinov2"
NOREG = "vit_small_patch14_dinov2"
SIZE, RESIZE = 56, 64
SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_checkpoint(path: Path, name: str, seed: int = 0) -> Path:
    """Random weights, with layer-scale raised from timm's 1e-5 so that tokens differ between images."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=SIZE, num_classes=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.copy_(torch.randn_like(p) * 0.5)
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def reg_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "reg.safetensors", REG)


@pytest.fixture(scope="session")
def noreg_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "noreg.safetensors", NOREG)


def random_images(n: int, seed: int = 0, classes: int = 3, prefix: str = "img"):
    """(key, uint8 image of random size, label) triples."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(40, 100, size=2)
        yield f"{prefix}{i:05d}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), i % classes


def make_shards(root: Path, n_shards: int = 3, per_shard: int = 5, seed: int = 0) -> str:
    """Write shards under ``root`` and return their brace pattern."""
    paths = write_shards(random_images(n_shards * per_shard, seed), str(root / "part-%03d.tar"), per_shard)
    assert len(paths) == n_shards
    return str(root / f"part-{{000..{n_shards - 1:03d}}}.tar")


def config(model: str, ckpt: Path, data: str, cache: Path, **kw) -> ExtractConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return ExtractConfig(model=model, checkpoint=str(ckpt), data=data, cache=cache, progress=False,
                         preprocess=kw.pop("preprocess", Preprocess(size=SIZE, resize=RESIZE)), **kw)


def cli_args(ckpt: Path, data: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "regcache", "extract", "-m", REG, "--checkpoint", str(ckpt), "-d", data,
            "--cache", str(cache), "--size", str(SIZE), "--resize", str(RESIZE), "-q", *extra]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env
