"""Extraction throughput: full pipeline ÷ bare model, on the same images, in one run.

    python bench/extract.py [--images 256] [--batch-size 32] [--workers 1] [--precision bf16]

Writes JPEG shards of photo-sized images (scikit-image's photos, random crops, ~500x375),
then times (1) the bare model's forward_features on preloaded, preprocessed tensors,
(2) regcache's one-pass feature computation on the same tensors, and (3) the whole pipeline
(decode, preprocess, model, all features, store writes) with `regcache.extract`.
Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def photo_samples(n: int, seed: int = 0):
    from PIL import Image
    from skimage import data as skdata

    photos = [np.asarray(getattr(skdata, k)()) for k in ("astronaut", "coffee", "chelsea", "rocket", "retina")]
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = min(375, p.shape[0]), min(500, p.shape[1])
        y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
        buf = io.BytesIO()
        Image.fromarray(p[y:y + h, x:x + w]).save(buf, format="JPEG", quality=90)
        yield f"{i:06d}", buf.getvalue(), i % 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch14_reg4_dinov2")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="regcache-bench-") as tmp:  # removed afterwards
        _measure(args, Path(tmp))


def _measure(args, tmp: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from regcache.shards import write_shards
    from regcache.extract import PRECISIONS, ExtractConfig, extract, resolve_device
    from regcache.models import Preprocess
    from regcache.store import FeatureSet
    from regcache.tokens import layout_of, token_features

    shards = write_shards(photo_samples(args.images), str(tmp / "shards" / "b-%04d.tar"), args.per_shard, ext="jpg")
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=224).eval()
    save_file(model.state_dict(), str(tmp / "w.safetensors"))
    device, amp = resolve_device(args.device), PRECISIONS[args.precision]
    model = model.to(device)
    layout = layout_of(model)
    features = ("cls", "patch", "reg", "norms")

    # the same images, decoded and preprocessed once, up front
    from PIL import Image
    pre = Preprocess()
    tensors = pre.normalize(torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB"))
                                         for _, b, _ in photo_samples(args.images)]))
    batches = list(tensors.split(args.batch_size))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def paired(fns) -> list[float]:
        """Images/s of each function, alternating them batch by batch so that drift hits all alike."""
        for fn in fns:
            fn(batches[0].to(device))  # warm-up
        spent = [0.0] * len(fns)
        for b in batches:
            b = b.to(device, non_blocking=True)
            for i, fn in enumerate(fns):
                sync()
                t = time.perf_counter()
                fn(b)
                sync()
                spent[i] += time.perf_counter() - t
        return [args.images / s for s in spent]

    def bare(b):
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model.forward_features(b)

    def ours(b):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return token_features(model, b, layout, features)

    pattern = str(tmp / "shards" / f"b-{{0000..{len(shards) - 1:04d}}}.tar")
    rounds: dict[str, list[float]] = {"bare": [], "features": [], "pipeline": []}
    for r in range(args.rounds):  # interleaved, so that drift in machine speed hits all three alike
        b_ips, f_ips = paired([bare, ours])
        rounds["bare"].append(b_ips)
        rounds["features"].append(f_ips)
        cfg = ExtractConfig(model=args.model, checkpoint=str(tmp / "w.safetensors"), data=pattern,
                            cache=tmp / f"cache{r}", features=features, precision=args.precision,
                            batch_size=args.batch_size, workers=args.workers, device=args.device, progress=False)
        res = extract(cfg)
        rounds["pipeline"].append(res.ok / res.stream_seconds)  # first batch read to last unit committed
    bare_ips, feat_ips, pipe_ips = (max(rounds[k]) for k in ("bare", "features", "pipeline"))
    fs = FeatureSet(res.path)
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "device": str(device), "model": args.model, "precision": args.precision, "images": args.images,
        "batch_size": args.batch_size, "workers": args.workers,
        "bare_forward_features_img_s": round(bare_ips, 2),
        "all_features_one_pass_img_s": round(feat_ips, 2),
        "extra_cost_all_features_pct": round(100 * (bare_ips / feat_ips - 1), 2),
        "pipeline_img_s": round(pipe_ips, 2),
        "pipeline_over_bare": round(pipe_ips / bare_ips, 3),
        "rounds_img_s": {k: [round(v, 2) for v in vs] for k, vs in rounds.items()},
        "stored_bytes_per_sample": round(fs.nbytes() / res.ok, 1),
        "raw_float16_bytes_per_sample": sum(2 * int(np.prod(fs.layout.shape(f))) for f in features),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
