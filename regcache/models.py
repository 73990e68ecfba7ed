"""Backbones: what a model is (`model_facts`), its weights loaded and checked (aliases: `registry`; the eval transform:
`preprocess`, re-exported here)."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .features import TokenLayout
from .preprocess import (DEVICE_DECODERS, Preprocess, decoder, preprocess_for, preprocess_of,  # noqa: F401
                         resolve_device)
from .registry import MODELS, ModelError, resolve_name
from .settings import Backbone, weights_dir
from .tokens import layout_of


log = logging.getLogger("regcache")

def model_args(b: Backbone) -> dict:
    """The ``timm.create_model`` arguments: an alias's own (which give the original's semantics), the user's on top."""
    alias = MODELS.get(b.model)
    return {**(alias.kwargs if alias is not None else {}), **b.model_args}


def hub_name(name: str) -> str:
    """``arch.tag`` with timm's default tag filled in (the hub weights a name without a tag loads)."""
    from timm.models import get_pretrained_cfg

    full = resolve_name(name)
    if "." in full:
        return full
    cfg = get_pretrained_cfg(full)
    return f"{full}.{cfg.tag}" if cfg is not None and cfg.tag else full


@dataclass(frozen=True)
class ModelFacts:
    """What a backbone is at one input size, measured on an empty model on the meta device (no weights read or
    allocated, milliseconds a model): its token layout (registers counted from the model's own parameters) and
    its forward cost. Nothing here is guessed from the model's name."""

    timm_name: str
    layout: "TokenLayout"
    patch_size: int
    gflops: float  # per image and view, through the last block (2 per multiply-add, as torch's FlopCounterMode)


def model_facts(b: Backbone, img_size: int, registers: int = 0) -> ModelFacts:
    """`ModelFacts` of a backbone's settings at ``img_size``, measured once per model, arguments and size;
    ``registers``: test-time ones appended (their k tokens are in the layout; the cost is that of the model
    without them, k/T less)."""
    key = (resolve_name(b.model), json.dumps(model_args(b), sort_keys=True), img_size, registers)
    if key not in _FACTS:

        with torch.device("meta"):
            model = _create(b, pretrained=False, img_size=img_size)
            x = torch.empty(1, 3, img_size, img_size)
        with FlopCounterMode(display=False) as count:
            model.forward_features(x)
        model.test_time_registers = registers
        _FACTS[key] = ModelFacts(key[0], layout_of(model), int(model.patch_embed.patch_size[0]),
                                 count.get_total_flops() / 1e9)
    return _FACTS[key]


_FACTS: dict[tuple, ModelFacts] = {}


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the loaded weights: the same weights give the same digest from the hub or a file."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a safetensors file, or of a torch file loaded with ``weights_only=True`` (never an unpickled
    object), and ``sha256:HEX`` of the very bytes they were read from: the file is read once, so the digest a
    set's identity holds is that of the weights loaded, even if the file is replaced meanwhile."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(data), digest
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"checkpoint {path} is not a readable safetensors file ({e}); a torch checkpoint "
                             "needs a .pt/.pth name") from None
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:  # pickle with objects, or
        # not a torch file (a bad zip or magic number is a RuntimeError)
        raise ModelError(f"checkpoint {path} cannot be read as weights only: {e}") from e
    for k in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    return sd, digest


def _timm_filter(model: torch.nn.Module) -> Callable | None:
    """The architecture's own ``checkpoint_filter_fn`` (key conversion, position-embedding resize)."""
    return getattr(__import__(type(model).__module__, fromlist=["checkpoint_filter_fn"]), "checkpoint_filter_fn", None)


def drop_classifier(sd: dict[str, torch.Tensor], model: torch.nn.Module, path: str | Path = "") -> dict:
    """Without the classifier keys the model lacks, as timm's ``load_pretrained`` drops them for num_classes=0.

    The names are the model's ``pretrained_cfg['classifier']`` (``head``; ``head``, ``head_dist`` for
    DeiT distilled), so a model's own ``state_dict()`` with its head loads; ``fc_norm`` is never dropped.
    """
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    own = model.state_dict()
    drop = [k for n in ((names,) if isinstance(names, str) else names) for k in (f"{n}.weight", f"{n}.bias")
            if k in sd and k not in own]
    if drop:
        log.info("checkpoint %s: classifier %s not loaded (features only, as timm does with num_classes=0)",
                 path, ", ".join(drop))
    return {k: v for k, v in sd.items() if k not in drop}


