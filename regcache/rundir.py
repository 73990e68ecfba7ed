"""Output directories: a fresh one per run by default, never a non-empty one reused.

A run directory holds one run's files; writing a second run into it would leave the first run's
plots and tables beside the new ones, so a given directory must not exist or be empty.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path


class OutputError(ValueError):
    """An output directory that would mix two runs' files."""


def stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def new_dir(path: str | os.PathLike) -> Path:
    """``path``, or ``path-2``, ``path-3``, … : a default run directory that no other run (started in the same
    second) shares, created here so that two runs never write into one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise OutputError(f"{path}: 999 run directories of that name already exist; name one")


def output_dir(given: str | os.PathLike | None, default: str | os.PathLike) -> Path:
    """``given`` (created; refused when it holds files), else a fresh ``default`` (`new_dir`)."""
    if given is None:
        return new_dir(default)
    path = Path(given)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(f"{path} {'is a file' if not path.is_dir() else 'is not empty'}: a run writes into a new "
                          "or empty directory, so that its files are never mixed with another run's; give another "
                          "--out, or remove it")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def run_dir(given: str | os.PathLike | None, default: str | os.PathLike) -> Iterator[Path]:
    """`output_dir`, removed again if the work in it fails before writing anything (no empty run folders)."""
    path = output_dir(given, default)
    try:
        yield path
    except BaseException:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise
