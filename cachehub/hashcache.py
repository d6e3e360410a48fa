"""The (inode, size, mtime, ctime) -> SHA-256 cache that lets push and snapshot skip unchanged files.

Kept in the catalog (local disk). A file is re-hashed when any of the four changed; ctime
cannot be set by tools that preserve mtime (rsync -t, cp -p), so a rewrite is never missed
that way. Rows are written in batches of BATCH (and the rest at the end of a push), never one
transaction per file, and never all held in memory: a 600,000-file push stays flat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .scan import FoundFile

if TYPE_CHECKING:
    from .catalog import Catalog


BATCH = 20_000


class HashCache:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.conn = catalog.conn
        self.fresh: list[tuple] = []
        self.hits = 0
        self.misses = 0

    def lookup(self, f: FoundFile) -> str | None:
        row = self.conn.execute(
            "SELECT sha256 FROM hash_cache WHERE path = ? AND ino = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
            (f.abspath, f.ino, f.size, f.mtime_ns, f.ctime_ns),
        ).fetchone()
        if row:
            self.hits += 1
            return row[0]
        self.misses += 1
        return None

    def remember(self, f: FoundFile, sha256: str, rehashed: bool) -> None:
        if rehashed:
            self.fresh.append((f.abspath, f.ino, f.size, f.mtime_ns, f.ctime_ns, sha256))
            if len(self.fresh) >= BATCH:
                self.save()

    def save(self) -> None:
        if not self.fresh:
            return
        with self.catalog.transaction():
            self.conn.executemany("INSERT OR REPLACE INTO hash_cache VALUES (?,?,?,?,?,?)", self.fresh)
        self.fresh.clear()
