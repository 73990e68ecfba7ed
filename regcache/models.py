"""Backbones: weight loading, and the preprocessing that is part of a cache's identity (aliases: `registry`)."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from .features import TokenLayout
from .registry import IMAGENET_MEAN, IMAGENET_STD, MODELS, PAPER_EVAL, ModelError, resolve_name
from .settings import Backbone, Preprocessing, weights_dir
from .tokens import layout_of


log = logging.getLogger("regcache")

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
    """``auto``: cuda if present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

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
        if checkpoint_digest is not None and loaded != checkpoint_digest:
            raise ModelError(f"checkpoint {b.checkpoint} changed after this run was planned: its bytes are "
                             f"{loaded[:19]}…, the run was planned for {checkpoint_digest[:19]}…; run the command "
                             "again (it plans for the file as it is then)")
    return model.eval().requires_grad_(False)
