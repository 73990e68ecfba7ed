"""Content digests of files: a full sha256, remembered per file version so that reruns do not hash again.

A file (a checkpoint, an input shard) is identified by the sha256 of all its bytes: a same-size file
with other bytes is another file. Hashing a multi-GB file takes seconds to minutes, so the digest is
remembered under the cache root, keyed by what ``stat`` says of the file: its resolved path, size,
modification time, inode and *change time*. A user can set a file's modification time back
(``touch -d``, ``os.utime``, an editor that keeps it) but not its change time, which the kernel sets on
every write and every ``utime`` (git's index relies on it the same way). A file changed moments before
it was hashed is not remembered: the kernel's file clock is coarse, and a second edit within the same
tick would keep every field (git's "racily clean" entries). `regcache verify` always hashes afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

CHUNK = 1 << 22
#: a file changed less than this many seconds before it was hashed is hashed again next time
RACY_SECONDS = 2.0


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of every byte of ``path`` (read in 4 MiB chunks; hashlib releases the GIL, so threads hash apart)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _now() -> float:
    return time.time()


def _version(path: Path) -> tuple[str, float]:
    """The key of a file version, and when it last changed (modification or change time, the later)."""
    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return key, max(st.st_mtime_ns, st.st_ctime_ns) / 1e9


def _entry(memo: Path, version: str) -> Path:
    return memo / (hashlib.sha256(version.encode()).hexdigest()[:32] + ".json")


def remembered(path: str | os.PathLike, memo: str | os.PathLike) -> str | None:
    """``sha256:HEX`` of ``path`` if ``memo`` remembers this version of it, else None (nothing is read)."""
    version, _ = _version(Path(path))
    try:
        known = json.loads(_entry(Path(memo), version).read_text())
        return known["digest"] if known.get("version") == version else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def file_digest(path: str | os.PathLike, memo: str | os.PathLike | None = None) -> str:
    """``sha256:HEX`` of ``path``, remembered in the folder ``memo`` (None: always hashed)."""
    path = Path(path)
    if memo is None:
        return "sha256:" + sha256_file(path)
    if (known := remembered(path, memo)) is not None:
        return known
    version, changed = _version(path)
    started = _now()
    digest = "sha256:" + sha256_file(path)
    if _version(path)[0] == version and started - changed > RACY_SECONDS:  # not changed since, nor just before
        entry = _entry(Path(memo), version)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": version, "digest": digest}))
            tmp.replace(entry)
        except OSError:  # a read-only or full cache: hash again next time
            tmp.unlink(missing_ok=True)
    return digest


def file_digests(paths: Sequence[str | os.PathLike], memo: str | os.PathLike | None = None,
                 threads: int | None = None) -> list[str]:
    """`file_digest` of each path, those not remembered hashed in parallel threads (at disk speed on a fast disk)."""
    threads = threads or min(16, max(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: file_digest(p, memo), paths))
