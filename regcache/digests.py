"""Content digests of files: a full sha256, remembered per file version so that reruns do not hash again.

A checkpoint is identified by the sha256 of all its bytes (a same-size file with other weights is
other weights). Hashing a multi-GB file takes seconds to minutes, so the digest is remembered under
the cache root, keyed by the file's resolved path, size, modification time and inode; any change to
those hashes it again. `regcache verify` always hashes afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of every byte of ``path`` (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _version(path: Path) -> str:
    st = path.stat()
    return json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])


def file_digest(path: str | os.PathLike, memo: str | os.PathLike | None = None) -> str:
    """``sha256:HEX`` of ``path``, remembered in the folder ``memo`` (None: always hashed)."""
    path = Path(path)
    if memo is None:
        return "sha256:" + sha256_file(path)
    version = _version(path)
    entry = Path(memo) / (hashlib.sha256(version.encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(entry.read_text())
        if known.get("version") == version:
            return known["digest"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = "sha256:" + sha256_file(path)
    if _version(path) == version:  # not changed while it was read
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": version, "digest": digest}))
            tmp.replace(entry)
        except OSError:  # a read-only cache: hash again next time
            pass
    return digest
