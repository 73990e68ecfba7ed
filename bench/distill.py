"""Cost of post-hoc registers (PH-Reg, `regcache registers distill`): teacher views, student steps, and a run.

    python bench/distill.py [--size 112] [--views 10] [--batch-size 8] [--rounds 3] [--threads N]
                            [--precision fp32] [--images 0] [--steps 20]

Random ViT-S/14 weights (speed does not depend on them), on preloaded random images:
1. forward: one image through the plain model (inference), per image, the fastest of --rounds;
   teacher: one image's targets, i.e. --views views through the frozen teacher and their alignment
   (`teacher.denoised`), per image, the fastest of --rounds;
2. student: one optimizer step of the paper's DINOv2 recipe (4 registers; position table, patch
   embedding and last block trained; forward, backward, AdamW), per image of the batch, the fastest of
   --rounds; and the ratios student step / forward and teacher / student per image;
3. with --images N: a whole `distill` call on N synthetic JPEG images (shards written here, a fresh
   cache) for --steps steps: the wall time of the teacher's targets and of the training, as a user
   waits for them. A full distillation costs about N x teacher + epochs x N x student.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def best_of(rounds: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--images", type=int, default=0, help="also time a whole distillation of this many images")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from regcache.distill.student import Arch, build_student, unlock
    from regcache.distill.teacher import Augment, denoised
    from regcache.distill.train import Schedule, train
    from regcache.models import load_model
    from regcache.settings import Backbone
    from regcache.settings.distill import DEFAULT_UNLOCK

    b, size = args.batch_size, args.size
    teacher = load_model(Backbone(model="vit_small_patch14_dinov2", random_init=0), size)
    images = torch.randn(b, 3, size, size)
    keys = [f"img{i}" for i in range(b)]
    aug = Augment(views=args.views)
    teacher_s = best_of(args.rounds, lambda: denoised(teacher, images, keys, aug, torch.zeros(3), args.precision)) / b

    def forward() -> None:
        with torch.inference_mode():
            teacher.forward_features(images)
    forward_s = best_of(args.rounds, forward) / b

    student = build_student(teacher, Arch("vit_small_patch14_reg4_dinov2"), size, 4, seed=0)
    unlock(student, DEFAULT_UNLOCK)
    pixels = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)
    targets = denoised(teacher, images, keys, Augment(views=2), torch.zeros(3))
    norm = lambda x: x.float() / 255  # noqa: E731

    def step() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            train(student, pixels, norm, lambda rows: targets[torch.from_numpy(rows)],
                  Schedule(images=b, batch_size=b, steps=1, precision=args.precision), state_path=Path(tmp) / "s",
                  run={}, save_every=10, device=torch.device("cpu"), quiet=True)
    student_s = best_of(args.rounds, step) / b

    whole = None
    if args.images:
        whole = run_whole(args)

    from common import command, load_average, machine

    print(json.dumps({
        "machine": machine(), "command": command(), "load_average": load_average(), "size": size,
        "views": args.views, "batch_size": b, "precision": args.precision, "rounds": args.rounds,
        "forward_s_per_image": round(forward_s, 4), "teacher_s_per_image": round(teacher_s, 4),
        "student_step_s_per_image": round(student_s, 4), "student_step_over_forward": round(student_s / forward_s, 2),
        "teacher_over_student": round(teacher_s / student_s, 2), "whole": whole,
    }, indent=2))


def run_whole(args) -> dict:
    """A `distill` call on --images synthetic photos, in a fresh cache: what a user waits for."""
    from common import photo_samples

    from regcache.distill import distill
    from regcache.settings.distill import DistillSettings
    from regcache.shards import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(photo_samples(args.images), str(root / "s" / "bench-%06d.tar"), per_shard=500, ext="jpg")
        n_shards = len(list((root / "s").glob("*.tar")))
        s = DistillSettings.make(model="vit_small_patch14_dinov2", random_init=0,
                                 data=str(root / "s" / f"bench-{{000000..{n_shards - 1:06d}}}.tar"),
                                 size=args.size, resize=round(args.size * 128 / 112), views=args.views,
                                 batch_size=args.batch_size, steps=args.steps, precision=args.precision,
                                 cache=str(root / "cache"), out=str(root / "out.safetensors"), quiet=True)
        t = time.perf_counter()
        res = distill(s)
        wall = time.perf_counter() - t
    return {"images": args.images, "steps": args.steps, "wall_s": round(wall, 2),
            "teacher_s": round(res.teacher_seconds, 2), "train_s": round(res.train_seconds, 2),
            "teacher_s_per_image": round(res.teacher_seconds / res.teacher_images, 4),
            "student_s_per_image": round(res.train_seconds / (args.steps * args.batch_size), 4),
            "loss_first_last": [round(res.losses[0], 4), round(res.losses[-1], 4)]}


if __name__ == "__main__":
    main()
