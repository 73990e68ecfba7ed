"""Backbones: aliases to timm names, weight loading, and the preprocessing that is part of a cache's identity."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

#: short names users type -> timm names (name.tag); any other timm ViT name is accepted as is
ALIASES: dict[str, str] = {
    **{s: f"vit_{n}_patch14_dinov2.lvd142m" for s, n in
       [("vits", "small"), ("vitb", "base"), ("vitl", "large"), ("vitg", "giant")]},
    **{f"{s}_reg": f"vit_{n}_patch14_reg4_dinov2.lvd142m" for s, n in
       [("vits", "small"), ("vitb", "base"), ("vitl", "large"), ("vitg", "giant")]},
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """An unknown model name, or a checkpoint that does not fit the architecture."""


def resolve_name(name: str) -> str:
    """Alias or timm name (``arch`` or ``arch.tag``) -> the timm name; unknown names list the aliases."""
    import timm

    full = ALIASES.get(name, name)
    if not timm.is_model(full.split(".")[0]):
        aliases = ", ".join(f"{a} ({n})" for a, n in ALIASES.items())
        raise ModelError(f"unknown model {name!r}: not an alias and not a timm model. Aliases: {aliases}")
    return full


@dataclass(frozen=True)
class Preprocess:
    """PIL-side eval transform: resize the shorter side, center-crop, normalise (timm's eval transform).

    ``views > 1`` adds seeded random-resized-crop + flip views 1..views-1 after the plain view 0,
    for training heads with augmentation without the backbone (DESIGN §2).
    """

    size: int = 224
    resize: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    views: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least the crop size ({self.size})")
        if self.views < 1:
            raise ValueError("views must be >= 1")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {self.mean} and {self.std}")

    def to_dict(self) -> dict:
        return asdict(self)

    @cached_property
    def _plain(self) -> Callable[[Any], torch.Tensor]:
        from torchvision import transforms as T

        interp = T.InterpolationMode(self.interpolation)
        return T.Compose([T.Resize(self.resize, interpolation=interp), T.CenterCrop(self.size), T.PILToTensor()])

    @cached_property
    def _augment(self) -> Callable[[Any], torch.Tensor]:
        from torchvision import transforms as T

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


@dataclass(frozen=True)
class ModelSpec:
    """What determines a backbone: the timm name, optional local weights, and architecture overrides."""

    name: str
    checkpoint: str | None = None
    kwargs: dict = field(default_factory=dict)

    @property
    def timm_name(self) -> str:
        return resolve_name(self.name)


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the loaded weights: the same weights give the same digest from the hub or a file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Safetensors, or a torch file loaded with ``weights_only=True`` (never an unpickled object)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with objects, or not a torch file
        raise ModelError(f"checkpoint {path} cannot be read as weights only: {e}") from e
    for k in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    return sd


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a checkpoint strictly, adapting it as timm does (position-embedding resize); name every mismatch."""
    sd = read_checkpoint(path)
    filter_fn = getattr(__import__(type(model).__module__, fromlist=["checkpoint_filter_fn"]),
                        "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception:  # leave the raw keys for the mismatch report below
            pass
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:12])}{' …' if len(items) > 12 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise ModelError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_model(spec: ModelSpec, img_size: int) -> torch.nn.Module:
    """A frozen eval-mode timm ViT at ``img_size`` with hub weights, or ``spec.checkpoint`` when given."""
    import timm

    model = timm.create_model(spec.timm_name, pretrained=spec.checkpoint is None, num_classes=0,
                              img_size=img_size, **spec.kwargs)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "num_prefix_tokens"):
        raise ModelError(f"{spec.timm_name} is not a timm VisionTransformer (no forward_intermediates)")
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model.eval().requires_grad_(False)
