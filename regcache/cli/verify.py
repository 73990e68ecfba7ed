"""The verify command: a feature set checked on demand, every byte of it and of the shards it was read from."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import main


def check_weights(fs) -> tuple[list, list[str]]:
    """The model weights against the digest the set records (regcache.json's model.weights_digest).

    The place for the weights check, which comes with the settings work (where a set's weights are
    found); until then it says that it did not check them. Returns (problems, notes) as the others do.
    """
    return [], ["weights: not checked (not yet part of regcache verify)"]


def check_set(path: Path) -> tuple[list, list[str]]:
    """Every check of one set, in order: its files and tables, its input shards, its weights."""
    from ..store import FeatureSet, StoreError
    from ..store.meta import META
    from ..store.reader import DamagedFile

    try:
        fs = FeatureSet(path)
    except StoreError as e:
        return [DamagedFile(path / META, str(e))], []
    problems, notes = [], []
    for check in (FeatureSet.verify, FeatureSet.verify_inputs, check_weights):
        found, said = check(fs)
        problems += found
        notes += said
    return problems, notes


@main.command(short_help="Check feature sets whole: every file and checksum, and the input shards' bytes.")
@click.argument("sets", nargs=-1, required=True, metavar="SET...", type=click.Path(path_type=Path))
def verify(sets):
    """Check each feature set SET (its path) whole, reading every byte.

    Every committed shard's files are there, of the size they were committed with, and pass their
    checksums (crc32c of each inner chunk and shard index); index.parquet and errors.parquet read and
    equal what the unit records say; each input shard still holds the bytes the set was read from
    (the full sha256 recorded at extraction: sets extracted before it was recorded say 'not
    recorded'). Exit status 1 if anything is wrong, with every problem listed by file.
    """
    failed = False
    for path in sets:
        problems, notes = check_set(path)
        failed |= bool(problems)
        click.echo(f"{'DAMAGED' if problems else 'ok'}  {path}" +
                   (f": {len(problems)} damaged file{'s' if len(problems) > 1 else ''}" if problems else ""))
        for p in problems:
            click.echo(f"  {p}")
        for n in notes:
            click.echo(f"  note: {n}")
    sys.exit(1 if failed else 0)
