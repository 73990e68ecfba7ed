"""What every command shares: the `regcache` group, logging, errors, and the command that makes a missing set."""
from __future__ import annotations

import logging
import os
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from ..features import REGISTER_FEATURES, split_name
from ..sets import SetNotFound
from ..settings import ExtractSettings, fields
from .options import flag


def setup_logging(quiet: bool) -> None:
    """regcache's own messages at INFO (WARNING with --quiet); the libraries' INFO chatter (timm says
    "Resized position embedding" once per model built) only from WARNING up."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("timm", "huggingface_hub", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def human_size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TB"


@contextmanager
def errors() -> Iterator[None]:
    """An expected failure (bad input, a missing set, damaged data) as a one-line error and exit 1, no
    traceback; a missing set also gets the command that makes it. REGCACHE_TRACEBACK=1 shows the traceback (a
    regcache bug that raises one of these types would otherwise read as bad input)."""
    try:
        yield
    except SetNotFound as e:
        raise click.ClickException(f"{e}\n{make_it(e)}") from e
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("REGCACHE_TRACEBACK", "").lower() in ("1", "true", "yes"):
            raise
        raise click.ClickException(str(e)) from e


def make_it(e) -> str:
    """What to run for a missing set (`sets.SetNotFound`): the extract command with the data it was made from
    before and the backbone settings of the model's other sets, or why no extraction can make it."""
    wants_reg = any(split_name(f)[0] in REGISTER_FEATURES for f in e.features)
    layouts = {(fs.layout.num_reg, fs.layout.registers) for fs in e.siblings}
    if wants_reg and layouts and all(n == 0 for n, _ in layouts):
        return (f"  {e.model} has no register tokens (its sets here have none), so no extraction gives "
                f"{','.join(f for f in e.features if split_name(f)[0] in REGISTER_FEATURES)}: use a model with "
                "registers (e.g. vits_reg), or add test-time registers (regcache registers find, then extract "
                "--test-time-registers)")
    backbone = {_args(fs) for fs in e.siblings}
    shipped = Path("manifests") / f"{e.dataset}.yaml"  # a checkout's manifest of that name
    sources = e.sources or ([str(shipped)] if shipped.is_file() else [])
    args = ["regcache", "extract", "--model", e.model,
            "--data", sources[0] if len(sources) == 1 else "MANIFEST_OR_SHARDS",
            "--features", ",".join(e.features)]
    if len(backbone) == 1:
        args += backbone.pop()
    notes = []
    if len(sources) != 1:
        notes.append("no set of this dataset name was extracted before: give its manifest (or shard pattern) as "
                     "--data" if not sources else f"the dataset was extracted from {len(sources)} sources: "
                     f"{', '.join(sources)}")
    if backbone:
        notes.append("the model's sets here were made with different backbone settings: add those of the sets to "
                     "compare with (regcache ls shows them)")
    return "make it with:\n  " + shlex.join(args) + "".join(f"\n  ({n})" for n in notes)


def _args(fs) -> tuple[str, ...]:
    """The extract options that set a cached set's backbone up as it was (those given when it was made)."""
    given = fs.meta.provenance.settings
    out: list[str] = []
    for name in fields(ExtractSettings, identity=("backbone",)):
        if name == "model" or given.get(name) is None:
            continue
        value = given[name]
        if isinstance(value, dict):
            out += [x for k, v in value.items() for x in (flag(ExtractSettings, name), f"{k}={v}")]
        elif isinstance(value, (list, tuple)):
            out += [flag(ExtractSettings, name), ",".join(str(v) for v in value)]
        else:
            out += [flag(ExtractSettings, name), str(value)]
    return tuple(out)


EPILOG = """\b
First steps:
  regcache demo                                              offline demo: sets, extract, probe, tables
  regcache shards from-folder photos/train shards/train      your images (a folder per class) as shards
  regcache extract -m vits_offline -d shards/train/train.yaml  cache the features (and the same for val)
  regcache ls                                                what is cached
  regcache probe -m vits_offline -f cls -f cls,patch --train train --test val
vits_offline is the demo's DINOv2 ViT-S/14 (no hub); with a hub, -m vits_reg and the other aliases
(regcache models). Every command has --help; docs/ in the repository has one page per stage."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.version_option(package_name="regcache")
def main() -> None:
    """Cache frozen-ViT token features once, then probe them as often as you like."""
