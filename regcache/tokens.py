"""One forward pass of a timm ViT -> every token feature of DESIGN §2."""
from __future__ import annotations

import torch

from .features import TokenLayout


def layout_of(model: torch.nn.Module) -> TokenLayout:
    """The token layout of a timm VisionTransformer (class token, registers, patch grid, width)."""
    num_reg = int(getattr(model, "num_reg_tokens", 0))
    has_cls = int(model.num_prefix_tokens) - num_reg == 1
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return TokenLayout(has_cls=has_cls, num_reg=num_reg, grid=grid, dim=int(model.embed_dim))


def split_tokens(pre: torch.Tensor, post: torch.Tensor, layout: TokenLayout,
                 features: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Features from the last block's output ``pre`` [B, T, D] and ``post = final_norm(pre)``, in float32."""
    post = post.float()
    c, p = int(layout.has_cls), layout.num_prefix
    make = {
        "cls": lambda: post[:, 0],
        "patch": lambda: post[:, p:].mean(1),
        "reg": lambda: post[:, c:p].mean(1),
        "reg_all": lambda: post[:, c:p],
        "norms": lambda: pre.float().norm(dim=-1),
        "tokens": lambda: post[:, p:],
    }
    return {f: make[f]() for f in features}


@torch.inference_mode()
def token_features(model: torch.nn.Module, images: torch.Tensor, layout: TokenLayout,
                   features: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Run the model once; ``forward_intermediates`` gives the last block's output and its final norm."""
    post, inter = model.forward_intermediates(images, indices=1, norm=False, output_fmt="NLC",
                                              return_prefix_tokens=True)
    patches, prefix = inter[-1] if isinstance(inter[-1], tuple) else (inter[-1], None)
    pre = patches if prefix is None else torch.cat([prefix, patches], dim=1)
    return split_tokens(pre, post, layout, features)
