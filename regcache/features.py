"""The token features of DESIGN §2: names, shapes and the token layout that splits them.

This is the one place that knows which features exist. It imports nothing heavy, so the probe
stage can use it without torch models or timm.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

#: name -> what it is (shown by `--help` and `regcache ls`)
FEATURES: dict[str, str] = {
    "cls": "[CLS] token after the model's final norm, [D]",
    "patch": "mean of the patch tokens, with the model's final norm (muP), [D]",
    "reg": "mean of the register tokens, with the model's final norm (muR), [D]",
    "reg_all": "every register token after the model's final norm, [M, D]",
    "norms": "L2 norm of every token before any final norm, [T] in layout order",
    "tokens": "every patch token after the model's final norm, [L, D] (large: for small sets and token probes)",
}
#: where a model applies its final norm (TokenLayout.norm), and so how the features above are made
NORMS: dict[str, str] = {
    "token": "norm(x) per token, then pooled: mean of normalised tokens (DINOv2, DINOv3, CLIP, DeiT)",
    "pooled": "pooled, then fc_norm: the norm of the mean, as timm's avg-pool head (EVA-02, SBB *_gap); "
              "single tokens (cls, reg_all, tokens) get the same fc_norm",
    "token+pooled": "norm per token, pooled, then fc_norm",
    "none": "no final norm",
}
#: stored when the user names none: every cheap one
DEFAULT_FEATURES: tuple[str, ...] = ("cls", "patch", "reg", "norms")


class FeatureError(ValueError):
    """A feature name that does not exist, or does not exist for this model."""


@dataclass(frozen=True)
class TokenLayout:
    """Token order of a ViT's output: ``[cls?, dist?, reg_1..reg_M, patch_1..patch_L]``, patches row-major.

    ``num_dist`` counts DeiT's distillation token (stored only in ``norms``); ``norm`` says where the
    model applies its final norm (see `NORMS`), which defines every feature but ``norms``.
    """

    has_cls: bool
    num_reg: int
    grid: tuple[int, int]
    dim: int
    num_dist: int = 0
    norm: str = "token"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm placement {self.norm!r}; known: {', '.join(NORMS)}")

    @property
    def prefix(self) -> tuple[str, ...]:
        """The type of every prefix token, in order: ``("cls", "dist", "reg", "reg", ...)``."""
        return ("cls",) * self.has_cls + ("dist",) * self.num_dist + ("reg",) * self.num_reg

    @property
    def reg_start(self) -> int:
        return int(self.has_cls) + self.num_dist

    @property
    def num_prefix(self) -> int:
        return len(self.prefix)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def available(self) -> tuple[str, ...]:
        absent = ({"cls"} if not self.has_cls else set()) | ({"reg", "reg_all"} if not self.num_reg else set())
        return tuple(f for f in FEATURES if f not in absent)

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-sample shape of a stored feature."""
        shapes = {"cls": (self.dim,), "patch": (self.dim,), "reg": (self.dim,),
                  "reg_all": (self.num_reg, self.dim), "norms": (self.num_tokens,),
                  "tokens": (self.num_patches, self.dim)}
        return shapes[name]

    def to_dict(self) -> dict:
        """Stored in regcache.json; ``prefix`` spells out the token types for readers without regcache."""
        return {**asdict(self), "prefix": list(self.prefix)}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(has_cls=bool(d["has_cls"]), num_reg=int(d["num_reg"]), grid=tuple(d["grid"]), dim=int(d["dim"]),
                   num_dist=int(d.get("num_dist", 0)), norm=str(d.get("norm", "token")))


def parse_features(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"cls,reg"`` or ``["cls", "reg"]`` -> ``("cls", "reg")``: order kept, duplicates dropped, names checked."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name not in FEATURES:
            raise FeatureError(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise FeatureError("no feature named")
    return tuple(out)


def select_features(requested: Iterable[str] | None, layout: TokenLayout) -> tuple[str, ...]:
    """The features to store for a model: the default set keeps those the model has; an explicit
    request for a token type the model lacks is an error, never zeros."""
    if requested is None:
        return tuple(f for f in DEFAULT_FEATURES if f in layout.available())
    names = parse_features(requested)
    missing = [f for f in names if f not in layout.available()]
    if missing:
        what = "no class token" if "cls" in missing else "no register tokens"
        raise FeatureError(f"the model has {what}, so it has no {', '.join(missing)}")
    return names
