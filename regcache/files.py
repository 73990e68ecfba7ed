"""Files written whole or not at all, and whether the process that holds a claim or a run folder still lives."""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

#: this host, as writers name themselves in claims and temporary files
HOST = re.sub(r"[^\w-]", "_", socket.gethostname())


def atomic_write(path: Path, data: bytes, error: type[Exception] = OSError) -> None:
    """``data`` as ``path``, whole or not at all: written aside (named by host and pid, so that a killed writer's
    leftovers are recognised), synced, renamed. A failure (a full disk) removes what was written aside and raises
    ``error`` naming the file."""
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(f"cannot write {path}: {e.strerror or e}") from e


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file with its metadata in sorted order, at the header's length. safetensors writes metadata
    in hash order (a Rust HashMap), so equal weights saved twice differ in bytes, hence in digest, and a
    checkpoint's digest is in the identity of every set extracted with it."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # the same content in another order is never longer (safetensors writes compact JSON)
        raise ValueError(f"safetensors header of {n} bytes re-serialised to {len(text)}")
    return data[:8] + text.ljust(n) + data[8 + n:]


def remove_stale(folder: Path, pattern: str = ".*.tmp") -> list[Path]:
    """Remove the temporaries (`atomic_write`'s, matching ``pattern`` in ``folder``) that writers on this host
    left when they were killed; the removed ones."""
    gone = []
    for tmp in folder.glob(pattern):
        *_, host, pid, _ = tmp.name.rsplit(".", 3)
        if host == HOST and pid.isdigit() and not alive(int(pid)):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
