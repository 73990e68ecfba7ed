"""What every command shares: the `regcache` group, logging and option parsers."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def parse_kv(pairs: tuple[str, ...]) -> dict:
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


def parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def split_names(values: tuple[str, ...]) -> list[str]:
    """``--eval a,b --eval c`` -> [a, b, c]."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def new_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, … : a default run directory that no other run (started in the
    same second) shares, created here so that two runs never write into one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise click.ClickException(f"{path}: 999 run directories of that name already exist; give --out")


def human_size(n: float) -> str:
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
