"""Output directories: a fresh one per run by default, never a non-empty one reused, and whole or not at all.

A run directory holds one run's files; writing a second run into it would leave the first run's
plots and tables beside the new ones, so a given directory must not exist or be empty, which is
checked before any work (`check_out`). A run is written into a folder beside its place and renamed
into it once every file is written (`publish`): a full disk or a killed process leaves no run folder
that `report` would take for a whole run.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from .files import alive
from .names import slug


class OutputError(ValueError):
    """An output directory that would mix two runs' files, or that could not be written."""


def stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


#: where runs go when --out is not given (relative to the working directory)
RUNS = Path("runs")


def default_run(*name: str) -> Path:
    """``runs/NAME-…-TIME``: a new run folder's default place (each part a file-name slug)."""
    return RUNS / "-".join([*(slug(n) for n in name), stamp()])


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


def check_out(given: str | os.PathLike | None) -> None:
    """Refuse an output directory that holds files (or is a file) before any work is done."""
    if given is None:
        return
    path = Path(given)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(f"{path} {'is a file' if not path.is_dir() else 'is not empty'}: a run writes into a new "
                          "or empty directory, so that its files are never mixed with another run's; give another "
                          "--out, or remove it")


def output_dir(given: str | os.PathLike | None, default: str | os.PathLike) -> Path:
    """``given`` (created; refused when it holds files), else a fresh ``default`` (`new_dir`)."""
    if given is None:
        return new_dir(default)
    check_out(given)
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """A failure to write ``path`` (a full disk, a lost mount) names the file."""
    try:
        yield path
    except OSError as e:
        raise OutputError(f"cannot write {path.name}: {e.strerror or e}") from e


def publish(given: str | os.PathLike | None, default: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """The run directory (``given``, else a fresh ``default``), made whole: ``write(folder)`` fills a folder beside
    it, which then replaces the (empty) directory in one rename. If writing fails, nothing is left."""
    existed = given is not None and Path(given).is_dir()
    final = output_dir(given, default)
    aside = final.with_name(f".{final.name}.partial-{os.getpid()}")
    for left in final.parent.glob(".*.partial-*"):  # what killed runs left beside their run folders
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    try:
        aside.mkdir()
        write(aside)
        os.replace(aside, final)  # onto the empty directory: the run appears whole
    except BaseException as e:
        shutil.rmtree(aside, ignore_errors=True)
        if not existed and final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        if isinstance(e, OSError):
            raise OutputError(f"{final}: cannot write the run ({e.strerror or e}); nothing of it was kept") from e
        if isinstance(e, OutputError):
            raise OutputError(f"{final}: {e}; nothing of the run was kept") from e
        raise
    return final


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
