"""The eval transform that is part of a set's identity: resize the shorter side, center-crop, normalise, as timm's
eval transform (an alias's own, the papers' 256/224, else the model's timm ``pretrained_cfg``), on PIL images in
the decode workers or on uint8 tensors on the device."""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from typing import Any, Callable

import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torchvision import transforms as T

from .registry import IMAGENET_MEAN, IMAGENET_STD, MODELS, PAPER_EVAL, ModelError, resolve_name
from .settings import Preprocessing
from .settings.choices import DEVICE_HELP


@dataclass(frozen=True)
class Preprocess:
    """PIL-side eval transform: resize the shorter side, center-crop, normalise (timm's eval transform).

    ``views > 1`` adds seeded random-resized-crop + flip views 1..views-1 after the plain view 0,
    for training heads with augmentation without the backbone (docs/design.md, "Preprocessing").
    """

    size: int = 224
    resize: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    views: int = 1
    seed: int = 0
    crop_mode: str = "center"  # center: shorter side to `resize`; squash: both sides to `resize` (timm's modes)
    decode: str = "pil"        # pil: decoded and cropped here, in the workers; device:DECODER (`decoder`): on the device

    def __post_init__(self) -> None:
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop mode {self.crop_mode!r} is not supported (center or squash)")
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least the crop size ({self.size})")
        if self.views < 1 or (self.decode != "pil" and self.views > 1):
            raise ValueError("views must be >= 1, and 1 when decoding on the device")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive in every channel (it divides the pixels), got {self.std}")

    def to_dict(self) -> dict:
        return asdict(self)

    def pinned(self) -> dict[str, Any]:
        """This transform as preprocessing settings, every field given: another model name (a student's alias,
        whose defaults may differ) then reads its images exactly as this one does."""
        return {"size": self.size, "resize": self.resize, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": tuple(self.mean), "std": tuple(self.std)}

    @cached_property
    def crop(self) -> Callable[[Any], Any]:
        """Resize and center-crop a PIL image, or a uint8 [3, H, W] tensor on any device (antialiased, as PIL)."""
        interp = T.InterpolationMode(self.interpolation)
        resize = self.resize if self.crop_mode == "center" else (self.resize, self.resize)
        return T.Compose([T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop(self.size)])

    @cached_property
    def _plain(self) -> Callable[[Any], torch.Tensor]:
        return T.Compose([self.crop, T.PILToTensor()])

    @cached_property
    def _augment(self) -> Callable[[Any], torch.Tensor]:
        interp = T.InterpolationMode(self.interpolation)
        return T.Compose([T.RandomResizedCrop(self.size, interpolation=interp), T.RandomHorizontalFlip(),
                          T.PILToTensor()])

    def __call__(self, img: Any, view: int = 0, key: str = "") -> torch.Tensor:
        """One view of one RGB PIL image as uint8 [3, size, size]; augmented views are seeded by (seed, key, view).

        Pixels stay uint8 until `normalize`, which runs batched on the model's device.
        """
        if view == 0:
            return self._plain(img)
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}/{key}/{view}".encode()).digest()[:8], "little")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._augment(img)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32, the same arithmetic as torchvision's ToTensor + Normalize."""
        mean, std = _channel_stats(self.mean, self.std, images.device)
        return images.float().div_(255).sub_(mean).div_(std)


@lru_cache(maxsize=8)
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a fresh tensor per batch would be a blocking host-to-GPU copy each time."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def resolve_device(device: str) -> torch.device:
    """``auto``: cuda if present, else cpu; any other name must be a torch device, and a CUDA one must be here
    (found out later, a run would have made its sets first)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r} ({DEVICE_HELP})") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ModelError(f"device {device!r}: torch finds {found} CUDA device{'s' * (found != 1)} here; "
                         "give --device cpu, or auto")
    return d


#: the decoder behind `decode: device` on each kind of device: they give different pixels, so the identity names it
DEVICE_DECODERS = {"cuda": "nvjpeg", "cpu": "libjpeg-turbo"}


def decoder(decode: str, device: str) -> str:
    """``pil``, or ``device:DECODER`` for ``decode: device`` on ``device`` (`Preprocess.decode`)."""
    if decode == "pil":
        return decode
    kind = resolve_device(device).type
    return f"device:{DEVICE_DECODERS.get(kind, kind)}"


def preprocess_of(s: Preprocessing, views: int = 1, seed: int = 0, decode: str = "pil") -> Preprocess:
    """The eval transform that settings with a model and preprocessing fields ask for (None: the model's own)."""
    return preprocess_for(s.model, size=s.size, resize=s.resize, interpolation=s.interpolation, mean=s.mean,
                          std=s.std, crop_mode=s.crop_mode, views=views, seed=seed, decode=decode)


def preprocess_for(model: str, *, size: int | None = None, resize: int | None = None,
                   interpolation: str | None = None, mean: tuple | None = None, std: tuple | None = None,
                   crop_mode: str | None = None, views: int = 1, seed: int = 0, decode: str = "pil") -> Preprocess:
    """The eval transform for ``model``: what is given, else the alias's (the papers' 256/224 for DINOv2/v3),
    else the model's timm ``pretrained_cfg`` (``resolve_data_config``), so CLIP/SigLIP get their own mean/std.

    ``resize`` defaults to ``floor(size / crop_pct)`` as in timm's eval transform.
    """
    alias = MODELS.get(model)
    cfg = dict(alias.preprocess) if alias is not None and alias.preprocess is not None else _timm_eval(model)
    size = size or cfg["size"]
    return Preprocess(size=size, resize=resize or math.floor(size / cfg["crop_pct"]),
                      interpolation=interpolation or cfg["interpolation"], mean=tuple(mean or cfg["mean"]),
                      std=tuple(std or cfg["std"]), crop_mode=crop_mode or cfg["crop_mode"], views=views, seed=seed,
                      decode=decode)


def _timm_eval(model: str) -> dict[str, Any]:
    """timm's eval data config for a timm name (``arch`` or ``arch.tag``); the paper's when timm has none."""
    full = resolve_name(model)
    try:
        pcfg = get_pretrained_cfg(full)
    except RuntimeError:  # a tag timm does not know ("Invalid pretrained tag"); an arch without weights gives None
        pcfg = None
    if pcfg is None:
        return dict(PAPER_EVAL)
    d = resolve_data_config(pretrained_cfg=pcfg.to_dict())
    if d["input_size"][1] != d["input_size"][2]:
        raise ModelError(f"{model}: timm's input size {d['input_size']} is not square; pass --size and --resize")
    if d.get("crop_mode", "center") not in ("center", "squash"):
        raise ModelError(f"{model}: timm's crop mode {d['crop_mode']!r} is not supported; "
                         "pass --crop-mode center or squash")
    return {"size": d["input_size"][1], "crop_pct": d["crop_pct"], "interpolation": d["interpolation"],
            "mean": d["mean"], "std": d["std"], "crop_mode": d.get("crop_mode", "center")}
