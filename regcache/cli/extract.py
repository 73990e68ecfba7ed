"""Commands that fill the cache: extract, ls."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..features import DEFAULT_FEATURES, FEATURES, LAYER_FEATURES
from ..registers import PATCH_MODES
from .common import (
    cache_option,
    human_size,
    main,
    parse_floats,
    parse_kv,
    setup_logging,
)


@main.command()
@click.option("--model", "-m", required=True,
              help="Alias (vits, vitb, vitl, vitg, and *_reg with registers) or any timm ViT name[.tag].")
@click.option("--data", "-d", required=True,
              help="Manifest (manifests/NAME.yaml) or shard pattern such as 'shards/train-{000..099}.tar'.")
@click.option("--name", default=None,
              help="Dataset name for a shard pattern, used by the cache path and by probe [default: the folder's].")
@click.option("--labels", default=None, metavar="cls|json:FIELD|none",
              help="Where a shard pattern's labels are [default: cls if the first sample has a .cls, else none: "
                   "stored unlabelled, label -1]. Manifests say it in their 'label' field.")
@click.option("--role", type=click.Choice(["id-train", "id-val", "ood-gen", "anomaly"]), default=None,
              help="A shard pattern's role (anomaly: unlabelled). Manifests say it in their 'role' field.")
@click.option("--features", "-f", default=None, metavar="LIST",
              help=f"Comma list of {', '.join(FEATURES)} [default: {','.join(DEFAULT_FEATURES)}, "
                   f"those the model has]; {'/'.join(LAYER_FEATURES)}@-k of block -k (counted from the last).")
@click.option("--layers", default=None, metavar="LIST|lastN",
              help=f"Also store {', '.join(LAYER_FEATURES)} (those in --features) of these blocks, named NAME@-k, "
                   "from the same forward pass: e.g. -4,-3,-2,-1 or last4 (DINOv2's linear protocol), or block "
                   "numbers from 0. Earlier blocks' tokens go through the final norm, as DINOv2's linear "
                   "evaluation does.")
@click.option("--test-time-registers", "ttr", default=None, metavar="FILE[:K]",
              help="Add K test-time registers (default 1) driven by the neuron file of 'regcache registers find': "
                   "the set then has reg and reg_all (registers at the end of the layout).")
@click.option("--test-time-patches", type=click.Choice(list(PATCH_MODES)), default="zero", show_default=True,
              help="What the register neurons do at the patch tokens: " +
                   "; ".join(f"{k}: {v}" for k, v in PATCH_MODES.items()) + ".")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Local weights (.safetensors, or a torch file read weights-only) instead of the hub.")
@click.option("--random-init", type=int, default=None, metavar="SEED",
              help="timm's random weights under this seed, no hub or checkpoint: smoke tests only (recorded in the "
                   "set; probe refuses it without --allow-random-init).")
@click.option("--model-arg", multiple=True, metavar="KEY=VALUE",
              help="Extra timm.create_model argument (part of the fingerprint), e.g. depth=2.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", "-j", type=int, default=None,
              help="DataLoader decode workers [default: min(4, cores); 0 on a CPU with 2 cores or fewer].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, … (auto: cuda if present).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Forward-pass precision (autocast).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Stored dtype.")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Crop size (pixels) [default: the model's; 224 for the DINOv2/v3 aliases].")
@click.option("--resize", type=click.IntRange(min=1), default=None,
              help="Shorter side is resized to this before the crop [default: size / the model's crop_pct; "
                   "256 for the aliases].")
@click.option("--crop-mode", type=click.Choice(["center", "squash"]), default=None,
              help="squash resizes both sides to --resize (timm's mode) [default: the model's].")
@click.option("--pos-embed", type=click.Choice(["timm", "dinov2"]), default="timm", show_default=True,
              help="Position-table resampling: timm's load-time resample, or DINOv2 hub's interpolate_pos_encoding "
                   "(reproduces numbers made with the torch.hub DINOv2 models). Part of the fingerprint.")
@click.option("--interpolation", type=click.Choice(["bicubic", "bilinear", "nearest"]), default=None,
              show_default=True)
@click.option("--mean", default=None, help="e.g. 0.485,0.456,0.406 [default: the model's pretrained_cfg; "
                                            "ImageNet's for the aliases].")
@click.option("--std", default=None, help="e.g. 0.229,0.224,0.225 [default: the model's].")
@click.option("--views", default=1, show_default=True,
              help="Rows per image: view 0 is the plain crop, views 1.. are seeded random-resized crops.")
@click.option("--seed", default=0, show_default=True, help="Seed of the augmented views.")
@cache_option
@click.option("--store", type=click.Path(path_type=Path), default=None,
              help="Write to this feature-set directory instead of the fingerprinted path under --cache.")
@click.option("--part", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --num-parts: which part of the shards to do.")
@click.option("--num-parts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the shards into this many parts (array jobs); the last part to finish writes the index.")
@click.option("--unit-rows", type=int, default=None,
              help="Rows reserved per shard [default: the largest shard, from the manifest or tar headers].")
@click.option("--allow-pipe", is_flag=True, help="Permit 'pipe:' shard URLs, which run shell commands.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (pays off on long GPU runs).")
@click.option("--finalize", is_flag=True,
              help="Extract nothing and load no model: write the index if every part is committed, else list "
                   "the missing shards and exit 1.")
@click.option("--launcher", type=click.Choice(["none", "torchrun"]), default="none", show_default=True,
              help="torchrun: start --nproc-per-node ranks on this node, one part each "
                   "(same as 'torchrun --nproc-per-node=N -m regcache extract ...').")
@click.option("--nproc-per-node", default=1, show_default=True, help="Ranks for --launcher torchrun.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only.")
def extract(model, data, name, labels, role, features, layers, ttr, test_time_patches, checkpoint, random_init,
            model_arg, batch_size, workers, device, precision, dtype, size, resize, crop_mode, pos_embed, interpolation,
            mean, std, views, seed, cache, store, part, num_parts, unit_rows, allow_pipe, compile_, finalize, launcher,
            nproc_per_node, quiet):
    """Stream DATA through MODEL once and store its token features.

    Every shard is committed whole; rerunning skips what is committed and retries what failed.
    A feature set that already holds these features is reused with no backbone work.
    Exit status 1 if any shard failed (missing, truncated, damaged), if every sample failed, or if
    --finalize finds shards that no part has committed yet.
    """
    from ..extract import ExtractConfig, default_cache_root
    from ..extract import extract as run
    from ..features import parse_features, parse_layers
    from ..models import preprocess_for

    if launcher == "torchrun" and "LOCAL_RANK" not in os.environ:
        _exec_torchrun(nproc_per_node)
    setup_logging(quiet)
    try:
        cfg = ExtractConfig(
            model=model, data=data, name=name, labels=labels, role=role,
            features=parse_features(features) if features else None,
            layers=parse_layers(layers) if layers else None, test_time_registers=ttr,
            test_time_patches=test_time_patches,
            cache=cache or default_cache_root(), store=store, checkpoint=checkpoint, random_init=random_init,
            model_kwargs=parse_kv(model_arg),
            preprocess=preprocess_for(model, size=size, resize=resize, interpolation=interpolation,
                                      mean=parse_floats(mean) if mean else None, std=parse_floats(std) if std else None,
                                      crop_mode=crop_mode, views=views, seed=seed),
            pos_embed=pos_embed,
            precision=precision, dtype=dtype, batch_size=batch_size, workers=workers, device=device, part=part,
            num_parts=num_parts, unit_rows=unit_rows, allow_pipe=allow_pipe, compile=compile_,
            finalize_only=finalize, progress=not quiet)
        res = run(cfg)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    state = ("complete" if res.complete else "unusable" if res.error
             else f"incomplete ({res.missing_units} of the shards not committed yet)")
    click.echo(f"{'reused' if res.reused else 'done'}: {res.ok} rows stored, {res.failed} samples failed, "
               f"{len(res.failed_shards)} shards failed, {res.units_done} shards written, {res.units_skipped} "
               f"skipped, {res.seconds:.1f} s; {state} store {res.path}")
    if res.stream_seconds:
        click.echo(f"  streamed {res.units_done} shards in {res.stream_seconds:.1f} s")
    for shard, reason in res.failed_shards.items():
        click.echo(f"  failed shard {shard}: {reason}", err=True)
    if res.error:
        click.echo(f"  {res.error}", err=True)
    if res.failed_shards or res.error:
        sys.exit(1)


def _exec_torchrun(nproc: int) -> None:
    """Replace this process by torchrun running the same command once per rank."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--launcher", "--nproc-per-node"):
            skip = True
        elif not a.startswith(("--launcher=", "--nproc-per-node=")):
            argv.append(a)
    os.execvp(sys.executable, [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                               "-m", "regcache", *argv])


