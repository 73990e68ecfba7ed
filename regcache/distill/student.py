"""The student: the teacher's weights in timm's register architecture, new register tokens, and what trains.

The student is built as the register variant timm has for the teacher (``vit_small_patch14_dinov2`` ->
``vit_small_patch14_reg4_dinov2``: ``reg_tokens=N, no_embed_class=True``), so its checkpoint loads wherever
timm's register models load. Plain DINOv2-style models add a position to [CLS] (``no_embed_class=False``, a
table of 1 + L rows); the register layout does not, so [CLS] carries its position: `convert` folds
``cls_token + pos_embed[:, :1]`` into ``cls_token`` and drops that row, which changes no output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..models import model_args
from ..registry import MODELS, ModelError, resolve_name
from ..settings import Backbone


class DistillError(ValueError):
    """Settings, data or a model that distillation cannot use; the message names it and says why."""


@dataclass(frozen=True)
class Arch:
    """A timm architecture and its ``create_model`` arguments (without img_size and num_classes)."""

    name: str
    args: dict = field(default_factory=dict)

    def create(self, img_size: int | None = None) -> torch.nn.Module:
        """The model with random weights (``img_size`` None: timm's default, which every timm model takes)."""
        size = {} if img_size is None else {"img_size": img_size}
        return timm.create_model(self.name, pretrained=False, num_classes=0, **size, **self.args)


def teacher_arch(b: Backbone) -> Arch:
    """The teacher's architecture as regcache builds it (an alias's arguments, the user's on top)."""
    return Arch(resolve_name(b.model).split(".")[0], model_args(b))


def check_teacher(model: torch.nn.Module, name: str, size: int) -> None:
    """Refuse, by name and why, a model PH-Reg cannot give registers to here."""
    if not isinstance(model, VisionTransformer):
        raise DistillError(f"{name} is a {type(model).__name__}, not a timm VisionTransformer: the student is built "
                           "as timm's register variant of a VisionTransformer (reg_tokens, no_embed_class)")
    if getattr(model, "reg_token", None) is not None:
        raise DistillError(f"{name} already has {model.reg_token.shape[1]} trained registers")
    has_cls = getattr(model, "cls_token", None) is not None
    if int(model.num_prefix_tokens) != int(has_cls):
        raise DistillError(f"{name} has {model.num_prefix_tokens} prefix tokens besides its patches (a distillation "
                           "token?): only [CLS] and patches can be carried over")
    if getattr(model, "pos_embed", None) is None or getattr(model, "dynamic_img_size", False):
        raise DistillError(f"{name} has no learned position table at a fixed input size, which the student's "
                           "trained table needs")
    patch = model.patch_embed.patch_size[0]
    if size % patch:
        raise DistillError(f"crop size {size} is not a multiple of {name}'s patch size {patch}: views shift and flip "
                           "by whole patches")


def student_arch(teacher: Arch, registers: int) -> Arch:
    """The teacher's register variant: timm's own register model when timm has one of the same build (the name a
    checkpoint is loaded with, e.g. ``vit_small_patch14_reg4_dinov2``), else the teacher's arch with
    ``reg_tokens`` and ``no_embed_class``."""
    generic = Arch(teacher.name, {**teacher.args, "reg_tokens": registers, "no_embed_class": True})
    own = re.sub(r"(_patch\d+)", rf"\1_reg{registers}", teacher.name, count=1)
    if own == teacher.name or not timm.is_model(own):
        return generic
    candidate = Arch(own, {k: v for k, v in teacher.args.items() if k not in ("reg_tokens", "no_embed_class")})
    return candidate if _same_build(candidate, generic) else generic


def _same_build(a: Arch, b: Arch) -> bool:
    """Two architectures that build the same model: modules, parameter shapes and token options (empty models on
    the meta device: nothing is allocated)."""
    with torch.device("meta"):
        try:
            x, y = a.create(224), b.create(224)
        except (TypeError, ValueError, AssertionError):
            return False
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    attrs = lambda m: (m.no_embed_class, m.num_prefix_tokens, m.global_pool, repr(m))  # noqa: E731
    return type(x) is type(y) and shapes(x) == shapes(y) and attrs(x) == attrs(y)


def alias_of(arch: Arch) -> str | None:
    """The alias (`registry.MODELS`) that builds ``arch`` with no arguments of its own, if any (vits_reg)."""
    return next((a for a, m in MODELS.items() if m.timm_name.split(".")[0] == arch.name and not m.kwargs
                 and not m.weights), None)


def convert(teacher: VisionTransformer) -> dict[str, torch.Tensor]:
    """The teacher's weights in the register layout: [CLS]'s position folded into it, its row dropped."""
    sd = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    if not teacher.no_embed_class:
        prefix = int(teacher.num_prefix_tokens)
        if prefix:
            sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :prefix]
        sd["pos_embed"] = sd["pos_embed"][:, prefix:].contiguous()
    return sd


def build_student(teacher: VisionTransformer, arch: Arch, size: int, registers: int, seed: int) -> VisionTransformer:
    """``arch`` at ``size`` with the teacher's weights and ``registers`` new tokens drawn from N(0, 1/D) (plain
    normal, std 1/sqrt(D), as the authors), seeded."""
    student = arch.create(size)
    sd = convert(teacher)
    if registers:
        g = torch.Generator().manual_seed(seed)
        dim = int(student.embed_dim)
        sd["reg_token"] = torch.randn(1, registers, dim, generator=g) / dim ** 0.5
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelError(f"{arch.name} {arch.args} does not take {type(teacher).__name__}'s weights: missing "
                         f"{missing[:6]}, unexpected {unexpected[:6]}")
    return student


def unlock(student: VisionTransformer, names: list[str]) -> list[str]:
    """Freeze everything but the registers and ``names`` (`settings.distill.UNLOCK`); the trained parameters'
    names, in the model's order."""
    depth = len(student.blocks)
    prefixes = {"registers": ("reg_token",), "pos_embed": ("pos_embed", "cls_token"),
                "patch_embed": ("patch_embed.",), "last_block": (f"blocks.{depth - 1}.",),
                "last_2_blocks": (f"blocks.{depth - 2}.", f"blocks.{depth - 1}.")}
    unknown = set(names) - set(prefixes)
    if unknown:
        raise DistillError(f"cannot unlock {', '.join(sorted(unknown))}: known are {', '.join(prefixes)}")
    wanted = tuple(p for n in ("registers", *names) for p in prefixes[n])
    trained = []
    for name, p in student.named_parameters():
        p.requires_grad_(any(name == w or (w.endswith(".") and name.startswith(w)) for w in wanted))
        if p.requires_grad:
            trained.append(name)
    return trained


def patch_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The patch tokens after the final norm, [B, L, D]: ``forward_features`` without the prefix tokens."""
    return model.forward_features(images)[:, int(model.num_prefix_tokens):]
