"""Test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers") for any
timm VisionTransformer: register tokens added to a model trained without them, training-free.

A few MLP hidden neurons ("register neurons") write the high-norm outlier tokens. `find_neurons` finds
them: it takes the high-norm tokens at a detection block and scores every hidden neuron (the output of
``blocks[i].mlp.act``) by its |activation| at those positions. `install` appends K zero tokens after the
position embedding (no position of their own) and, in every register neuron, gives the registers a
large activation and the patches zero, so the outliers move from patches into the registers.

The rules are the authors' (github.com/nickjiang2378/test-time-registers, `find_register_neurons` and
`sign_max`) by default, each a named choice beside regcache's earlier rule (docs/registers.md, "Rules
and their sources"): outliers among [CLS] and the patches, or the patches only; a neuron's score as the
mean over images of its per-image mean, or pooled over all outliers; their sparsity filter, or none;
and the register's value as one per block over every token and listed neuron, or per neuron over the
patches. Everything is per image: an image's features do not depend on its batchmates (the authors'
code intervenes on the first image of a batch only).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .data import SampleError, decode_image, load_dataset, open_shard
from .identity import weights_of
from .models import load_model, preprocess_of, resolve_name
from .settings import RegistersFindSettings, default_cache_root
from .settings.choices import NEURON_AVERAGING, OUTLIER_TOKENS, PATCH_MODES, REGISTER_VALUES

DEFAULT_PERCENTILE = 99.0
#: the authors' sparsity filter: a neuron scores in an image only if its activation is below this at at least
#: SPARSE_FRACTION of the image's tokens (their defaults, enabled in their published notebook)
SPARSE_BELOW, SPARSE_FRACTION = 0.5, 0.5
#: below this 99th-percentile-over-median ratio of patch norms at every block, `registers find` says that
#: the model shows no clear high-norm tokens (artifacts in >1% of the patches put p99 at several times the median)
CLEAR_RATIO = 2.0


class RegisterError(ValueError):
    """A neuron file that cannot be used with this model, or a model test-time registers do not fit."""


@dataclass
class RegisterNeurons:
    """The neuron file: which hidden neurons of which blocks, found on which weights, and how."""

    model: str                       # timm name
    weights: dict                    # the weights they were found on (`regcache.identity.weights`)
    neurons: dict[int, list[int]]    # block index (from 0) -> hidden-neuron ids
    settings: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        d = asdict(self)
        d["neurons"] = {str(k): v for k, v in sorted(self.neurons.items())}
        Path(path).write_text(json.dumps(d, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> tuple["RegisterNeurons", str]:
        """The file and the sha256 of its bytes (part of a feature set's fingerprint)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            d = json.loads(raw)
            neurons = {int(k): [int(n) for n in v] for k, v in d["neurons"].items()}
            if not isinstance(d["weights"], dict):
                raise ValueError("written by an older regcache (weights by a state-dict digest): run "
                                 "'regcache registers find' again")
            out = cls(model=str(d["model"]), weights=dict(d["weights"]), neurons=neurons,
                      settings=dict(d.get("settings", {})), summary=dict(d.get("summary", {})))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RegisterError(f"{path} is not a register-neuron file from 'regcache registers find' ({e})") from None
        if not any(out.neurons.values()):
            raise RegisterError(f"{path} lists no neurons")
        return out, hashlib.sha256(raw).hexdigest()

    def check(self, model: torch.nn.Module, weights: dict, where: str) -> None:
        """Refuse other weights or blocks/neurons the model does not have: the ids mean nothing there."""
        if self.weights != weights:
            diff = ", ".join(k for k in sorted(set(weights) | set(self.weights))
                             if weights.get(k) != self.weights.get(k))
            raise RegisterError(f"{where} was found on other weights than this model's (they differ in {diff}): run "
                                "'regcache registers find' on this model; the crop size is part of it, since the "
                                "position table is resampled to it, so find at the --size you extract at")
        for block, ids in self.neurons.items():
            _act(model, block, where)
            hidden = _hidden_size(model, block)
            bad = [n for n in ids if not 0 <= n < hidden]
            if bad:
                raise RegisterError(f"{where}: block {block} has {hidden} hidden neurons, not {bad[:5]}")


def _check_model(model: torch.nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise RegisterError(f"test-time registers need a timm VisionTransformer, not {type(model).__name__} "
                            "(its tokens must pass patch_drop after the position embedding)")
    if getattr(model, "reg_token", None) is not None:
        raise RegisterError(f"the model already has {model.reg_token.shape[1]} trained registers")
    from timm.layers import GluMlp, SwiGLU

    glu = next((type(b.mlp).__name__ for b in model.blocks if isinstance(b.mlp, (GluMlp, SwiGLU))), None)
    if glu:
        raise RegisterError(f"test-time registers act on the output of each MLP's activation, which a gated MLP "
                            f"({glu}, as in ViT-g and many DINOv3 models) multiplies by a second branch; "
                            "only plain-MLP ViTs are supported")


def _act(model: torch.nn.Module, block: int, where: str = "the neuron file") -> torch.nn.Module:
    if not 0 <= block < len(model.blocks):
        raise RegisterError(f"{where}: block {block} does not exist (the model has {len(model.blocks)})")
    act = getattr(getattr(model.blocks[block], "mlp", None), "act", None)
    if act is None:
        raise RegisterError(f"{where}: block {block} has no mlp.act (not a timm Mlp)")
    return act


def _hidden_size(model: torch.nn.Module, block: int) -> int:
    return int(model.blocks[block].mlp.fc1.out_features)


def attach(model: "torch.nn.Module", registers: dict, weights: dict) -> dict:
    """Install the test-time registers ``registers`` (`identity.Plan.registers`: the neuron file, K, and what the
    neurons do) after checking the file against the model's ``weights`` (`identity.weights`); returns them with
    their neurons."""
    path = Path(registers["file"])
    neurons, _ = RegisterNeurons.load(path)
    neurons.check(model, weights, str(path))
    install(model, neurons.neurons, registers["k"], registers["patches"], registers["value"])
    return {**registers, "neurons": {str(b): ids for b, ids in sorted(neurons.neurons.items())}}


class Installed:
    """The hooks of `install`; `remove` gives the plain model back."""

    def __init__(self, model: torch.nn.Module, handles: list):
        self.model, self.handles = model, handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        del self.model.test_time_registers


def install(model: torch.nn.Module, neurons: dict[int, list[int]], k: int, patches: str = "zero",
            value: str = "block") -> Installed:
    """Give ``model`` ``k`` test-time registers driven by ``neurons`` (block -> hidden ids); see the module doc.

    ``value`` (`settings.choices.REGISTER_VALUES`): ``block`` writes one value per block and image into every
    listed neuron of the registers, the entry of largest |activation| over all tokens and listed neurons with
    its sign (the authors' ``sign_max``: a tie goes to the negative one); ``neuron`` writes each neuron's own
    largest |activation| over the patches. ``patches`` zero: the listed neurons are then zero at the patches
    ([CLS] keeps its activations, as in the authors' code). The registers are appended after the patches:
    `tokens.layout_of` reads ``model.test_time_registers`` and puts them at the end of the layout.
    """
    _check_model(model)
    if patches not in PATCH_MODES:
        raise RegisterError(f"unknown patch mode {patches!r}; known: {', '.join(PATCH_MODES)}")
    if value not in REGISTER_VALUES:
        raise RegisterError(f"unknown register value {value!r}; known: {', '.join(REGISTER_VALUES)}")
    if getattr(model, "test_time_registers", 0):
        raise RegisterError("the model already has test-time registers installed")
    start = int(model.num_prefix_tokens)

    def append(module, inputs, x):
        return torch.cat([x, x.new_zeros(x.shape[0], k, x.shape[2])], dim=1)

    def move(ids: torch.Tensor):
        def hook(module, inputs, a):
            a = a.clone()
            ids_ = ids.to(a.device)
            if value == "block":  # every token and listed neuron: one value per image, as sign_max takes it
                every = a[:, :, ids_].flatten(1)                                      # [B, T * n]
                top, bottom = every.max(1).values, every.min(1).values
                peak = torch.where(top.abs() > bottom.abs(), top, bottom).view(-1, 1, 1)  # [B, 1, 1]
            else:
                at_patches = a[:, start:-k, ids_]                                  # [B, L, n]
                peak = at_patches.gather(1, at_patches.abs().argmax(1, keepdim=True))  # [B, 1, n], sign kept
            a[:, -k:, ids_] = peak.expand(-1, k, len(ids_))
            if patches == "zero":
                a[:, start:-k, ids_] = 0
            return a
        return hook

    handles = [model.patch_drop.register_forward_hook(append)]
    for block, ids in sorted(neurons.items()):
        if ids:
            handles.append(_act(model, block).register_forward_hook(move(torch.tensor(sorted(ids)))))
    model.test_time_registers = k
    return Installed(model, handles)


# --------------------------------------------------------------------------- finding the neurons

@dataclass
class Found:
    """What `find_neurons` measured, and the neurons it keeps."""

    neurons: dict[int, list[int]]
    scores: list[tuple[int, int, float]]   # (block, neuron, mean |activation| at the outliers), best first
    detect_layer: int
    threshold: float                       # the absolute norm threshold used
    percentile: float                      # the percentile of patch norms that threshold is
    outliers: int                          # outlier patch tokens at the detection block
    tokens: int                            # patch tokens seen
    images: int
    block_norms: dict = field(default_factory=dict)  # block -> {median, p99, max, ratio} of patch norms


def token_norms_per_block(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Norm of every token ([CLS] and other prefix tokens, then the patches; no test-time register) at every
    block's output (before any norm), [B, blocks, T]."""
    with torch.inference_mode():
        _, inter = model.forward_intermediates(images, indices=None, norm=False, output_fmt="NLC",
                                               return_prefix_tokens=True)
    k = int(getattr(model, "test_time_registers", 0))
    full = [torch.cat([prefix, (y[:, :-k] if k else y)], dim=1) if prefix is not None else y for y, prefix in
            (block if isinstance(block, tuple) else (block, None) for block in inter)]
    return torch.stack([t.float().norm(dim=-1) for t in full], dim=1)


def find_neurons(model: torch.nn.Module, batches: Iterable[torch.Tensor], *, detect_layer: int | None = None,
                 max_layer: int | None = None, top_k: int = 10, threshold: float | None = None,
                 percentile: float = DEFAULT_PERCENTILE, outliers: str = "all", averaging: str = "per-image",
                 sparsity: bool = True) -> Found:
    """Two passes over ``batches`` (normalised images): token norms at every block, then neuron scores.

    The detection block (``None``: the one whose patch norms are most heavy-tailed, top-1% norm over the
    median) and its outliers (norm > ``threshold``, else above the ``percentile``-th percentile of the
    candidate tokens' norms there) decide where activations are read. ``outliers`` (`OUTLIER_TOKENS`): the
    candidates, ``all`` tokens ([CLS] and patches) or the ``patches``. A neuron's score (`NEURON_AVERAGING`):
    ``per-image``, the mean over the images with outliers of the mean |activation| at their outliers, or
    ``pooled``, the mean over all outliers. ``sparsity``: in each image, a neuron scores only where its
    activation is below ``SPARSE_BELOW`` at ``SPARSE_FRACTION`` of the tokens or more (else 0 for that image,
    which still counts). Neurons of blocks ``<= max_layer`` (default: the detection block) compete.
    """
    _check_model(model)
    if outliers not in OUTLIER_TOKENS or averaging not in NEURON_AVERAGING:
        raise RegisterError(f"unknown rule: outliers {outliers!r} (of {', '.join(OUTLIER_TOKENS)}), averaging "
                            f"{averaging!r} (of {', '.join(NEURON_AVERAGING)})")
    batches = list(batches)
    if not batches:
        raise RegisterError("no images to find register neurons on")
    depth, start = len(model.blocks), int(model.num_prefix_tokens)
    norms = torch.cat([token_norms_per_block(model, b) for b in batches])  # [N, blocks, T]
    stats = {}
    for i in range(depth):
        v = norms[:, i, start:].flatten().numpy()
        med, p99 = float(np.median(v)), float(np.percentile(v, 99))
        stats[i] = {"median": med, "p99": p99, "max": float(v.max()), "ratio": p99 / max(med, 1e-12)}
    if detect_layer is None:
        detect_layer = max(stats, key=lambda i: stats[i]["ratio"])
    if detect_layer < 0:
        detect_layer += depth
    if not 0 <= detect_layer < depth:
        raise RegisterError(f"detection block {detect_layer} does not exist (the model has {depth})")
    max_layer = detect_layer if max_layer is None else (max_layer + depth if max_layer < 0 else max_layer)
    if not 0 <= max_layer < depth:
        raise RegisterError(f"block {max_layer} does not exist (the model has {depth})")
    first = 0 if outliers == "all" else start  # the candidate tokens
    at = norms[:, detect_layer, first:].flatten().numpy()
    if threshold is None:
        threshold = float(np.percentile(at, percentile))
    percentile = float(100 * np.mean(at <= threshold))
    outlier_count = int((at > threshold).sum())
    if not outlier_count:
        raise RegisterError(f"no {'token' if outliers == 'all' else 'patch token'} at block {detect_layer} has a "
                            f"norm above {threshold:.2f} (max {at.max():.2f}); lower --threshold or choose another "
                            "--detect-layer")
    sums = {i: torch.zeros(_hidden_size(model, i), dtype=torch.float64) for i in range(max_layer + 1)}
    offset, images = 0, 0
    for b in batches:
        mask = norms[offset:offset + len(b), detect_layer] > threshold  # [B, T]
        mask[:, :first] = False
        offset += len(b)
        if not mask.any():
            continue
        images += int(mask.any(1).sum())
        handles = [_act(model, i).register_forward_hook(_accumulate(sums[i], mask, averaging, sparsity))
                   for i in sums]
        try:
            with torch.inference_mode():
                model.forward_intermediates(b, indices=[max_layer], stop_early=True, intermediates_only=True)
        finally:
            for h in handles:
                h.remove()
    per = images if averaging == "per-image" else outlier_count
    scores = sorted(((i, n, float(s[n] / per)) for i, s in sums.items() for n in range(len(s))),
                    key=lambda t: -t[2])[:top_k]
    chosen: dict[int, list[int]] = {}
    for i, n, _ in scores:
        chosen.setdefault(i, []).append(n)
    return Found(neurons={i: sorted(v) for i, v in sorted(chosen.items())}, scores=scores,
                 detect_layer=detect_layer, threshold=float(threshold), percentile=percentile,
                 outliers=outlier_count, tokens=int(at.size), images=int(norms.shape[0]), block_norms=stats)


def _accumulate(total: torch.Tensor, mask: torch.Tensor, averaging: str, sparsity: bool):
    """Adds each image's |activation| at its outliers ``mask`` [B, T] to ``total`` [H]: their sum (pooled) or
    their mean (per image), times the image's sparsity gate when ``sparsity``."""
    def hook(module, inputs, a):
        a = a[:, :mask.shape[1]].float()  # the tokens norms were taken of (no test-time register)
        gate = ((a < SPARSE_BELOW).sum(1) >= SPARSE_FRACTION * a.shape[1]).float() if sparsity else 1.0  # [B, H]
        at = (a.abs() * mask.unsqueeze(2)).sum(1)                                  # [B, H], sum at the outliers
        if averaging == "per-image":
            at = at / mask.sum(1, keepdim=True).clamp_min(1)                       # images without: 0
        total.add_((at * gate).sum(0).double().cpu())
    return hook


def dataset_batches(data: str, preprocess, limit: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first ``limit`` decodable images of a manifest or shard pattern, preprocessed and normalised."""
    ds = load_dataset(data)
    batch, seen = [], 0
    for url in ds.shards:
        for sample in open_shard(url, allow_pipe=False):
            try:
                img = decode_image(sample, ds.image_keys)
            except SampleError:
                continue
            batch.append(preprocess(img))
            seen += 1
            if len(batch) == batch_size or seen == limit:
                yield preprocess.normalize(torch.stack(batch))
                batch = []
            if seen == limit:
                return
    if batch:
        yield preprocess.normalize(torch.stack(batch))


def find(s: "RegistersFindSettings") -> Found:
    """`regcache registers find`: the register neurons of ``s.model`` on the first ``s.images`` images, written
    with the weights they were found on (`identity.weights_of`) and these settings to ``s.out``."""
    pre = preprocess_of(s)
    weights = weights_of(s, pre.size, default_cache_root() / ".digests")
    net = load_model(s, pre.size, weights["checkpoint"])  # the weights recorded are the weights loaded
    found = find_neurons(net, dataset_batches(s.data, pre, s.images, s.batch_size), detect_layer=s.detect_layer,
                         max_layer=s.max_layer, top_k=s.top_k, threshold=s.threshold, percentile=s.percentile,
                         outliers=s.outliers, averaging=s.averaging, sparsity=s.sparsity)
    settings = {"data": s.data, "images": found.images, "size": pre.size, "detect_layer": found.detect_layer,
                "threshold": found.threshold, "percentile": found.percentile,
                "max_layer": s.max_layer if s.max_layer is not None else found.detect_layer, "top_k": s.top_k,
                "outlier_rule": "threshold" if s.threshold is not None else "percentile", "outliers": s.outliers,
                "averaging": s.averaging, "sparsity": s.sparsity}
    summary = {"outliers": found.outliers, "patch_tokens": found.tokens,
               "scores": [[b, n, round(x, 4)] for b, n, x in found.scores],
               "block_norms": {str(b): {k: round(v, 3) for k, v in st.items()} for b, st in found.block_norms.items()}}
    RegisterNeurons(resolve_name(s.model), weights, found.neurons, settings, summary).save(s.out)
    return found