@main.command("ls")
@cache_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per feature set, for other tools.")
def ls(cache, as_json):
    """List the feature sets under the cache root.

    A damaged set (a table, unit record or array file that does not read, or a file of a committed
    shard missing or cut short) is listed with each damaged file and why; 'regcache verify SET' also
    reads every byte and checks it.
    """
    from ..extract import default_cache_root
    from ..store import StoreError, list_feature_sets

    root = cache or default_cache_root()
    rows, unreadable = [], []
    for fs in list_feature_sets(root, damaged=unreadable):
        m = fs.meta
        damage = fs.damage()
        try:
            counts = {"rows": len(fs.index), "failed": len(fs.errors)}
        except StoreError:  # a table that does not read: named in damage
            counts = {"rows": None, "failed": None}
        rows.append({"path": str(fs.path), "model": m["model"]["name"], "dataset": m["dataset"]["name"],
                     "features": ",".join(fs.features), **counts,
                     "units": f"{len(fs.committed_units())}/{fs.num_units}", "complete": fs.complete,
                     "bytes": fs.nbytes(), "created": m["provenance"]["created"], "fingerprint": fs.fingerprint,
                     "damaged": [{"file": str(d.path), "reason": d.reason} for d in damage]})
    for path, reason in unreadable:
        rows.append({"path": str(path), "model": None, "dataset": None, "features": None, "rows": None,
                     "failed": None, "units": None, "complete": False, "bytes": None, "created": None,
                     "fingerprint": None, "damaged": [{"file": str(path / "regcache.json"), "reason": reason}]})
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    if not rows:
        click.echo(f"no feature sets under {root}")
        return
    head = ("model", "dataset", "features", "rows", "failed", "units", "size", "created", "path")
    table = [head]
    for r in rows:
        cells = ["?" if r[k] is None else str(r[k])
                 for k in ("model", "dataset", "features", "rows", "failed", "units")]
        where = str(Path(r["path"]).relative_to(root)) + ("  DAMAGED" if r["damaged"] else "")
        table.append((*cells, "?" if r["bytes"] is None else human_size(r["bytes"]), r["created"] or "?", where))
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    for r in rows:
        if r["damaged"]:
            click.echo(f"damaged: {r['path']} ('regcache verify' on it says what to do)")
            for d in r["damaged"]:
                click.echo(f"  {d['file']}: {d['reason']}")


