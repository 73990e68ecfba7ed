"""`--decode device` against PIL (issue 21): how far its features are from PIL's, and its speed; one run.

    python bench/decode.py [--images 128] [--checkpoint FILE] [--device auto] [--batch-size 32] [--workers 0]

Writes JPEG shards of photo-sized images (`common.photo_samples`), then extracts them with real DINOv2
ViT-S/14 weights (``--checkpoint``, else the offline ones of `regcache.offline.fetch_vits14`) at 224 px
(resize 256, bicubic) three ways: PIL's decode (the reference), ``--decode device`` on ``--device``
(torchvision's decode and antialiased resize; nvJPEG on a GPU), and PIL with bilinear instead of
bicubic resizing, a choice users make freely, as a yardstick (after an uncounted warm-up extraction). Reports, for [CLS] and the patch mean
muP: the cosine similarity to PIL's rows (mean and minimum) and the relative L2 difference; the crops'
pixel difference (mean and maximum grey levels); and each extraction's stream rate in img/s with its
ratio to PIL's (one extraction each, in the same run). JSON on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    return {"cosine_mean": round(float(cos.mean()), 6), "cosine_min": round(float(cos.min()), 6),
            "relative_l2_mean": round(float(rel.mean()), 5), "relative_l2_max": round(float(rel.max()), 5)}


def crop_difference(shards: list[Path], size: int = 224, resize: int = 256) -> dict:
    """Pixel difference of the device path's uint8 crops (on the CPU) from PIL's."""
    import io
    import tarfile

    import torch
    from PIL import Image

    from regcache.extract.device import Encoded, decode_batch
    from regcache.models import Preprocess

    pil, dev = Preprocess(size=size, resize=resize), Preprocess(size=size, resize=resize, decode="device:libjpeg-turbo")
    diffs = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    data = tar.extractfile(m).read()
                    ref = pil(Image.open(io.BytesIO(data)).convert("RGB")).int()
                    got, _, _ = decode_batch(Encoded.pack([data]), dev.crop, torch.device("cpu"))
                    diffs.append((got[0].int() - ref).abs())
    d = torch.stack(diffs).float()
    return {"mean_abs_grey_levels": round(d.mean().item(), 4), "max_abs_grey_levels": int(d.max().item()),
            "pixels_equal": round((d == 0).float().mean().item(), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--checkpoint", default=None, help="ViT-S/14 weights for vit_small_patch14_dinov2")
    ap.add_argument("--device", default="cpu", help="where the device path decodes (cuda: nvJPEG)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    import regcache.extract.run as run
    from common import command, load_average, machine, photo_samples
    from regcache.extract import extract
    from regcache.offline import fetch_vits14
    from regcache.settings import ExtractSettings
    from regcache.shards import write_shards
    from regcache.store import FeatureSet

    report = {"machine": machine(), "command": command(), "load_average_before": load_average()}
    ckpt = args.checkpoint or str(fetch_vits14())
    streamed = {}
    real = run.run_pass

    def timed(members, *a, **kw):  # the stream alone: first batch read to last commit
        t = time.perf_counter()
        try:
            return real(members, *a, **kw)
        finally:
            streamed["s"] = time.perf_counter() - t
    run.run_pass = timed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = [Path(p) for p in write_shards(photo_samples(args.images), str(tmp / "s" / "b-%04d.tar"),
                                                args.per_shard, ext="jpg")]
        data = str(tmp / "s" / f"b-{{0000..{len(shards) - 1:04d}}}.tar")
        ways = {"warm-up": {}, "pil": {}, "device": {"decode": "device"}, "pil_bilinear": {"interpolation": "bilinear"}}
        feats, rates = {}, {}
        for name, extra in ways.items():
            print(f"[{time.strftime('%H:%M:%S')}] extracting {name}", file=sys.stderr, flush=True)
            s = ExtractSettings(model="vit_small_patch14_dinov2", checkpoint=ckpt, name="photos", cache=tmp / name,
                                data=str(shards[0]) if name == "warm-up" else data, size=224, resize=256,
                                features=["cls", "patch"], dtype="float32", batch_size=args.batch_size,
                                workers=args.workers, device=args.device, quiet=True, **extra)
            fs = FeatureSet(extract(s).path)
            feats[name] = fs.load(("cls", "patch"), concat=False).x
            rates[name] = round(len(fs.index) / streamed["s"], 2)
        report["device"] = args.device
        del rates["warm-up"]
        report.update({"images": args.images, "model": "vit_small_patch14_dinov2 (DINOv2 ViT-S/14)",
                       "size": 224, "resize": 256})
        for name in ("device", "pil_bilinear"):
            report[f"{name}_vs_pil"] = {f: compare(feats[name][f], feats["pil"][f]) for f in ("cls", "patch")}
        report["crop_pixels_device_vs_pil_on_cpu"] = crop_difference(shards)
        report["stream_img_per_s"] = rates
        report["stream_rate_ratio_device_to_pil"] = round(rates["device"] / rates["pil"], 3)
    report["load_average_after"] = load_average()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
