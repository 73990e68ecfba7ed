"""The direct reader of a feature's Zarr v3 shard files, for the layouts regcache writes (and wrote).

One shard per unit, of little-endian inner chunks (raw, or each followed by its crc32c), and at the end an
index of (offset, nbytes) uint64 pairs per inner chunk (all ones: not stored, i.e. fill value 0), then its
crc32c: the sharding codec of the Zarr v3 spec. Reading it here takes one ``preadv`` per inner chunk straight
into the caller's array (zarr's path makes three passes over memory), and checks every checksum on the way.
Any other layout is read by zarr. tests/test_store_state.py checks it against zarr with Hypothesis (random units,
dtypes, shapes, checksums and row picks). It uses no zarr API at all, public or private: only the spec.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from google_crc32c import value as _crc32c_value

from .meta import DamagedFile

EMPTY = 2 ** 64 - 1  # a shard index entry of an inner chunk never written (all fill value)


def raw_shards(meta: dict, unit_rows: int) -> "RawShards | None":
    """The direct reader of an array whose zarr.json is ``meta`` when it is a layout this version writes or
    wrote (one shard per unit of ``unit_rows`` rows, little-endian inner chunks, raw or each with its crc32c,
    zero fill); None for any other layout: zarr reads those."""
    shape, codecs = meta.get("shape", []), meta.get("codecs", [])
    if (meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
            or meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") != [unit_rows, *shape[1:]]
            or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or meta.get("fill_value") != 0
            or not isinstance(meta.get("data_type"), str)):
        return None
    try:
        itemsize = np.dtype(meta["data_type"]).itemsize
    except TypeError:  # a data type numpy does not name (bfloat16, an extension): zarr's
        return None
    conf = codecs[0]["configuration"]
    inner = conf.get("chunk_shape", [])
    if (not _plain(conf.get("codecs")) or conf.get("index_location", "end") != "end"
            or not _plain(conf.get("index_codecs")) or inner[1:] != shape[1:] or unit_rows % inner[0]):
        return None
    return RawShards(inner[0], unit_rows // inner[0], int(np.prod(shape[1:])) * itemsize,
                     index_crc=len(conf["index_codecs"]) == 2, chunk_crc=len(conf["codecs"]) == 2)


def _plain(codecs) -> bool:
    """Little-endian bytes (no endianness for one-byte types), then a crc32c or nothing: a codec chain read here."""
    if not isinstance(codecs, list) or not 1 <= len(codecs) <= 2 or codecs[0].get("name") != "bytes":
        return False
    little = codecs[0].get("configuration", {}).get("endian", "little") == "little"
    return little and codecs[1:] in ([], [{"name": "crc32c"}])


class RawShards:
    """Reads rows of one feature from its shard files as the Zarr v3 sharding spec lays them out: inner
    chunks (raw, or followed by their crc32c), and at the end an index of (offset, nbytes) uint64 pairs per
    inner chunk (all ones: not stored, i.e. fill value 0), then its crc32c. One ``preadv`` per inner chunk,
    straight into the caller's array: one pass over memory, as ``numpy.load``; zarr's path makes three.
    The index is checked (its crc32c, and that it points inside the file) and so is every chunk read
    whole; a chunk read in part is read whole into a scratch buffer to check it (at most the first and
    last of a span)."""

    def __init__(self, inner: int, chunks: int, row_bytes: int, index_crc: bool, chunk_crc: bool):
        self.inner, self.chunks, self.row_bytes = inner, chunks, row_bytes  # rows per inner chunk, chunks a shard
        self.index_crc, self.chunk_crc = index_crc, chunk_crc
        self.chunk_bytes = inner * row_bytes + 4 * chunk_crc  # as stored
        self._scratch: np.ndarray | None = None

    def read(self, path: Path | None, unit: int, first: int, out: np.ndarray,
             crcs: list[int | None] | None = None) -> None:
        """Rows [first, first + len(out)) of ``unit``'s shard file ``path`` (None: nothing stored, all fill
        value) into ``out`` (C-contiguous, the stored dtype). ``crcs``: each inner chunk's crc32c as committed
        (None for a chunk not stored), checked against every chunk read."""
        buf = out.reshape(len(out), -1).view(np.uint8)
        if path is None:
            buf[...] = 0
            return
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            index = self._index(fd, path, unit, crcs)
            last = first + len(out)
            for i in range(first // self.inner, (last - 1) // self.inner + 1):
                a, b = max(first, i * self.inner), min(last, (i + 1) * self.inner)
                dst = buf[a - first:b - first].reshape(-1)
                offset, skip = int(index[i, 0]), (a - i * self.inner) * self.row_bytes
                if offset == EMPTY:
                    dst[...] = 0
                elif not self.chunk_crc:
                    self._pread(fd, path, [dst], offset + skip)
                elif b - a == self.inner:  # a whole chunk: into the caller's array, then its checksum
                    tail = bytearray(4)
                    self._pread(fd, path, [dst, tail], offset)
                    self._check(dst, tail, path, unit, i, crcs)
                else:
                    chunk = self._chunk(fd, path, unit, i, offset, crcs)
                    dst[...] = chunk[skip:skip + len(dst)]

    def check(self, path: Path, unit: int, crcs: list[int | None] | None = None) -> None:
        """Read every stored inner chunk of ``unit``'s shard file and check it (`regcache verify`)."""
        with open(path, "rb", buffering=0) as f:
            index = self._index(f.fileno(), path, unit, crcs)
            if self.chunk_crc:
                for i, offset in enumerate(index[:, 0]):
                    if offset != EMPTY:
                        self._chunk(f.fileno(), path, unit, i, int(offset), crcs)

    def crcs(self, path: Path, unit: int) -> list[int | None] | None:
        """The stored crc32c of each inner chunk of a shard file (None for a chunk not stored), as the unit's
        record keeps them; None for a layout without chunk checksums."""
        if not self.chunk_crc:
            return None
        with open(path, "rb", buffering=0) as f:
            index = self._index(f.fileno(), path, unit)
            return [None if offset == EMPTY else
                    int.from_bytes(os.pread(f.fileno(), 4, int(offset) + self.chunk_bytes - 4), "little")
                    for offset in index[:, 0]]

    def _chunk(self, fd: int, path: Path, unit: int, i: int, offset: int,
               crcs: list[int | None] | None = None) -> np.ndarray:
        """Inner chunk ``i`` whole, checked, in the scratch buffer (its rows' bytes, without the checksum)."""
        if self._scratch is None:
            self._scratch = np.empty(self.chunk_bytes, np.uint8)
        self._pread(fd, path, [self._scratch], offset)
        self._check(self._scratch[:-4], self._scratch[-4:], path, unit, i, crcs)
        return self._scratch[:-4]

    def _index(self, fd: int, path: Path, unit: int, crcs: list[int | None] | None = None) -> np.ndarray:
        """The shard index, checked: its crc32c, empty entries wholly empty, and every chunk of the stored
        size and inside the file (a cut file's tail is not an index); with ``crcs``, the chunks stored are
        those the unit committed."""
        size, n = os.fstat(fd).st_size, 16 * self.chunks + 4 * self.index_crc
        if size < n:
            raise DamagedFile(path, f"{size} bytes, shorter than its shard index ({n} bytes): cut short")
        raw = os.pread(fd, n, size - n)
        if self.index_crc and crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise DamagedFile(path, "its shard index fails its crc32c checksum: the file is damaged or cut short")
        index = np.frombuffer(raw, "<u8", count=2 * self.chunks).reshape(-1, 2)
        stored = index[:, 0] != EMPTY
        limit = size - n - self.chunk_bytes  # the last offset a chunk can start at
        if ((index[~stored, 1] != EMPTY).any() or (index[stored, 1] != self.chunk_bytes).any()
                or (stored.any() and (limit < 0 or (index[stored, 0] > limit).any()))):
            raise DamagedFile(path, f"its shard index does not fit the file ({size} bytes) or the array's "
                                    "inner chunks: the file is damaged or cut short")
        if crcs is not None and (len(crcs) != self.chunks or list(stored) != [c is not None for c in crcs]):
            raise DamagedFile(path, f"its inner chunks are not those unit {unit} committed: a file of another unit "
                                    "or set (copied in?)")
        return index

    @staticmethod
    def _pread(fd: int, path: Path, bufs: list, offset: int) -> None:
        want = sum(memoryview(b).nbytes for b in bufs)
        if os.preadv(fd, bufs, offset) != want:
            raise DamagedFile(path, "shorter than its shard index says: cut short")

    def _check(self, data: np.ndarray, stored, path: Path, unit: int, i: int,
               crcs: list[int | None] | None = None) -> None:
        rows = unit * self.inner * self.chunks + i * self.inner
        value = int.from_bytes(bytes(stored), "little")
        if crc32c(data) != value:
            raise DamagedFile(path, f"inner chunk {i} (rows {rows}-{rows + self.inner - 1} of the array) fails its "
                                    "crc32c checksum: the file is damaged")
        if crcs is not None and crcs[i] != value:
            raise DamagedFile(path, f"inner chunk {i} (rows {rows}-{rows + self.inner - 1} of the array) is not the "
                                    f"chunk unit {unit} committed (another crc32c): a file of another unit or set "
                                    "(copied in?)")


def crc32c(data) -> int:
    """crc32c as the Zarr v3 codec computes it (google-crc32c, which zarr requires; bytes or a contiguous
    numpy array: it takes no writable memoryview)."""
    return _crc32c_value(data)


