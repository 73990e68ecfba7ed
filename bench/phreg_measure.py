"""PH-Reg before and after (docs/registers.md, "Post-hoc registers", measured on real weights): the student against
its teacher on the same images, with the reproducibility study's measures.

- artifacts: per block, the share of patch tokens whose norm (block output, before any norm) is above the
  teacher's 98th percentile at that block, for the teacher (2% by definition) and the student; each model's own
  99th percentile over its median (a shift of every norm moves the first, only outliers move the second); the
  registers' median norm;
- fidelity: the cosine between student and teacher, per patch token (after the final norm), and of [CLS] and
  muP (the features a probe reads).

    python bench/phreg_measure.py --teacher vits_offline --student STUDENT.safetensors -d MANIFEST [-n 500]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from regcache.distill.run import record_file
from regcache.models import load_model, preprocess_for
from regcache.registers import dataset_batches, token_norms_per_block
from regcache.settings import Backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="vits_offline", help="the teacher model (alias or timm name)")
    ap.add_argument("--student", required=True, help="the distilled checkpoint (its OUT.json names the student)")
    ap.add_argument("-d", "--data", required=True, help="manifest or shard pattern of the images")
    ap.add_argument("-n", "--images", type=int, default=500)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--resize", type=int, default=128)
    a = ap.parse_args()
    record = json.loads(record_file(Path(a.student)).read_text())
    arch = record["student"]
    teacher = load_model(Backbone(model=a.teacher), a.size).eval()
    student = load_model(Backbone(model=arch["alias"] or arch["arch"], model_args=arch["model_args"],
                                  checkpoint=a.student), a.size).eval()
    pre = preprocess_for(a.teacher, size=a.size, resize=a.resize)
    t0 = time.perf_counter()
    tn, sn, cos_patch, cos_cls, cos_mean = [], [], [], [], []
    nt, ns = int(teacher.num_prefix_tokens), int(student.num_prefix_tokens)
    for x in dataset_batches(a.data, pre, a.images, 32):
        tn.append(token_norms_per_block(teacher, x)[:, :, nt:])
        s_norms = token_norms_per_block(student, x)
        sn.append(s_norms)
        with torch.inference_mode():
            ft, fs = teacher.forward_features(x), student.forward_features(x)
        pt, ps = ft[:, nt:], fs[:, ns:]
        cos_patch.append(torch.nn.functional.cosine_similarity(pt, ps, dim=-1).flatten())
        cos_cls.append(torch.nn.functional.cosine_similarity(ft[:, 0], fs[:, 0], dim=-1))
        cos_mean.append(torch.nn.functional.cosine_similarity(pt.mean(1), ps.mean(1), dim=-1))
    tn, sn = torch.cat(tn), torch.cat(sn)
    regs = sn[:, :, 1:ns]
    sp = sn[:, :, ns:]
    depth = tn.shape[1]
    rows = []

    def tail(x: torch.Tensor) -> float:
        """The study's heavy-tail measure: a model's own 99th percentile of patch norms over its median."""
        return round(float(torch.quantile(x.flatten(), 0.99) / x.median()), 3)

    for b in range(depth):
        thr = float(torch.quantile(tn[:, b].flatten(), 0.98))
        rows.append({"block": b - depth, "threshold": round(thr, 2),
                     "teacher_high": round(float((tn[:, b] > thr).float().mean()) * 100, 2),
                     "student_high": round(float((sp[:, b] > thr).float().mean()) * 100, 2),
                     "teacher_patch_median": round(float(tn[:, b].median()), 2),
                     "student_patch_median": round(float(sp[:, b].median()), 2),
                     "register_median": round(float(regs[:, b].median()), 2) if regs.numel() else None,
                     "teacher_p99_over_median": tail(tn[:, b]), "student_p99_over_median": tail(sp[:, b])})
    q = lambda c: {p: round(float(torch.quantile(torch.cat(c), p / 100)), 4) for p in (5, 50)}  # noqa: E731
    out = {"images": int(tn.shape[0]), "seconds": round(time.perf_counter() - t0, 1), "blocks": rows,
           "cosine": {"patch_tokens": q(cos_patch), "cls": q(cos_cls), "patch_mean": q(cos_mean)},
           "student": arch, "machine": platform.platform(), "command": " ".join(sys.argv)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
