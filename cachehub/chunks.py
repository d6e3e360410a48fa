"""Chunk maps: content-defined chunk boundaries of large objects, for deltas inside a file.

A big file that changes a little (a 2 GB shard with 1% rewritten) is a new object with a new
SHA-256, so content addressing alone would move all 2 GB again. At push time every object
larger than ``CHUNKED_MIN`` also gets a *chunk map* in the lake, beside the objects::

    chunks/sha256/<aa>/<sha256>        gzip text, create-only, like every lake document (key: lake.py)

    cachehub-chunks <TAB> 1 <TAB> fastcdc2020 <TAB> <min> <TAB> <avg> <TAB> <max>
    <length> <TAB> <sha256 of those bytes>      one line per chunk, in file order

The boundaries are content-defined (FastCDC 2020, through ``pyfastcdc``): an insertion or a
rewrite moves only the boundaries near it, so most chunks of the new version are byte-for-byte
chunks of the old one. When a site lacks the new object but holds an older version of the same
path, the fetch copies the shared chunks from the old file and asks the lake (ranged GETs) only
for the others; the object is then verified against its whole-file SHA-256 like any other, so a
wrong or stale chunk map can cost time, never correctness.

The object in the lake stays a whole, ordinary file any S3 client can read; a lake without
chunk maps (written by an older cachehub, or by a push that died before writing one) simply
gets whole-object fetches.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import FormatError

HEADER = "cachehub-chunks"
VERSION = 1
ALGORITHM = "fastcdc2020"
MIN_SIZE = 256 * 1024
AVG_SIZE = 1024 * 1024
MAX_SIZE = 4 * 1024 * 1024
CHUNKED_MIN = 16 * 1024 * 1024  # objects above this get a chunk map (same as the ranged-GET threshold)


@dataclass(frozen=True)
class ChunkMap:
    """The chunks of one object: ``(offset, length, sha256)`` in file order."""

    chunks: tuple[tuple[int, int, str], ...]
    params: tuple[int, int, int] = (MIN_SIZE, AVG_SIZE, MAX_SIZE)

    @property
    def size(self) -> int:
        if not self.chunks:
            return 0
        offset, length, _ = self.chunks[-1]
        return offset + length


def compute(data: memoryview | bytes, *, params: tuple[int, int, int] = (MIN_SIZE, AVG_SIZE, MAX_SIZE)) -> ChunkMap:
    """Content-defined chunks of ``data`` (about 3 GB/s to cut, plus SHA-256 of each chunk)."""
    from pyfastcdc import FastCDC

    lo, avg, hi = params
    view = memoryview(data)
    out = []
    for chunk in FastCDC(avg_size=avg, min_size=lo, max_size=hi).cut_buf(view):
        out.append((chunk.offset, chunk.length, hashlib.sha256(view[chunk.offset : chunk.offset + chunk.length]).hexdigest()))
    return ChunkMap(tuple(out), params)


def encode(chunk_map: ChunkMap) -> bytes:
    lo, avg, hi = chunk_map.params
    lines = [f"{HEADER}\t{VERSION}\t{ALGORITHM}\t{lo}\t{avg}\t{hi}\n"]
    lines.extend(f"{length}\t{sha}\n" for _, length, sha in chunk_map.chunks)
    return gzip.compress("".join(lines).encode("ascii"), compresslevel=6, mtime=0)


def decode(blob: bytes, *, size: int | None = None) -> ChunkMap:
    """Parse a chunk map; FormatError if it is not one this version reads, or does not add up."""
    try:
        text = gzip.decompress(blob).decode("ascii")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise FormatError(f"not a chunk map: {exc}") from None
    lines = text.split("\n")
    head = lines[0].split("\t")
    if len(head) != 6 or head[0] != HEADER or head[2] != ALGORITHM:
        raise FormatError(f"not a chunk map (header {lines[0][:80]!r})")
    if head[1] != str(VERSION):
        raise FormatError(f"chunk map format v{head[1]}; this cachehub reads v{VERSION}")
    chunks = []
    offset = 0
    try:
        for line in lines[1:]:
            if not line:
                continue
            length_text, sha = line.split("\t")
            length = int(length_text)
            if length <= 0 or len(sha) != 64:
                raise ValueError(line)
            chunks.append((offset, length, sha))
            offset += length
        params = (int(head[3]), int(head[4]), int(head[5]))
    except ValueError:
        raise FormatError("chunk map has a malformed line") from None
    if size is not None and offset != size:
        raise FormatError(f"chunk map covers {offset} bytes, the object has {size}")
    return ChunkMap(tuple(chunks), params)


@dataclass(frozen=True)
class Segment:
    """A run of the new object: ``length`` bytes at ``start``, from the lake or from the base file."""

    start: int
    length: int
    base_offset: int | None  # None: ranged GET from the lake; else copy from the base file here


def plan_segments(target: ChunkMap, base: ChunkMap) -> list[Segment]:
    """Cover ``target`` with copies from ``base`` where a chunk is shared, lake ranges elsewhere.

    Adjacent runs of the same kind (and, for copies, contiguous in the base too) are merged,
    so a 1% rewrite of a 2 GB file becomes a handful of segments, not two thousand.
    """
    where = {}
    for offset, _length, sha in base.chunks:
        where.setdefault(sha, offset)
    out: list[Segment] = []
    for offset, length, sha in target.chunks:
        base_offset = where.get(sha)
        if out:
            last = out[-1]
            if base_offset is None and last.base_offset is None:
                out[-1] = Segment(last.start, last.length + length, None)
                continue
            if base_offset is not None and last.base_offset is not None and last.base_offset + last.length == base_offset:
                out[-1] = Segment(last.start, last.length + length, last.base_offset)
                continue
        out.append(Segment(offset, length, base_offset))
    return out


def copied_bytes(segments: Iterable[Segment]) -> int:
    return sum(s.length for s in segments if s.base_offset is not None)
