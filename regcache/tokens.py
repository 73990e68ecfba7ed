"""One forward pass of a timm ViT -> every token feature (docs/design.md, "Features")."""
from __future__ import annotations

from typing import Callable

import torch

from .features import FEATURES, TokenLayout, Tokens, layer_name, split_name


class LayoutError(ValueError):
    """A model whose prefix tokens regcache cannot name: guessing would shift every patch."""


def _active(module: torch.nn.Module | None) -> bool:
    return module is not None and not isinstance(module, torch.nn.Identity)


def layout_of(model: torch.nn.Module) -> TokenLayout:
    """The token layout of a timm ViT (VisionTransformer, its distilled variant, Eva/DINOv3).

    Prefix tokens are counted from the token parameters themselves (Eva has no ``num_reg_tokens``;
    DeiT's ``dist_token`` is neither class token nor register), then checked against
    ``num_prefix_tokens``.
    """
    has_cls = getattr(model, "cls_token", None) is not None
    num_dist = int(getattr(model, "dist_token", None) is not None)
    reg = getattr(model, "reg_token", None)
    num_reg = int(reg.shape[1]) if reg is not None else 0
    if has_cls + num_dist + num_reg != int(model.num_prefix_tokens):
        raise LayoutError(f"{type(model).__name__} has {model.num_prefix_tokens} prefix tokens, but regcache "
                          f"finds {int(has_cls)} class, {num_dist} distillation and {num_reg} register tokens")
    norm, fc_norm = _active(getattr(model, "norm", None)), _active(getattr(model, "fc_norm", None))
    placement = {(True, False): "token", (False, True): "pooled", (True, True): "token+pooled"}.get((norm, fc_norm),
                                                                                                  "none")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    extra = int(getattr(model, "test_time_registers", 0))  # appended by regcache.registers.install
    if extra and num_reg:
        raise LayoutError(f"{type(model).__name__} has {num_reg} trained registers and {extra} test-time ones")
    return TokenLayout(has_cls=has_cls, num_reg=num_reg or extra, grid=grid, dim=int(model.embed_dim),
                       num_dist=num_dist, norm=placement, registers="end" if extra else "prefix",
                       depth=len(model.blocks))


def split_tokens(pre: torch.Tensor, post: torch.Tensor, layout: TokenLayout, features: tuple[str, ...],
                 pooled_norm: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Features from the last block's output ``pre`` [B, T, D] and ``post = norm(pre)``, in float32.

    ``pooled_norm`` is the norm a model applies after pooling (timm's ``fc_norm``): it goes on every
    pooled vector and, likewise, on every single token, so each feature carries the norm the model
    actually applies (`features.NORMS`).
    """
    if pre.shape[1] != layout.num_tokens:
        raise LayoutError(f"the model returned {pre.shape[1]} tokens, the layout expects {layout.num_tokens} "
                          f"({layout.num_prefix} prefix + {layout.grid[0]}x{layout.grid[1]} patches"
                          f"{f' + {layout.num_reg} test-time registers' if layout.registers == 'end' else ''})")
    head = (lambda t: pooled_norm(t).float()) if pooled_norm is not None else (lambda t: t)
    tokens = Tokens(pre, post.float(), layout, head)
    return {f: FEATURES[f].make(tokens) for f in features}


@torch.inference_mode()
def token_features(model: torch.nn.Module, images: torch.Tensor, layout: TokenLayout,
                   features: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Run the model once; ``forward_intermediates`` gives the output of the last block and of every block
    a ``NAME@-k`` feature asks for. Earlier blocks' tokens go through the final norm (DINOv2's linear
    evaluation); the last block's normalised tokens are the model's own output."""
    by_layer: dict[int, list[str]] = {}
    for f in features:
        base, layer = split_name(f)
        by_layer.setdefault(layer, []).append(base)
    layers = sorted(by_layer)
    depth = len(model.blocks)
    post, inter = model.forward_intermediates(images, indices=[depth + i for i in layers], norm=False,
                                              output_fmt="NLC", return_prefix_tokens=layout.num_prefix > 0)
    fc_norm = getattr(model, "fc_norm", None)
    out = {}
    for layer, block in zip(layers, inter):
        patches, prefix = block if isinstance(block, tuple) else (block, None)
        pre = patches if prefix is None else torch.cat([prefix, patches], dim=1)
        got = split_tokens(pre, post if layer == -1 else model.norm(pre), layout, tuple(by_layer[layer]),
                           fc_norm if _active(fc_norm) else None)
        out.update({layer_name(base, layer): v for base, v in got.items()})
    return {f: out[f] for f in features}
