"""The (inode, size, mtime, ctime) -> SHA-256 cache that lets push and snapshot skip unchanged files.

Kept in the catalog (local disk). A file is re-hashed when any of the four changed; ctime
cannot be set by tools that preserve mtime (rsync -t, cp -p), so a rewrite is never missed
that way. Rows are written in batches of BATCH (and the rest at the end of a push), never one
transaction per file, and never all held in memory: a 600,000-file push stays flat.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .scan import FoundFile

if TYPE_CHECKING:
    from .catalog import Catalog


BATCH = 20_000


class HashCache:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.fresh: list[tuple] = []
        self.hits = 0
        self.misses = 0
        self._rows: Iterator[tuple] | None = None
        self._row: tuple | None = None
        self._last: str | None = None

    def lookup(self, f: FoundFile) -> str | None:
        row = self._row_for(f.abspath)
        if row is not None and row[1:5] == (f.ino, f.size, f.mtime_ns, f.ctime_ns):
            self.hits += 1
            return row[5]
        self.misses += 1
        return None

    def _row_for(self, path: str) -> tuple | None:
        """The row for ``path``, from one cursor walked in step with the caller.

        Push asks in walk order, which is path order (bytewise, as SQLite compares TEXT), so
        one range query merged with the walk replaces a query per file. A caller going
        backwards, or a flush of new rows, starts a fresh cursor at the path asked for.
        """
        if self._rows is None or (self._last is not None and path < self._last):
            self._rows = self.catalog.hash_rows_from(path)
            self._row = next(self._rows, None)
        self._last = path
        while self._row is not None and self._row[0] < path:
            self._row = next(self._rows, None)
        return self._row if self._row is not None and self._row[0] == path else None

    def remember(self, f: FoundFile, sha256: str, rehashed: bool) -> None:
        if rehashed:
            self.fresh.append((f.abspath, f.ino, f.size, f.mtime_ns, f.ctime_ns, sha256))
            if len(self.fresh) >= BATCH:
                self.save()

    def save(self) -> None:
        """Write the new rows; also ends the read cursor, so no read transaction stays open."""
        if self._rows is not None:
            self._rows.close()  # type: ignore[attr-defined]
        self._rows = self._row = None  # never read on through a table being written
        if not self.fresh:
            return
        self.catalog.save_hashes(self.fresh)
        self.fresh.clear()
