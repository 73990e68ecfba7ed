"""The store's Parquet tables (index, errors, unit records), written so that damage is found, never misread.

Parquet alone does not catch every flipped bit: pyarrow writes no page checksums by default, and a
flip in the footer can change how intact pages decode (an offset, an encoding), which no page
checksum covers. So each table is written with page checksums *and* a digest of its decoded content
(every column, and the file's other key-value metadata) in the footer's metadata, and read back with
page verification and that digest recomputed: a file either reads as exactly what was written or is
an error that names it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .meta import DamagedFile

DIGEST = b"regcache.digest"


def content_digest(table: pa.Table) -> str:
    """sha256 of a table's decoded content: each column's name, type, nulls and values, then its other metadata."""
    h = hashlib.sha256()
    for name in table.column_names:
        col = table.column(name)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        h.update(f"{name}:{col.type}:{len(col)}:{col.null_count};".encode())
        if col.null_count:
            h.update(np.asarray(pc.is_null(col)).tobytes())
        if pa.types.is_string(col.type) or pa.types.is_binary(col.type):
            filled = col.fill_null("" if pa.types.is_string(col.type) else b"")
            h.update(np.asarray(pc.binary_length(filled), np.int64).tobytes())
            offsets = np.frombuffer(filled.buffers()[1], np.int32)[filled.offset:filled.offset + len(filled) + 1]
            data = filled.buffers()[2]
            h.update(b"" if data is None or not len(filled) else data.to_pybytes()[offsets[0]:offsets[-1]])
        else:
            h.update(np.ascontiguousarray(col.fill_null(0).to_numpy(zero_copy_only=False)).tobytes())
    for k, v in sorted((table.schema.metadata or {}).items()):
        if k != DIGEST:
            h.update(k + b"=" + v + b";")
    return h.hexdigest()


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as Parquet, with page checksums and its content digest in the footer."""
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != DIGEST}
    table = table.replace_schema_metadata({**meta, DIGEST: content_digest(table.replace_schema_metadata(meta)).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def read_table(source: str | os.PathLike | pa.NativeFile, name: str | None = None, advice: str = "",
               columns: list[str] | None = None, require_digest: bool = False) -> pa.Table:
    """A table written by `parquet_bytes`, checked (pages and content digest); a table without a digest (written
    before it was recorded) is read as it is unless ``require_digest``. Damage is a `DamagedFile` naming the
    file (``name``, else ``source``), with ``advice``."""
    where = Path(name or str(source))
    try:
        table = pq.read_table(source, page_checksum_verification=True)
    except FileNotFoundError:
        raise DamagedFile(where, "missing", advice) from None
    except Exception as e:  # pyarrow raises many types on damaged bytes (ArrowInvalid, OSError, ValueError, ...)
        raise DamagedFile(where, f"unreadable ({type(e).__name__}: {e})", advice) from None
    stored = (table.schema.metadata or {}).get(DIGEST)
    if stored is None:
        if require_digest:
            raise DamagedFile(where, "has no content digest, which every table of this set was written with: "
                                     "damaged", advice)
    else:
        try:
            same = stored.decode() == content_digest(table)
        except Exception as e:  # a footer whose types no longer fit what they describe
            raise DamagedFile(where, f"unreadable ({type(e).__name__}: {e})", advice) from None
        if not same:
            raise DamagedFile(where, "its content is not what was written (content digest differs): damaged", advice)
    if columns is not None:
        try:
            table = table.select(columns)
        except (KeyError, pa.ArrowException) as e:
            raise DamagedFile(where, f"lacks a column ({e})", advice) from None
    return table
