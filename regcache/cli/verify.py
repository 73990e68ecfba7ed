"""The verify command: a feature set checked on demand, every byte of it and of the shards it was read from."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..settings import VerifySettings
from .common import main
from .options import options, settings


def check_set(fs) -> tuple[list, list[str]]:
    """Every check of one set, in order: its files and tables, its input shards, its weights."""
    problems, notes = [], []
    for check in (fs.verify, fs.verify_inputs, fs.verify_weights):
        found, said = check()
        problems += found
        notes += said
    return problems, notes


@main.command(short_help="Check feature sets whole: every file and checksum, the input shards' and weights' bytes.")
@options(VerifySettings)
def verify(**given):
    """Check each feature set SET whole, reading every byte.

    Every committed shard's files are there, of the size they were committed with, and pass their
    checksums (crc32c of each inner chunk and shard index); index.parquet and errors.parquet read and
    equal what the unit records say; each input shard still holds the bytes the set was read from
    (the full sha256 recorded at extraction: sets extracted before it was recorded say 'not
    recorded'); the checkpoint still has the sha256 of the set's identity. Exit status 1 if anything
    is wrong, with every problem listed by file.
    """
    from ..sets import Cache, SetNotFound
    from ..store import StoreError
    from ..store.meta import META
    from ..store.reader import DamagedFile

    s = settings(VerifySettings, given)
    cache, failed = Cache(s.cache), False
    for ref in s.sets:
        try:
            fs = cache.find(ref, s.model).fs
        except SetNotFound as e:  # nothing to check: said as such, never as a damaged file
            click.echo(f"NOT FOUND  {ref}: {e}")
            failed = True
            continue
        except StoreError as e:
            if (Path(ref) / META).is_file() or (cache.root / ref / META).is_file():  # a set whose record is damaged
                problems, notes, where = [DamagedFile(Path(ref) / META, str(e))], [], ref
            else:
                click.echo(f"NOT FOUND  {ref}: {e}")
                failed = True
                continue
        else:
            problems, notes = check_set(fs)
            where = fs.path
        failed |= bool(problems)
        click.echo(f"{'DAMAGED' if problems else 'ok'}  {where}" +
                   (f": {len(problems)} damaged file{'s' if len(problems) > 1 else ''}" if problems else ""))
        for p in problems:
            click.echo(f"  {p}")
        for n in notes:
            click.echo(f"  note: {n}")
    sys.exit(1 if failed else 0)
