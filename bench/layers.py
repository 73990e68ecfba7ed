"""Extra cost of block features (--layers) and of test-time registers over the bare forward_features.

    python bench/layers.py [--images 128] [--batch-size 32] [--precision bf16] [--rounds 3] [--threads N]

Times, batch by batch in turn on the same preloaded tensors, each batch's fastest of --rounds (the
least disturbed by other processes on a shared machine): (1) timm's forward_features, (2) regcache's
one pass with cls, patch, reg, norms of the last block, (3) the same of the last 4 blocks
(``--layers last4``: 16 features), (4) with 1 test-time register driven by 10 neurons in 2 blocks
(on the model without trained registers, so (4) is compared with the bare pass of that model).
Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]; on a shared "
                    "machine, 1 thread and small batches give the fastest-of-rounds a better chance")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import timm

    from regcache.features import select_features, with_layers
    from regcache.registers import install
    from regcache.tokens import layout_of, token_features

    amp = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    reg = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    noreg = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    ttr = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    ttr.load_state_dict(noreg.state_dict())
    install(ttr, {5: [1, 2, 3, 4, 5], 6: [6, 7, 8, 9, 10]}, 1)
    base = ("cls", "patch", "reg", "norms")
    lay_reg, lay_ttr = layout_of(reg), layout_of(ttr)
    last4 = with_layers(select_features(base, lay_reg), (-4, -3, -2, -1), lay_reg.depth)
    batches = list(torch.randn(args.images, 3, 224, 224).split(args.batch_size))

    def run(fn):
        def timed(b):
            with torch.inference_mode(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                return fn(b)
        return timed

    fns = {
        "bare_reg": run(reg.forward_features),
        "last_block": run(lambda b: token_features(reg, b, lay_reg, base)),
        "last4": run(lambda b: token_features(reg, b, lay_reg, last4)),
        "bare_noreg": run(noreg.forward_features),
        "ttr": run(lambda b: token_features(ttr, b, lay_ttr, base)),
    }
    best = {k: [float("inf")] * len(batches) for k in fns}  # per batch, the fastest of the rounds
    for fn in fns.values():
        fn(batches[0])  # warm-up
    for _ in range(args.rounds):
        for i, b in enumerate(batches):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(b)
                best[k][i] = min(best[k][i], time.perf_counter() - t)

    def extra(k: str, ref: str) -> float:
        return round(100 * (sum(best[k]) / sum(best[ref]) - 1), 2)

    from common import command, machine

    print(json.dumps({
        "machine": machine(), "command": command(),
        "precision": args.precision, "images": args.images, "batch_size": args.batch_size, "rounds": args.rounds,
        "img_s_best": {k: round(args.images / sum(v), 2) for k, v in best.items()},
        "extra_cost_pct": {"last_block": extra("last_block", "bare_reg"), "last4": extra("last4", "bare_reg"),
                           "ttr": extra("ttr", "bare_noreg")},
        "features_last4": len(last4),
    }, indent=2))


if __name__ == "__main__":
    main()