@main.group(short_help="Test-time registers for a ViT trained without them: find their neurons.")
def registers():
    """Test-time registers (Jiang et al. 2025) for a ViT trained without registers."""


@registers.command("find")
@click.option("--model", "-m", required=True, help="Alias or timm ViT name (a VisionTransformer without registers).")
@click.option("--data", "-d", required=True, help="Manifest or shard pattern to take the images from.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Local weights instead of the hub.")
@click.option("--images", "-n", default=500, show_default=True, help="Images to look at (the first ones).")
@click.option("--detect-layer", type=int, default=None,
              help="Block (from 0, or -k from the last) whose high-norm patch tokens are the outliers [default: the "
                   "block whose patch norms are most heavy-tailed: 99th percentile over median].")
@click.option("--threshold", type=float, default=None,
              help="Outliers: patch-token norm above this at the detection block [default: --percentile].")
@click.option("--percentile", type=float, default=99.0, show_default=True,
              help="Outliers: norm above this percentile of the detection block's patch norms (without --threshold).")
@click.option("--max-layer", type=int, default=None,
              help="Neurons of blocks up to this one compete [default: the detection block].")
@click.option("--top-k", "-k", default=10, show_default=True, help="Neurons kept.")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Crop size [default: the model's].")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The neuron file (JSON) to write, for 'regcache extract --test-time-registers FILE[:K]'.")
def registers_find(model, data, checkpoint, images, detect_layer, threshold, percentile, max_layer, top_k, size,
                   batch_size, out):
    """Find the register neurons: score every MLP hidden neuron (blocks[i].mlp.act) by its mean |activation|
    at the high-norm patch tokens of the detection block, and keep the top-k of blocks <= --max-layer.

    Prints the patch-norm profile per block, the outliers (by both threshold and percentile) and the
    neurons; writes them, with the model, its weights digest and these settings, to --out.
    """
    from ..models import ModelSpec, load_model, preprocess_for, state_dict_digest
    from ..registers import CLEAR_RATIO, RegisterNeurons, dataset_batches, find_neurons

    setup_logging(False)
    try:
        spec = ModelSpec(model, checkpoint)
        pre = preprocess_for(model, size=size)
        net = load_model(spec, pre.size)
        found = find_neurons(net, dataset_batches(data, pre, images, batch_size), detect_layer=detect_layer,
                             max_layer=max_layer, top_k=top_k, threshold=threshold, percentile=percentile)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    settings = {"data": data, "images": found.images, "size": pre.size, "detect_layer": found.detect_layer,
                "threshold": found.threshold, "percentile": found.percentile,
                "max_layer": max_layer if max_layer is not None else found.detect_layer, "top_k": top_k,
                "outlier_rule": "threshold" if threshold is not None else "percentile"}
    summary = {"outliers": found.outliers, "patch_tokens": found.tokens,
               "scores": [[b, n, round(s, 4)] for b, n, s in found.scores],
               "block_norms": {str(b): {k: round(v, 3) for k, v in st.items()} for b, st in found.block_norms.items()}}
    RegisterNeurons(spec.timm_name, state_dict_digest(net), found.neurons, settings, summary).save(out)
    click.echo("block  median   p99     max    p99/median  (patch-token norms, before any norm)")
    for b, st in found.block_norms.items():
        mark = "  <- detection" if b == found.detect_layer else ""
        click.echo(f"{b:>5}  {st['median']:7.1f} {st['p99']:7.1f} {st['max']:7.1f} {st['ratio']:8.2f}{mark}")
    click.echo(f"{found.images} images, {found.tokens} patch tokens at block {found.detect_layer}: {found.outliers} "
               f"outliers ({100 * found.outliers / found.tokens:.2f}%), norm > {found.threshold:.2f} "
               f"(the {found.percentile:.2f}th percentile)")
    peak = max(st["ratio"] for st in found.block_norms.values())
    if peak < CLEAR_RATIO:
        click.echo(f"note: no block has clearly high-norm patch tokens (p99/median <= {peak:.2f} everywhere, "
                   f"below {CLEAR_RATIO}): the outliers are the top {100 - found.percentile:.2f}% by definition, "
                   "and the neurons found need not be register neurons")
    per_block = ", ".join(f"block {b}: {len(ids)}" for b, ids in found.neurons.items())
    click.echo(f"top {len(found.scores)} neurons ({per_block}): " +
               ", ".join(f"{b}:{n} ({s:.2f})" for b, n, s in found.scores))
    click.echo(f"written to {out}")
