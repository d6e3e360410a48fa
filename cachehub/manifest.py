"""Manifests: the sorted list of (sha256, size, path) of one commit, streamed, never held whole.

On disk and in the lake a manifest is gzip-compressed UTF-8 text, one line per file, sorted by
path bytewise::

    #cachehub-manifest format_version=1
    <sha256 hex>\\t<size>\\t<path>

Its identity is the SHA-256 of the *uncompressed* text, so the compression level never changes
an id. Readers validate every line (hash shape, size, path safety, order), so a hostile or
corrupt manifest fails before anything is written from it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import FormatError, IntegrityError, UnsafePathError
from .model import ManifestEntry
from .paths import validate_path

FORMAT_VERSION = 1
HEADER = f"#cachehub-manifest format_version={FORMAT_VERSION}\n"
_HEADER_RE = re.compile(r"#cachehub-manifest format_version=(\d+)\n?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ManifestWriter:
    """Write a manifest to ``path`` from entries given in sorted order; computes its id."""

    def __init__(self, path: str | os.PathLike[str], *, compresslevel: int = 1) -> None:
        self.path = Path(path)
        self._raw = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=compresslevel, mtime=0)
        self._text = io.TextIOWrapper(self._gz, encoding="utf-8", newline="\n", write_through=False)
        self._hash = hashlib.sha256()
        self._last: str | None = None
        self.files = 0
        self.bytes = 0
        self._buf: list[str] = []
        self._emit(HEADER)

    def _emit(self, line: str) -> None:
        self._buf.append(line)
        if len(self._buf) >= 4096:
            self._flush()

    def _flush(self) -> None:
        chunk = "".join(self._buf)
        self._buf.clear()
        self._hash.update(chunk.encode("utf-8"))
        self._text.write(chunk)

    def add(self, entry: ManifestEntry) -> None:
        """Append one entry; raise if out of order or duplicated (the caller's bug or a collision)."""
        if self._last is not None and entry.path <= self._last:
            if entry.path == self._last:
                raise UnsafePathError(
                    f"duplicate path {entry.path!r} (two names that normalise to the same text?)", path=entry.path
                )
            raise ValueError(f"manifest entries out of order: {entry.path!r} after {self._last!r}")
        self._last = entry.path
        self.files += 1
        self.bytes += entry.size
        self._emit(f"{entry.sha256}\t{entry.size}\t{entry.path}\n")

    def close(self) -> str:
        """Finish the file and return the manifest id (SHA-256 of the uncompressed text)."""
        self._flush()
        self._text.close()
        self._raw.close()
        return self._hash.hexdigest()

    def abort(self) -> None:
        try:
            self._text.close()
            self._raw.close()
        finally:
            self.path.unlink(missing_ok=True)


def write_manifest(path: str | os.PathLike[str], entries: Iterable[ManifestEntry]) -> tuple[str, int, int]:
    """Write ``entries`` (sorted) to ``path``; return (manifest id, file count, total bytes)."""
    writer = ManifestWriter(path)
    try:
        for entry in entries:
            writer.add(entry)
    except BaseException:
        writer.abort()
        raise
    return writer.close(), writer.files, writer.bytes


def _check_header(path: str | os.PathLike[str], header: str) -> None:
    """Refuse a file that is not a manifest, or one of a format version this cachehub does not read."""
    match = _HEADER_RE.fullmatch(header)
    if not match:
        raise FormatError(f"{path} is not a cachehub manifest (bad header {header[:60]!r})")
    if int(match.group(1)) != FORMAT_VERSION:
        raise FormatError(
            f"manifest {path} has format_version {match.group(1)}; this cachehub reads {FORMAT_VERSION}: upgrade cachehub"
        )


def read_manifest(
    path: str | os.PathLike[str], *, validate: bool = True, name: str | None = None, nesting: bool = False
) -> Iterator[ManifestEntry]:
    """Stream the entries of a manifest file, validating format, paths and order.

    With ``nesting`` (``validate_manifest_file``: a manifest arriving from the lake), also: no
    path may lie inside another entry's path (``d`` and ``d/x`` cannot both be files). That
    check keeps every path in a set, about 100 bytes per file, so ordinary reads skip it.
    """
    shown = name or path  # what messages call it (the lake key, not a temp file)
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as fh:
        _check_header(shown, fh.readline())
        last = ""
        lineno = 1
        files: set[str] = set()
        for line in fh:
            lineno += 1
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise FormatError(f"manifest {shown} line {lineno}: expected 3 tab-separated fields")
            digest, size_text, rel = parts
            if validate:
                if not _HEX64.fullmatch(digest) or not size_text.isdigit():
                    raise FormatError(f"manifest {shown} line {lineno}: bad hash or size")
                validate_path(rel)
                if rel <= last:
                    raise FormatError(f"manifest {shown} line {lineno}: paths not sorted or duplicated at {rel!r}")
                last = rel
                folder = rel.rpartition("/")[0] if nesting else ""
                while folder:  # an earlier entry (sorted: a prefix comes first) may be this folder
                    if folder in files:
                        raise UnsafePathError(f"manifest {shown} line {lineno}: {rel!r} lies inside {folder!r}, which is a file")
                    folder = folder.rpartition("/")[0]
                if nesting:
                    files.add(rel)
            yield ManifestEntry(rel, int(size_text), digest)


_BLOCK_BYTES = 1024 * 1024


def read_line_blocks(path: str | os.PathLike[str]) -> Iterator[list[bytes]]:
    """The raw lines of a manifest already validated, in blocks of ~1 MiB (no newlines).

    The bulk reader for code that touches every line of two big manifests (diff): no
    per-line parsing at all. Only for manifests from the local manifest cache, which holds
    nothing that has not been verified against its id *and* validated line by line
    (``Lake.fetch_manifest``, ``push``); the header is still checked. Memory: one block.
    """
    with gzip.open(path, "rb") as fh:
        _check_header(path, fh.readline().decode("utf-8", "replace"))
        carry = b""
        while data := fh.read(_BLOCK_BYTES):
            block = carry + data
            cut = block.rfind(b"\n") + 1
            block, carry = block[:cut], block[cut:]
            if block:
                yield block[:-1].split(b"\n")
        if carry:
            raise FormatError(f"manifest {path}: the last line has no newline (truncated?)")


def validate_manifest_file(path: str | os.PathLike[str], *, name: str | None = None) -> None:
    """Read every line of a manifest with full validation; raise on the first bad one.

    Text that is not UTF-8 (a path in another encoding) is a FormatError, like any other line
    that is not a manifest's; a truncated or non-gzip file an IntegrityError.
    """
    shown = name or path
    try:
        for _ in read_manifest(path, name=name, nesting=True):
            pass
    except UnicodeDecodeError as exc:
        raise FormatError(f"manifest {shown} is not UTF-8 text ({exc.reason}); paths must be UTF-8") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise IntegrityError(f"manifest {shown} is not a complete gzip file ({exc})") from None


def manifest_id_of_file(path: str | os.PathLike[str]) -> str:
    """Recompute the id of a manifest file (SHA-256 of its uncompressed text)."""
    digest = hashlib.sha256()
    with gzip.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
