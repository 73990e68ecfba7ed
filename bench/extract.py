"""Extraction throughput, and what one pass over the data feeding several models saves (issue 21); one run.

    python bench/extract.py [--images 192] [--per-shard 32] [--batch-size 32] [--workers 0] [--precision bf16]
                            [--rounds 2] [--light-rounds 5] [--light-depth 1] [--bare-images 64]
                            [--rss-images 64] [--rss-models S,B,L] [--parts light,vits,rss]

Writes JPEG shards of photo-sized images (`common.photo_samples`: ~500x375 photos, quality 90).
Weights are random (`random_init`): speed does not depend on them. Every model runs at 224 px (resize
256, center crop), with cls, patch, reg and norms, into a fresh cache per call (no set is reused or
adopted). Two parts compare one pass feeding N models (`regcache.extract.extract_many`) with N
single-model passes (`extract`). Each round runs five extractions, the three models alone, the
first two in one pass, all three in one pass, in that order and reversed every other round (so that
this shared machine's drift hits both sides alike), each right after the bare model has run on
--bare-images preloaded images (so that its rate is paired in time with that call's):

- ``light`` (decode-heavy): three 1-block ViT-S/14 (``--model-arg depth=1``, random-init seeds 0, 1,
  2: three distinct sets), where reading, decoding and resizing the JPEGs cost about as much as the model;
- ``vits``: three full ViT-S/14 (12 blocks, seeds 0, 1, 2).

Per round and over all rounds (sums of each call's times) it reports:
1. one pass ÷ separate passes, N = 2 and 3: wall time of the calls (planning, model loading, the
   stream, the index: what a user waits for), and of the streams alone (`passes.run_pass`, timed by
   wrapping it: first batch read to last commit); and the stream ratio that sharing everything but
   the forwards would give, from the single passes' own split (the best this setting allows);
2. per call: the bare ``forward_features`` img/s on preloaded, preprocessed tensors (timed batch
   by batch against regcache's all-features forward, as before), each model's forward img/s inside
   the pass (`passes._Forward`, timed by wrapping it) ÷ bare, the share of the stream outside the
   forwards, and pipeline ÷ bare: the stream's img/s ÷ the bare rate of its N models run back to back
   (bare / N); 1 for a pass that costs only its forwards.

``rss``: peak RSS (VmHWM) of fresh processes that extract --rss-images images with each of
--rss-models alone, then with all of them in one pass (models of different sizes); the ratio is the
pass's peak ÷ the largest single-model peak. getrusage's maxrss is printed too, but on Linux it
includes the parent's RSS at exec.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

FEATURES = ("cls", "patch", "reg", "norms")
VITS = "vit_small_patch14_reg4_dinov2"
RSS_MODELS = "vit_small_patch14_reg4_dinov2,vit_base_patch14_reg4_dinov2,vit_large_patch14_reg4_dinov2"
TARGETS = {"light": 0.75, "vits": 1.0, "rss": 1.5}  # issue 21: one pass ÷ separate passes (3 models); RSS ratio


def pattern(folder: Path, shards: int) -> str:
    return str(folder / f"b-{{0000..{shards - 1:04d}}}.tar")


def settings(spec: tuple[str, dict, int], data: str, cache: Path, args):
    """The extraction settings of one model ``(timm name, model arguments, random-init seed)``."""
    from regcache.settings import ExtractSettings

    model, model_args, seed = spec
    return ExtractSettings(model=model, model_args=model_args, random_init=seed, data=data, name="photos",
                           cache=cache, size=224, resize=256, features=None, precision=args.precision,
                           batch_size=args.batch_size, workers=args.workers, device=args.device, quiet=True)


def label(spec) -> str:
    """``timm name[ key=value ...] seed N``: what one model of a part is."""
    model, model_args, seed = spec
    extra = "".join(f" {k}={v}" for k, v in sorted(model_args.items()))
    return f"{model}{extra} seed {seed}"


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- timing inside a pass

class Instrument:
    """Wraps `passes.run_pass` (the stream: first batch read to last commit, no planning or model loading)
    and `passes._Forward.__call__` (each model's forward, with all its features) to time them per call."""

    def __init__(self, device: torch.device):
        import regcache.extract.passes as passes
        import regcache.extract.run as run

        self.device, self.labels = device, {}
        self.reset()
        forward, stream = passes._Forward.__call__, run.run_pass
        me = self

        def timed_forward(fwd, images):
            me.sync()
            t = time.perf_counter()
            out = forward(fwd, images)
            me.sync()
            me.forward[me.labels.get(id(fwd.model), "?")] += time.perf_counter() - t
            return out

        def timed_pass(members, *a, **kw):
            me.labels = {id(m.model): label((m.plan.settings.model, dict(m.plan.settings.model_args),
                                              m.plan.settings.random_init)) for m in members}
            t = time.perf_counter()
            try:
                return stream(members, *a, **kw)
            finally:
                me.stream += time.perf_counter() - t

        passes._Forward.__call__ = timed_forward
        run.run_pass = timed_pass

    def reset(self) -> None:
        self.forward: dict[str, float] = defaultdict(float)
        self.stream = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --------------------------------------------------------------------------- one part: N models, rounds

def _bare_rates(model, layout, batches, device, amp, sync) -> tuple[float, float]:
    """Seconds per image of forward_features and of regcache's all-features forward, alternating batch by batch."""
    from regcache.tokens import token_features

    def bare(b):
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model.forward_features(b)

    def ours(b):
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return token_features(model, b, layout, FEATURES)

    fns = (bare, ours)
    spent = [0.0, 0.0]
    n = 0
    for b in batches:
        b = b.to(device, non_blocking=True)
        n += len(b)
        for i, fn in enumerate(fns):
            sync()
            t = time.perf_counter()
            fn(b)
            sync()
            spent[i] += time.perf_counter() - t
    return spent[0] / n, spent[1] / n


def run_part(name: str, specs: list, rounds: int, data: str, images: int, tensors: torch.Tensor, tmp: Path,
             args, inst: Instrument) -> dict:
    from regcache.extract import extract_many
    from regcache.extract.passes import AUTOCAST
    from regcache.models import load_model
    from regcache.store import FeatureSet
    from regcache.tokens import layout_of

    device, amp = inst.device, AUTOCAST[args.precision]
    labels = [f"m{i}" for i in range(len(specs))]  # short names: m0, m1, m2; "m0+m1" is their pass
    short = {label(s): m for s, m in zip(specs, labels)}
    # each model of these parts has the same architecture: one bare model times them all
    arch = settings(specs[0], data, tmp, args)
    bare_model = load_model(arch, 224).to(device)
    layout = layout_of(bare_model)
    bare_batches = list(tensors[:args.bare_images].split(args.batch_size))
    _bare_rates(bare_model, layout, bare_batches[:1], device, amp, inst.sync)  # warm-up
    calls = [(labels[0],), (labels[1],), (labels[2],), tuple(labels[:2]), tuple(labels)]
    by_label = dict(zip(labels, specs))
    out_rounds, extra = [], {}

    def call(members: tuple[str, ...], r: int) -> dict:
        # the bare model right before the call: its rate is paired in time with the call's
        bare_spi, feat_spi = _bare_rates(bare_model, layout, bare_batches, device, amp, inst.sync)
        cache = tmp / "caches" / name / f"r{r}" / "+".join(members)
        ss = [settings(by_label[m], data, cache, args) for m in members]
        inst.reset()
        t = time.perf_counter()
        results = extract_many(ss)
        wall = time.perf_counter() - t
        for m, res in zip(members, results):
            if res.reused or res.units_adopted or res.failed_shards or not res.complete or res.ok != images:
                raise SystemExit(f"{m}: not a fresh, complete extraction of {images} images: {res}")
        if "stored_bytes_per_sample" not in extra:
            fs = FeatureSet(results[0].path)
            extra["stored_bytes_per_sample"] = round(fs.nbytes() / results[0].ok, 1)
            extra["raw_float16_bytes_per_sample"] = sum(2 * int(np.prod(fs.layout.shape(f))) for f in FEATURES)
        shutil.rmtree(cache)
        return {"wall_s": round(wall, 3), "stream_s": round(inst.stream, 3),
                "stream_seconds_of_result": round(results[0].stream_seconds, 3),
                "forward_s": {short[k]: round(v, 3) for k, v in inst.forward.items()},
                "bare_img_s": round(1 / bare_spi, 2), "all_features_img_s": round(1 / feat_spi, 2),
                # one model's bare and all-features time for this call's images, at the rates just measured
                "bare_s": round(images * bare_spi, 3), "all_features_s": round(images * feat_spi, 3)}

    for r in range(rounds):
        order = calls if r % 2 == 0 else calls[::-1]
        timed = {}
        for members in order:
            timed["+".join(members)] = call(members, r)
            c = timed["+".join(members)]
            log(f"{name} round {r}: {'+'.join(members)}: {c['wall_s']:.1f} s (bare {c['bare_img_s']} img/s)")
        rnd = {"round": r, "order": ["+".join(m) for m in order], "calls": timed}
        rnd.update(_ratios(timed, labels, images))
        out_rounds.append(rnd)
        log(f"{name} round {r}: one pass ÷ separate {rnd['one_pass_over_separate']}")
    del bare_model

    # over all rounds: sums of the times of each call, so every round counts
    keys = ("wall_s", "stream_s", "bare_s", "all_features_s")
    total = {k: {**{q: sum(r["calls"][k][q] for r in out_rounds) for q in keys},
                 "forward_s": {m: sum(r["calls"][k]["forward_s"][m] for r in out_rounds) for m in k.split("+")}}
             for k in out_rounds[0]["calls"]}
    summary = _ratios(total, labels, images * rounds)
    bare_s = sum(t["bare_s"] for t in total.values())
    feat_s = sum(t["all_features_s"] for t in total.values())
    summary["bare_img_s"] = round(images * rounds * len(total) / bare_s, 2)
    summary["all_features_img_s"] = round(images * rounds * len(total) / feat_s, 2)
    summary["extra_cost_all_features_pct"] = round(100 * (feat_s / bare_s - 1), 2)
    return {"models": {m: label(s) for m, s in zip(labels, specs)}, "architecture": arch.model,
            "model_args": dict(arch.model_args), "bare_images_per_call": min(args.bare_images, images),
            "rounds": out_rounds, "over_all_rounds": summary,
            "target_one_pass_over_separate_3": TARGETS[name],
            "meets_target": summary["one_pass_over_separate"]["3"]["wall"] <= TARGETS[name], **extra}


def _ratios(timed: dict, labels: list[str], images: int) -> dict:
    """One pass ÷ separate passes (N = 2, 3), and pipeline ÷ bare per call and per model in it.

    ``if_all_outside_forwards_shared``: the stream ratio if everything but the forwards (reading, decoding,
    cropping, normalising, copying, writing) were done once for all models, from the single passes' times:
    what sharing can reach at best in this setting."""
    single = {m: timed[m] for m in labels}
    ratios = {}
    for n in (2, 3):
        both, alone = timed["+".join(labels[:n])], [single[m] for m in labels[:n]]
        outside = [a["stream_s"] - a["forward_s"][m] for a, m in zip(alone, labels)]
        ratios[str(n)] = {
            "wall": round(both["wall_s"] / sum(a["wall_s"] for a in alone), 3),
            "stream": round(both["stream_s"] / sum(a["stream_s"] for a in alone), 3),
            "if_all_outside_forwards_shared": round(float(
                (np.mean(outside) + sum(a["forward_s"][m] for a, m in zip(alone, labels)))
                / sum(a["stream_s"] for a in alone)), 3)}
    pipeline = {}
    for key, t in timed.items():
        n = len(key.split("+"))
        pipeline[key] = {
            "stream_img_s": round(images / t["stream_s"], 2),
            "pipeline_over_bare": round(n * t["bare_s"] / t["stream_s"], 3),  # bare: its n models back to back
            "forward_in_pass_img_s": {m: round(images / s, 2) for m, s in t["forward_s"].items()},
            "forward_in_pass_over_bare": {m: round(t["bare_s"] / s, 3) for m, s in t["forward_s"].items()},
            "outside_forwards_pct": round(100 * (1 - sum(t["forward_s"].values()) / t["stream_s"]), 1)}
    return {"one_pass_over_separate": ratios, "per_call": pipeline}


# --------------------------------------------------------------------------- peak RSS in fresh processes

def rss_child(spec: dict) -> None:
    """In a fresh process: one extraction (one or several models), then its peak RSS (KB) as JSON."""
    import resource

    from regcache.extract import extract_many

    import regcache.models  # noqa: F401  (torch, timm and regcache: the baseline, before any model)

    args = argparse.Namespace(**spec["args"])
    base = _status_kb("VmRSS")
    t = time.perf_counter()
    results = extract_many([settings(tuple(m), spec["data"], Path(spec["cache"]), args) for m in spec["models"]])
    print(json.dumps({"peak_kb": _status_kb("VmHWM"), "baseline_kb": base,
                      "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "rows": [r.ok for r in results], "seconds": round(time.perf_counter() - t, 1)}))


def run_rss(models: list[str], data: str, images: int, tmp: Path, args) -> dict:
    specs = [(m, {}, 0) for m in models]
    child_args = {k: getattr(args, k) for k in ("precision", "batch_size", "workers", "device")}

    def child(members: list) -> dict:
        cache = tmp / "caches" / "rss" / "+".join(str(specs.index(m)) for m in members)
        spec = {"models": members, "data": data, "cache": str(cache), "args": child_args}
        out = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps(spec)], capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"rss child {members} failed:\n{out.stderr[-3000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if got["rows"] != [images] * len(members):
            raise SystemExit(f"rss child {members}: rows {got['rows']}, expected {images} each")
        shutil.rmtree(cache, ignore_errors=True)
        log(f"rss: {' + '.join(label(m) for m in members)}: peak {got['peak_kb'] / 1024:.0f} MB, "
            f"{got['seconds']} s")
        return got

    singles = {label(s): child([s]) for s in specs}
    together = child(specs)
    largest = max(singles, key=lambda k: singles[k]["peak_kb"])
    mb = lambda kb: round(kb / 1024)  # noqa: E731
    ratio = together["peak_kb"] / singles[largest]["peak_kb"]
    return {
        "models": [label(s) for s in specs], "images": images,
        "peak_rss_mb": {**{k: mb(v["peak_kb"]) for k, v in singles.items()}, "one pass, all": mb(together["peak_kb"])},
        "baseline_rss_mb": {**{k: mb(v["baseline_kb"]) for k, v in singles.items()},
                            "one pass, all": mb(together["baseline_kb"])},
        "ru_maxrss_mb (includes the parent's at exec)": {**{k: mb(v["ru_maxrss_kb"]) for k, v in singles.items()},
                                                        "one pass, all": mb(together["ru_maxrss_kb"])},
        "seconds": {**{k: v["seconds"] for k, v in singles.items()}, "one pass, all": together["seconds"]},
        "largest_single": largest,
        "one_pass_over_largest_single": round(ratio, 3),
        "above_baseline_one_pass_over_largest_single": round(
            (together["peak_kb"] - together["baseline_kb"])
            / (singles[largest]["peak_kb"] - singles[largest]["baseline_kb"]), 3),
        "target": TARGETS["rss"], "meets_target": ratio <= TARGETS["rss"]}


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192, help="Photos for the light and vits parts.")
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader decode workers (0: decode in the main "
                    "process, best on 2 cores where the forward uses both).")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds of the vits part.")
    ap.add_argument("--bare-images", type=int, default=64, help="Preloaded images the bare model runs right "
                    "before each extraction (its rate is paired in time with that call's).")
    ap.add_argument("--light-rounds", type=int, default=5, help="Rounds of the light (decode-heavy) part.")
    ap.add_argument("--light-depth", type=int, default=1, help="Blocks of the light part's ViT-S/14.")
    ap.add_argument("--rss-images", type=int, default=64, help="Photos each RSS child extracts (the first shards).")
    ap.add_argument("--rss-models", default=RSS_MODELS, help="Comma list of timm names, one pass together.")
    ap.add_argument("--parts", default="light,vits,rss", help="Comma list of light, vits, rss.")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(json.loads(args.rss_child))
    parts = args.parts.split(",")
    if unknown := set(parts) - {"light", "vits", "rss"}:
        ap.error(f"unknown parts {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="regcache-bench-") as tmp:  # removed afterwards
        _measure(args, parts, Path(tmp))


def _measure(args, parts: list[str], tmp: Path) -> None:
    from common import command, load_average, machine, photo_samples
    from regcache.extract import extract, resolve_device
    from regcache.models import preprocess_of
    from regcache.shards import write_shards

    report = {"machine": machine(), "command": command(), "load_average_before": load_average()}
    device = resolve_device(args.device)
    if args.images % args.per_shard or args.rss_images % args.per_shard:
        raise SystemExit("--images and --rss-images must be multiples of --per-shard (whole shards)")
    write_shards(photo_samples(max(args.images, args.rss_images)), str(tmp / "shards" / "b-%04d.tar"), args.per_shard,
                 ext="jpg")
    n_main = args.images // args.per_shard
    data = pattern(tmp / "shards", n_main)
    report.update({"device": str(device), "precision": args.precision, "images": args.images,
                   "per_shard": args.per_shard, "shards": n_main, "batch_size": args.batch_size,
                   "workers": args.workers, "features": list(FEATURES), "size": 224, "resize": 256})
    inst = Instrument(device)

    light = [(VITS, {"depth": args.light_depth}, seed) for seed in (0, 1, 2)]
    full = [(VITS, {}, seed) for seed in (0, 1, 2)]
    if "light" in parts or "vits" in parts:
        # the same images, decoded and preprocessed as the pipeline does, once, up front, for the bare model
        pre = preprocess_of(settings(full[0], data, tmp, args))
        from regcache.data import decode_image

        tensors = pre.normalize(torch.stack([pre(decode_image({"jpg": b}, ["jpg"]))
                                             for _, b, _ in photo_samples(args.images)]))
        log(f"{args.images} photos in {n_main} shards; warm-up extraction")
        extract(settings(light[0], pattern(tmp / "shards", 1), tmp / "caches" / "warmup", args))  # imports, pools
        shutil.rmtree(tmp / "caches" / "warmup")
        if "light" in parts:
            report["light"] = run_part("light", light, args.light_rounds, data, args.images, tensors, tmp, args, inst)
        if "vits" in parts:
            report["vits"] = run_part("vits", full, args.rounds, data, args.images, tensors, tmp, args, inst)
    if "rss" in parts:
        report["rss"] = run_rss(args.rss_models.split(","), pattern(tmp / "shards", args.rss_images // args.per_shard),
                                args.rss_images, tmp, args)
    report["issue_21"] = {  # the headline ratios (over all rounds), each with its target
        **{f"{part}: one pass of 3 models ÷ 3 single passes, wall": [report[part]["over_all_rounds"][
            "one_pass_over_separate"]["3"]["wall"], f"target <= {TARGETS[part]}"] for part in ("light", "vits")
           if part in report},
        **{f"{part}: one pass of 2 models ÷ 2 single passes, wall": report[part]["over_all_rounds"][
            "one_pass_over_separate"]["2"]["wall"] for part in ("light", "vits") if part in report},
        **({"rss: peak of one pass of all --rss-models ÷ the largest single-model peak": [
            report["rss"]["one_pass_over_largest_single"], f"target <= {TARGETS['rss']}"]} if "rss" in report else {})}
    report["load_average_after"] = load_average()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