def load_checkpoint(model: torch.nn.Module, path: str | Path,
                    filter_fn: Callable | None | str = "timm") -> str:
    """Load a checkpoint strictly, adapting it as timm does (position-embedding resize); name every mismatch.
    Returns the digest of the bytes loaded (`read_checkpoint`)."""
    sd, digest = read_checkpoint(path)
    filter_fn = _timm_filter(model) if filter_fn == "timm" else filter_fn
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except (KeyError, RuntimeError, ValueError, AssertionError, IndexError):  # a checkpoint of another
            pass  # architecture: its raw keys go to the mismatch report below
    own = model.state_dict()
    sd = drop_classifier(sd, model, path)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:12])}{' …' if len(items) > 12 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise ModelError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return digest


def dinov2_interpolate(grid_pos: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` on the patch part ``[1, N*N, D]`` of a position table.

    As the hub models run it (``interpolate_antialias=False, interpolate_offset=0.1``): bicubic in
    float32, no antialias, a scale factor ``(n + 0.1) / N`` instead of an output size.
    """
    n_old = math.isqrt(grid_pos.shape[1])
    if n_old * n_old != grid_pos.shape[1]:
        raise ModelError(f"position table of {grid_pos.shape[1]} patches is not a square grid")
    if (n_old, n_old) == tuple(new_grid):
        return grid_pos
    dim = grid_pos.shape[-1]
    scale = ((new_grid[0] + 0.1) / n_old, (new_grid[1] + 0.1) / n_old)
    out = torch.nn.functional.interpolate(grid_pos.float().reshape(1, n_old, n_old, dim).permute(0, 3, 1, 2),
                                          scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != tuple(new_grid):
        raise ModelError(f"DINOv2 interpolation gave a {tuple(out.shape[-2:])} grid, not {tuple(new_grid)}")
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(grid_pos.dtype)


def _dinov2_filter(model: torch.nn.Module) -> Callable[[dict, torch.nn.Module], dict]:
    """timm's checkpoint filter, with the position table brought to the model's grid the DINOv2 way first.

    DINOv2 interpolates at every forward pass; our inputs always have the crop size, so that table is
    one constant, computed here once from the weights' own table (equal to the hub's, tested).
    """
    timm_filter = _timm_filter(model)

    def f(sd: dict, model: torch.nn.Module) -> dict:
        sd = dict(sd.get("model", sd.get("state_dict", sd)))
        pos = sd.get("pos_embed")
        if pos is not None:
            # hub layout: [cls, patches] (registers have none); timm layout: the model's own prefix entries
            prefix = 1 if "register_tokens" in sd else (0 if getattr(model, "no_embed_class", False)
                                                        else int(model.num_prefix_tokens))
            grid = tuple(int(g) for g in model.patch_embed.grid_size)
            sd["pos_embed"] = torch.cat([pos[:, :prefix], dinov2_interpolate(pos[:, prefix:], grid)], dim=1)
        return timm_filter(sd, model) if timm_filter is not None else sd

    return f


def _create(b: Backbone, **kw: Any) -> torch.nn.Module:
    """``timm.create_model`` of the backbone, headless; model arguments timm cannot take are named."""
    import timm

    name, kwargs = resolve_name(b.model), model_args(b)
    try:
        return timm.create_model(name, num_classes=0, **kw, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        if not b.model_args:
            raise
        raise ModelError(f"{name} cannot be built with the model arguments {kwargs} ({type(e).__name__}: {e})") from None


def check_hub(name: str, model_args: dict | None = None, timeout: float = 5.0) -> None:
    """Hub weights that are neither in the local hub cache nor reachable within seconds are refused at once,
    naming the model and the hub file and what works instead (timm would retry for minutes, then say only
    that something went wrong)."""
    import urllib.request

    from timm.models import get_pretrained_cfg

    if {"pretrained_cfg", "pretrained_cfg_overlay"} & set(model_args or {}):
        return  # the user points timm at other weights (a file, a URL): timm says what went wrong
    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return  # weights from a URL or elsewhere: timm says what went wrong
    from huggingface_hub import constants, try_to_load_from_cache

    files = ("model.safetensors", "pytorch_model.bin")
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
        return
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if why is None:
        try:
            urllib.request.urlopen(f"{constants.ENDPOINT}/api/models/{repo}", timeout=timeout).close()
            return
        except (OSError, HTTPException, ValueError) as e:  # no network, a proxy, DNS: all the same here
            why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    here = local_weights(name.split(".")[0])
    serve = ("; local weights of this architecture: " + "; ".join(
        f"--checkpoint {p}" + (f" (or -m {a})" if a else "") for p, a in here) if here else
             "; `regcache weights` lists local weights (the demo's DINOv2 ViT-S/14 is -m vits_offline)")
    raise ModelError(f"{name}: its weights ({repo}, {files[0]}) are not in the local hub cache and the hub cannot be "
                     f"reached ({why}). Use local weights with --checkpoint FILE (safetensors or a torch file)"
                     f"{serve}; for a smoke test without any weights, --random-init SEED")


def local_weights(arch: str | None = None) -> list[tuple[Path, str | None]]:
    """The weights in the weights folder (safetensors whose metadata names their timm model), of ``arch`` if
    given, each with the alias that names it (None for none): what serves when the hub does not."""
    from safetensors import SafetensorError, safe_open

    by_file = {a.weights: name for name, a in MODELS.items() if a.weights}
    out = []
    for path in sorted(weights_dir().glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                model = (f.metadata() or {}).get("timm_model")
        except (SafetensorError, OSError):
            continue
        if model and (arch is None or model.split(".")[0] == arch):
            out.append((path, by_file.get(path.name)))
    return out


def trained_size(path: str | Path) -> int | None:
    """The crop size a checkpoint records it was trained at (``img_size`` metadata, as `regcache registers distill`
    writes it); None when it records none."""
    from safetensors import SafetensorError, safe_open  # as local_weights: the header alone, no torch load

    if Path(path).suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), "pt") as f:
            size = (f.metadata() or {}).get("img_size")
    except (SafetensorError, OSError):
        return None
    return int(size) if size and size.isdigit() else None


def load_model(b: Backbone, img_size: int, checkpoint_digest: str | None = None) -> torch.nn.Module:
    """A frozen eval-mode timm ViT at ``img_size`` with hub weights, ``b.checkpoint``, or seeded random ones.

    ``b.pos_embed == "dinov2"`` resamples the weights' position table as DINOv2's hub code does
    (`regcache.settings.choices.POS_EMBED`); it needs a learned absolute table and a fixed input size.
    ``checkpoint_digest``: the digest the caller recorded for ``b.checkpoint`` (a set's identity); weights whose
    bytes have another are refused, so that a file replaced since never runs under the old file's name.
    """
    hub = b.checkpoint is None and b.random_init is None
    dinov2 = b.pos_embed == "dinov2"
    name = resolve_name(b.model)
    if hub and not dinov2:
        check_hub(name, b.model_args)
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's generator
        if b.random_init is not None:
            torch.manual_seed(b.random_init)
        model = _create(b, pretrained=hub and not dinov2, img_size=img_size)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "num_prefix_tokens"):
        raise ModelError(f"{name} is not a timm VisionTransformer (no forward_intermediates)")
    if dinov2 and (getattr(model, "pos_embed", None) is None or getattr(model, "dynamic_img_size", False)):
        raise ModelError(f"--pos-embed dinov2 needs a learned position table at a fixed input size; "
                         f"{name} has {'none' if getattr(model, 'pos_embed', None) is None else 'a dynamic one'}")
    if dinov2 and hub:
        from timm.models import load_pretrained

        check_hub(name, b.model_args)
        load_pretrained(model, num_classes=0, filter_fn=_dinov2_filter(model))
    elif b.checkpoint is not None:
        loaded = load_checkpoint(model, b.checkpoint, _dinov2_filter(model) if dinov2 else "timm")
        trained = trained_size(b.checkpoint)
        if trained is not None and trained != img_size:
            log.warning("%s was trained at %d px and runs here at %d (its position table resampled): its "
                        "registers and position table were fit at %d; give --size %d to use it as trained",
                        b.checkpoint, trained, img_size, trained, trained)
        if checkpoint_digest is not None and loaded != checkpoint_digest:
            raise ModelError(f"checkpoint {b.checkpoint} changed after this run was planned: its bytes are "
                             f"{loaded[:19]}…, the run was planned for {checkpoint_digest[:19]}…; run the command "
                             "again (it plans for the file as it is then)")
    return model.eval().requires_grad_(False)
