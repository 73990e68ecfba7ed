"""The token features of docs/design.md ("Features"): names, shapes and the token layout that splits them.

This is the one place that knows which features exist. It imports nothing heavy, so the probe
stage can use it without torch models or timm.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

from .names import did_you_mean

class FeatureError(ValueError):
    """A feature name that does not exist, or does not exist for this model."""


@dataclass(frozen=True)
class Tokens:
    """One block's tokens as a feature is made from them: ``pre`` [B, T, D] before the final norm, ``post`` after it
    (float32), ``head`` the norm the model applies after pooling (timm's ``fc_norm``; identity where none)."""

    pre: Any
    post: Any
    layout: "TokenLayout"
    head: Callable[[Any], Any]

    @property
    def patches(self):
        return self.post[:, self.layout.patch_slice]

    @property
    def registers(self):
        return self.post[:, self.layout.reg_slice]


@dataclass(frozen=True)
class FeatureSpec:
    """Every fact about one stored feature: what it is, its per-sample shape, the token type a model must have
    for it, whether it exists per block (``NAME@-k``), whether it is stored when none is named, and how it is made
    from a block's tokens (tensor methods only: this module imports no torch)."""

    name: str
    description: str
    shape: Callable[["TokenLayout"], tuple[int, ...]]
    make: Callable[[Tokens], Any]
    needs: str = ""          # "cls" or "reg": a model without that token type has no such feature
    per_block: bool = False  # NAME@-k: the same from block -k
    default: bool = False    # stored when the user names no feature

    def __str__(self) -> str:
        return self.description


def _specs(*specs: FeatureSpec) -> dict[str, FeatureSpec]:
    return {s.name: s for s in specs}


class _Features(dict):
    """The base features by name; ``NAME@-k`` names (one per block) are members too, their spec derived on demand,
    so that every reader that checks or describes a feature by name takes block features as they are."""

    def __contains__(self, name) -> bool:
        try:
            return isinstance(name, str) and split_name(name)[0] in self.keys()
        except FeatureError:
            return False

    def __missing__(self, name: str) -> FeatureSpec:
        if name not in self:
            raise KeyError(name)
        base, layer = split_name(name)
        return replace(self[base], name=name, description=f"{self[base].description}; from block {layer}")


#: the one list of features: adding one is one entry here and its test (tests/test_tokens.py checks every entry's
#: ``make`` against its ``shape`` on real timm models)
FEATURES: dict[str, FeatureSpec] = _Features(_specs(
    FeatureSpec("cls", "[CLS] token after the model's final norm, [D]", lambda lay: (lay.dim,),
                lambda t: t.head(t.post[:, 0]), needs="cls", per_block=True, default=True),
    FeatureSpec("patch", "mean of the patch tokens, with the model's final norm (muP), [D]", lambda lay: (lay.dim,),
                lambda t: t.head(t.patches.mean(1)), per_block=True, default=True),
    FeatureSpec("reg", "mean of the register tokens, with the model's final norm (muR), [D]", lambda lay: (lay.dim,),
                lambda t: t.head(t.registers.mean(1)), needs="reg", per_block=True, default=True),
    FeatureSpec("reg_all", "every register token after the model's final norm, [M, D]",
                lambda lay: (lay.num_reg, lay.dim), lambda t: t.head(t.registers), needs="reg"),
    FeatureSpec("norms", "L2 norm of every token before any final norm, [T] in layout order",
                lambda lay: (lay.num_tokens,), lambda t: t.pre.float().norm(dim=-1), per_block=True, default=True),
    FeatureSpec("tokens", "every patch token after the model's final norm, [L, D] (large: for small sets and token "
                          "probes)", lambda lay: (lay.num_patches, lay.dim), lambda t: t.head(t.patches)),
))
#: the features `--layers` also stores for earlier blocks, as ``NAME@-k`` (block -k counted from the last)
LAYER_FEATURES: tuple[str, ...] = tuple(n for n, s in FEATURES.items() if s.per_block)
#: stored when the user names none: every cheap one
DEFAULT_FEATURES: tuple[str, ...] = tuple(n for n, s in FEATURES.items() if s.default)
#: the features only a model with registers has
REGISTER_FEATURES: tuple[str, ...] = tuple(n for n, s in FEATURES.items() if s.needs == "reg")
#: how block features are made, recorded in every layout
INTERMEDIATE = ("NAME@-k is NAME from the output of block -k (counted from the last; -1 is the plain NAME), "
                "through the model's final norm as DINOv2's linear evaluation does; norms@-k before it")


def split_name(name: str) -> tuple[str, int]:
    """``"cls@-2"`` -> ``("cls", -2)``, ``"cls"`` -> ``("cls", -1)``; a malformed block name raises FeatureError."""
    base, sep, block = name.partition("@")
    if not sep:
        return name, -1
    if base not in LAYER_FEATURES:
        raise FeatureError(f"feature {name!r}: only {', '.join(LAYER_FEATURES)} exist per block")
    try:
        layer = int(block)
    except ValueError:
        layer = 0
    if layer >= 0:
        raise FeatureError(f"feature {name!r}: the block after @ is counted from the last, e.g. {base}@-2")
    return base, layer


def layer_name(base: str, layer: int) -> str:
    """The stored name of ``base`` from block ``layer`` (negative); the last block's is the plain name."""
    return base if layer == -1 else f"{base}@{layer}"


#: where a model applies its final norm (TokenLayout.norm), and so how the features above are made
NORMS: dict[str, str] = {
    "token": "norm(x) per token, then pooled: mean of normalised tokens (DINOv2, DINOv3, CLIP, DeiT)",
    "pooled": "pooled, then fc_norm: the norm of the mean, as timm's avg-pool head (EVA-02, SBB *_gap); "
              "single tokens (cls, reg_all, tokens) get the same fc_norm",
    "token+pooled": "norm per token, pooled, then fc_norm",
    "none": "no final norm",
}
#: where a layout's register tokens sit (TokenLayout.registers)
REGISTER_PLACES: dict[str, str] = {
    "prefix": "trained registers, after [CLS] (and DeiT's distillation token), before the patches",
    "end": "test-time registers (regcache.registers), appended after the patches, with no position embedding",
}


@dataclass(frozen=True)
class TokenLayout:
    """Token order of a ViT's output: ``[cls?, dist?, reg_1..reg_M, patch_1..patch_L]``, patches row-major;
    with test-time registers (``registers == "end"``) ``[cls?, dist?, patch_1..patch_L, reg_1..reg_M]``.

    ``num_dist`` counts DeiT's distillation token (stored only in ``norms``); ``norm`` says where the
    model applies its final norm (see `NORMS`), which defines every feature but ``norms``; ``depth``
    is the number of blocks (0: not recorded), for the block features ``NAME@-k``.
    """

    has_cls: bool
    num_reg: int
    grid: tuple[int, int]
    dim: int
    num_dist: int = 0
    norm: str = "token"
    registers: str = "prefix"
    depth: int = 0

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm placement {self.norm!r}; known: {', '.join(NORMS)}")
        if self.registers not in REGISTER_PLACES:
            raise ValueError(f"unknown register place {self.registers!r}; known: {', '.join(REGISTER_PLACES)}")

    @property
    def prefix(self) -> tuple[str, ...]:
        """The type of every token before the patches, in order: ``("cls", "dist", "reg", "reg", ...)``."""
        regs = ("reg",) * self.num_reg if self.registers == "prefix" else ()
        return ("cls",) * self.has_cls + ("dist",) * self.num_dist + regs

    @property
    def num_prefix(self) -> int:
        return len(self.prefix)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return int(self.has_cls) + self.num_dist + self.num_reg + self.num_patches

    @property
    def patch_slice(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_patches)

    @property
    def reg_slice(self) -> slice:
        start = int(self.has_cls) + self.num_dist if self.registers == "prefix" else self.patch_slice.stop
        return slice(start, start + self.num_reg)

    def has(self, token_type: str) -> bool:
        """Whether the layout has tokens of this type ("": no particular type)."""
        return {"": True, "cls": self.has_cls, "reg": self.num_reg > 0}[token_type]

    def available(self) -> tuple[str, ...]:
        return tuple(n for n, s in FEATURES.items() if self.has(s.needs))

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-sample shape of a stored feature (``NAME@-k`` has the shape of ``NAME``)."""
        return FEATURES[split_name(name)[0]].shape(self)

    def to_dict(self) -> dict:
        """Stored in regcache.json; ``order`` spells out the token types for readers without regcache."""
        order = list(self.prefix) + ["patch"] * self.num_patches + ["reg"] * (self.num_reg * (self.registers == "end"))
        return {**asdict(self), "prefix": list(self.prefix), "order": order, "blocks": INTERMEDIATE}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(has_cls=bool(d["has_cls"]), num_reg=int(d["num_reg"]), grid=tuple(d["grid"]), dim=int(d["dim"]),
                   num_dist=int(d.get("num_dist", 0)), norm=str(d.get("norm", "token")),
                   registers=str(d.get("registers", "prefix")), depth=int(d.get("depth", 0)))


def parse_features(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"cls,reg@-2"`` or ``["cls", "reg@-2"]`` -> ``("cls", "reg@-2")``: order kept, duplicates dropped,
    names checked; ``NAME@-1`` is the plain ``NAME``."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if "+" in name or ";" in name:  # how plots and tables print a combination, not how it is typed
            parts = ",".join(p.strip() for p in name.replace(";", "+").split("+"))
            raise FeatureError(f"feature {name!r}: a combination joins its features with a comma ({parts}); give "
                               "several combinations as several -f options")
        base, layer = split_name(name)
        if base not in FEATURES.keys():
            raise FeatureError(f"unknown feature {name!r}{did_you_mean(base, FEATURES.keys())}; known: "
                               f"{', '.join(FEATURES)}, and {'/'.join(LAYER_FEATURES)}@-k for block -k")
        name = layer_name(base, layer)
        if name not in out:
            out.append(name)
    if not out:
        raise FeatureError("no feature named")
    return tuple(out)


def parse_layers(spec: str) -> tuple[int, ...]:
    """``"-4,-3,-2,-1"``, ``"8,9,10,11"`` or ``"last4"`` -> block indices as given (``last4``: -4..-1)."""
    spec = spec.strip()
    if spec.startswith("last"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = 0
        if n < 1:
            raise FeatureError(f"{spec!r}: lastN needs a positive N, e.g. last4")
        return tuple(range(-n, 0))
    try:
        layers = tuple(dict.fromkeys(int(p) for p in spec.split(",") if p.strip()))
    except ValueError:
        raise FeatureError(f"{spec!r}: give block indices such as -4,-3,-2,-1 (or 8,9,10,11), or lastN")
    if not layers:
        raise FeatureError("no block named")
    return layers


def with_layers(features: tuple[str, ...], layers: Iterable[int], depth: int) -> tuple[str, ...]:
    """``features`` plus ``NAME@-k`` of each block in ``layers`` (absolute or from the last) for each of them
    that exists per block (`LAYER_FEATURES`)."""
    out = list(features)
    for layer in layers:
        if not -depth <= layer < depth:
            raise FeatureError(f"--layers: block {layer} does not exist in a model of {depth} blocks")
        rel = layer - depth if layer >= 0 else layer
        out += [layer_name(f, rel) for f in features if f in LAYER_FEATURES]
    return parse_features(out)


def select_features(requested: Iterable[str] | None, layout: TokenLayout) -> tuple[str, ...]:
    """The features to store for a model: the default set keeps those the model has; an explicit
    request for a token type the model lacks (or a block it lacks) is an error, never zeros."""
    if requested is None:
        return tuple(f for f in DEFAULT_FEATURES if f in layout.available())
    names = parse_features(requested)
    missing = [f for f in names if split_name(f)[0] not in layout.available()]
    if missing:
        needs = {FEATURES[split_name(f)[0]].needs for f in missing}
        what = "no class token" if "cls" in needs else "no register tokens"
        raise FeatureError(f"the model has {what}, so it has no {', '.join(missing)}")
    deep = [f for f in names if layout.depth and split_name(f)[1] < -layout.depth]
    if deep:
        raise FeatureError(f"the model has {layout.depth} blocks, so it has no {', '.join(deep)}")
    return names
