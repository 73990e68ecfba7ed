"""Reading one tar shard whole or failing it by name: a damaged tar never passes for a shorter one."""
from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator


from .errors import DataError


# --------------------------------------------------------------------------- reading shards

TAR_BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as webdataset does


class ShardError(DataError):
    """A shard that cannot be read whole: missing, unreachable, truncated or damaged."""


class _Watched:
    """A read-only byte stream that counts what passes and remembers where the last non-zero byte was.

    Python's stream-mode tarfile takes a damaged or truncated header for the end of the archive;
    what was read past the last member tells the two apart: a real end is all zero bytes.
    """

    def __init__(self, raw):
        self.raw, self.pos, self.last_nonzero = raw, 0, -1

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        nonzero = len(data.rstrip(b"\0"))  # scans only the trailing zeros
        if nonzero:
            self.last_nonzero = self.pos + nonzero - 1
        self.pos += len(data)
        return data


class _Hashed:
    """A read-only byte stream that feeds every byte read through it to a hash (the shard's full digest,
    taken as the extraction reads it: no second read)."""

    def __init__(self, raw, hasher):
        self.raw, self.hasher = raw, hasher

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hasher.update(data)
        return data


def _decompressed(raw):
    """The tar bytes of a plain or gzip/bz2/xz-compressed shard (the decompressors detect truncation)."""
    import bz2
    import gzip
    import lzma

    head = raw.read(6)
    prefixed = _Prefixed(head, raw)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=prefixed)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(prefixed)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(prefixed)
    return prefixed


class _Prefixed:
    """``raw`` with bytes already read from it put back in front."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size is None or size < 0:
            out, self.head = self.head + self.raw.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out + (self.raw.read(size - len(out)) if len(out) < size else b"")


def tar_problem(size: int, end: int, last_nonzero: int, last: str | None) -> str | None:
    """Why a tar of ``size`` bytes whose last readable member ends at byte ``end`` is not whole, or None.

    Whole means: everything after that member is zero, and at least one zero block of the
    end-of-archive marker is there (a cut inside the marker's padding loses nothing).
    """
    after = f"after member {last!r} (byte {end})" if last else "at its start"
    if size == 0:
        return "read 0 bytes (an empty file, or a URL that could not be reached)"
    if last_nonzero >= end:
        return (f"damaged: unreadable tar header {after}; the {size - end} bytes that follow are not the "
                "end-of-archive marker, so the samples they hold would be lost")
    if size < -(-end // TAR_BLOCK) * TAR_BLOCK + TAR_BLOCK:
        return f"truncated: the file ends {after} with no end-of-archive marker ({size} bytes)"
    return None


def _open_url(url: str, allow_pipe: bool):
    if url.startswith("pipe:") and not allow_pipe:
        raise DataError(f"{url}: 'pipe:' URLs run shell commands; pass --allow-pipe to permit them")
    if "://" not in url and not url.startswith("pipe:"):
        if not os.path.exists(url):
            raise ShardError(f"{url}: no such file")
        return open(url, "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:  # a pipe's exit status: the error being raised already says what went wrong
        pass


def open_shard(url: str, allow_pipe: bool, sha256=None) -> Iterator[dict]:
    """WebDataset samples of one shard, grouped by key as webdataset groups them.

    Raises `ShardError` (after the samples read so far) when the shard is not whole, so that the
    caller commits the shard or nothing: a damaged tar never passes for a shorter one.
    ``sha256`` (a hashlib object) is fed every byte of the shard as stored (compressed or not), to
    its end, so that once the samples are all read it is the file's full digest.
    """
    from webdataset.tariterators import group_by_keys

    import lzma
    import zlib

    raw = _open_url(url, allow_pipe)
    stored = raw if sha256 is None else _Hashed(raw, sha256)
    try:
        watched = _Watched(_decompressed(stored))
    except OSError as e:  # a 'pipe:' command or download that failed before its first bytes
        _close_quietly(raw)
        raise ShardError(f"could not be read: {e}") from None
    state = {"end": 0, "last": None}

    def members() -> Iterator[dict]:
        try:
            tar = tarfile.open(fileobj=watched, mode="r|")
        except tarfile.ReadError as e:
            if watched.pos == 0:
                return  # tar_problem names the empty file
            raise ShardError(f"not a tar file, or damaged at its start ({e})") from None
        for info in tar:
            state["end"], state["last"] = info.offset_data + info.size, info.name
            if info.isreg() and not _META.match(info.name):
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # stream mode would keep every header

    try:
        yield from group_by_keys(members())
        while watched.read(1 << 20):
            pass
        while sha256 is not None and stored.read(1 << 20):  # what a decompressor left after its stream
            pass
    except (EOFError, OSError, tarfile.ReadError, zlib.error, lzma.LZMAError) as e:
        _close_quietly(raw)  # member data or a compressed stream cut short, or a source that gave nothing
        what = "could not be read" if watched.pos == 0 else "truncated or unreadable"
        raise ShardError(f"{what}: {type(e).__name__}: {e}") from None
    except ValueError as e:  # webdataset's grouping: a file name twice within one sample
        _close_quietly(raw)
        raise ShardError(f"malformed: {e.args[0] if e.args else e}") from None
    except BaseException:  # the reader stopped early, or another error: nothing more to check
        _close_quietly(raw)
        raise
    try:
        raw.close()
    except OSError as e:  # a failed 'pipe:' command or download says so on close (webdataset's Pipe: IOError)
        raise ShardError(f"could not be read: {e}") from None
    problem = tar_problem(watched.pos, state["end"], watched.last_nonzero, state["last"])
    if problem:
        raise ShardError(problem)
