"""The catalog: a SQLite index of the lake plus local state (audit, cache entries).

It lives on the daemon host's local disk, never on NFS. Everything in it except the audit
trail can be rebuilt from the lake and the site roots (``cachehub catalog rebuild``). Schema
changes are numbered migrations; writes that belong together go in one ``with db.conn:``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CachehubError, ConfigError
from .fsutil import HOST
from .lake import canonical_json, now_iso
from .model import CacheEntry, Commit, Tag

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE datasets (name TEXT PRIMARY KEY, refreshed TEXT);
        CREATE TABLE commits (
            id TEXT PRIMARY KEY, dataset TEXT NOT NULL, manifest TEXT NOT NULL,
            files INTEGER NOT NULL, bytes INTEGER NOT NULL, parents TEXT NOT NULL,
            author TEXT, host TEXT, message TEXT, created TEXT NOT NULL,
            derived_from TEXT NOT NULL DEFAULT '[]', transform TEXT
        );
        CREATE INDEX commits_dataset ON commits (dataset, created);
        CREATE TABLE tags (
            dataset TEXT NOT NULL, name TEXT NOT NULL, commit_id TEXT NOT NULL, etag TEXT,
            PRIMARY KEY (dataset, name)
        );
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, user TEXT, host TEXT,
            action TEXT NOT NULL, dataset TEXT, commit_id TEXT, ref TEXT, site TEXT,
            details TEXT NOT NULL DEFAULT '{}', prev TEXT NOT NULL, hash TEXT NOT NULL
        );
        CREATE INDEX audit_dataset ON audit (dataset, action);
        CREATE TABLE cache_entries (
            site TEXT NOT NULL, commit_id TEXT NOT NULL, dataset TEXT NOT NULL, path TEXT NOT NULL,
            files INTEGER NOT NULL, bytes INTEGER NOT NULL, cached_at TEXT NOT NULL,
            PRIMARY KEY (site, commit_id)
        );
        """,
    ),
]
MIGRATIONS.append(
    (
        2,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """,
    )
)
MIGRATIONS.append(
    (
        3,
        """
        CREATE TABLE subscriptions (
            id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, ref TEXT NOT NULL,
            site TEXT NOT NULL, every REAL NOT NULL, created TEXT NOT NULL,
            UNIQUE (dataset, ref, site)
        );
        """,
    )
)
MIGRATIONS.append(
    (
        4,
        """
        ALTER TABLE audit ADD COLUMN origin TEXT;
        ALTER TABLE audit ADD COLUMN origin_seq INTEGER;
        ALTER TABLE audit ADD COLUMN shipped INTEGER NOT NULL DEFAULT 0;
        CREATE UNIQUE INDEX audit_origin ON audit (origin, origin_seq);
        CREATE TABLE runs (
            id TEXT PRIMARY KEY, user TEXT, host TEXT, site TEXT, started TEXT, ended TEXT,
            status TEXT, exit_code INTEGER, duration REAL, command TEXT, origin TEXT
        );
        CREATE TABLE run_inputs (
            run_id TEXT NOT NULL, dataset TEXT NOT NULL, commit_id TEXT NOT NULL, ref TEXT, site TEXT,
            time TEXT, PRIMARY KEY (run_id, commit_id)
        );
        CREATE TABLE run_outputs (
            run_id TEXT NOT NULL, dataset TEXT NOT NULL, commit_id TEXT NOT NULL, PRIMARY KEY (run_id, commit_id)
        );
        CREATE TABLE hash_cache (
            path TEXT PRIMARY KEY, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT
        );
        CREATE TABLE tombstones (
            commit_id TEXT PRIMARY KEY, dataset TEXT NOT NULL, reason TEXT, user TEXT, time TEXT
        );
        CREATE TABLE restores (commit_id TEXT, dataset TEXT, path TEXT, host TEXT, user TEXT, time TEXT);
        """,
    )
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


class Catalog:
    """One SQLite file; safe for several local processes (WAL, busy timeout)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.conn = conn
        self._origin: str | None = None
        self._migrate()

    def close(self) -> None:
        self.conn.close()

    @property
    def origin(self) -> str:
        """This catalog's id in audit trails that meet in the lake (made once, kept forever)."""
        if self._origin is None:
            value = self.get_meta("origin")
            if value is None:
                import uuid

                value = uuid.uuid4().hex[:16]
                self.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('origin', ?)", (value,))
                value = self.get_meta("origin")
                self.conn.execute("UPDATE audit SET origin = ?, origin_seq = seq WHERE origin IS NULL", (value,))
            self._origin = value
        return self._origin  # type: ignore[return-value]

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"catalog {self.path} has schema {version}, newer than this cachehub ({SCHEMA_VERSION}): upgrade cachehub"
            )
        for number, script in MIGRATIONS:
            if number <= version:
                continue
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if self.conn.execute("PRAGMA user_version").fetchone()[0] < number:
                    for statement in script.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version = {number}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def transaction(self) -> _Tx:
        """``with catalog.transaction():`` groups writes atomically."""
        return _Tx(self.conn)

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- commits and tags --------------------------------------------------------------------
    def add_commits(self, commits: Iterable[Commit]) -> None:
        commits = list(commits)
        if not commits:
            return
        self.conn.executemany(
            "INSERT OR REPLACE INTO commits (id, dataset, manifest, files, bytes, parents, author, host, message, created,"
            " derived_from, transform) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    c.id, c.dataset, c.manifest, c.files, c.bytes, json.dumps(list(c.parents)), c.author, c.host,
                    c.message, c.created, json.dumps(list(c.derived_from)), c.transform,
                )
                for c in commits
            ],
        )  # fmt: skip
        for c in commits:
            if c.run:  # lineage: the run that produced this commit
                self.conn.execute(
                    "INSERT OR IGNORE INTO run_outputs (run_id, dataset, commit_id) VALUES (?,?,?)", (c.run, c.dataset, c.id)
                )

    def touch_dataset(self, name: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO datasets (name, refreshed) VALUES (?, ?)", (name, now_iso()))

    def set_tag(self, tag: Tag, etag: str | None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO tags (dataset, name, commit_id, etag) VALUES (?,?,?,?)", (tag.dataset, tag.name, tag.commit, etag)
        )

    def replace_tags(self, dataset: str, tags: Iterable[Tag]) -> None:
        self.conn.execute("DELETE FROM tags WHERE dataset = ?", (dataset,))
        for tag in tags:
            self.set_tag(tag, None)

    def dataset_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM datasets ORDER BY name")]

    def has_dataset(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone() is not None

    def commit(self, commit_id: str) -> Commit | None:
        row = self.conn.execute("SELECT * FROM commits WHERE id = ?", (commit_id,)).fetchone()
        return self._commit(row) if row else None

    def commits_with_prefix(self, dataset: str, prefix: str) -> list[Commit]:
        rows = self.conn.execute(
            "SELECT * FROM commits WHERE dataset = ? AND id >= ? AND id < ? ORDER BY id",
            (dataset, prefix, prefix + "g"),
        ).fetchall()
        return [self._commit(r) for r in rows]

    def latest(self, dataset: str) -> Commit | None:
        row = self.conn.execute(
            "SELECT * FROM commits WHERE dataset = ? ORDER BY created DESC, id DESC LIMIT 1", (dataset,)
        ).fetchone()
        return self._commit(row) if row else None

    def log(self, dataset: str, limit: int | None = None) -> list[Commit]:
        sql = "SELECT * FROM commits WHERE dataset = ? ORDER BY created DESC, id DESC"
        params: tuple = (dataset,)
        if limit:
            sql += " LIMIT ?"
            params += (limit,)
        return [self._commit(r) for r in self.conn.execute(sql, params)]

    def tag(self, dataset: str, name: str) -> tuple[str, str | None] | None:
        row = self.conn.execute("SELECT commit_id, etag FROM tags WHERE dataset = ? AND name = ?", (dataset, name)).fetchone()
        return (row[0], row[1]) if row else None

    def tags(self, dataset: str) -> list[Tag]:
        rows = self.conn.execute("SELECT name, commit_id FROM tags WHERE dataset = ? ORDER BY name", (dataset,))
        return [Tag(dataset, r[0], r[1]) for r in rows]

    def tags_of(self, commit_id: str) -> tuple[str, ...]:
        rows = self.conn.execute("SELECT name FROM tags WHERE commit_id = ? ORDER BY name", (commit_id,))
        return tuple(r[0] for r in rows)

    def count_commits(self, dataset: str) -> int:
        return self.conn.execute("SELECT count(*) FROM commits WHERE dataset = ?", (dataset,)).fetchone()[0]

    def _commit(self, row: sqlite3.Row | tuple) -> Commit:
        (cid, dataset, manifest, files, nbytes, parents, author, host, message, created, derived, transform) = row
        return Commit(
            id=cid,
            dataset=dataset,
            manifest=manifest,
            files=files,
            bytes=nbytes,
            parents=tuple(json.loads(parents)),
            author=author or "",
            host=host or "",
            message=message or "",
            created=created,
            derived_from=tuple(json.loads(derived or "[]")),
            transform=transform,
            tags=self.tags_of(cid),
            run=self._run_of(cid),
        )

    def _run_of(self, commit_id: str) -> str | None:
        row = self.conn.execute("SELECT run_id FROM run_outputs WHERE commit_id = ? LIMIT 1", (commit_id,)).fetchone()
        return row[0] if row else None

    def clear_index(self) -> None:
        """Forget everything that is rebuilt from the lake and the sites (keeps the audit trail)."""
        for table in ("datasets", "commits", "tags", "cache_entries", "tombstones", "run_outputs"):
            self.conn.execute(f"DELETE FROM {table}")

    # -- cache entries -----------------------------------------------------------------------
    def add_cache_entry(self, entry: CacheEntry) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO cache_entries (site, commit_id, dataset, path, files, bytes, cached_at) VALUES (?,?,?,?,?,?,?)",
            (entry.site, entry.commit, entry.dataset, entry.path, entry.files, entry.bytes, entry.cached_at),
        )

    def remove_cache_entry(self, site: str, commit_id: str) -> None:
        self.conn.execute("DELETE FROM cache_entries WHERE site = ? AND commit_id = ?", (site, commit_id))

    def cache_entries(self, site: str | None = None) -> list[dict]:
        sql = "SELECT site, commit_id, dataset, path, files, bytes, cached_at FROM cache_entries"
        params: tuple = ()
        if site:
            sql += " WHERE site = ?"
            params = (site,)
        cols = ("site", "commit", "dataset", "path", "files", "bytes", "cached_at")
        return [dict(zip(cols, r, strict=True)) for r in self.conn.execute(sql + " ORDER BY site, cached_at", params)]

    # -- subscriptions (local state: kept by catalog rebuild) ---------------------------------
    def add_subscription(self, dataset: str, ref: str, site: str, every: float) -> int:
        self.conn.execute(
            "INSERT INTO subscriptions (dataset, ref, site, every, created) VALUES (?,?,?,?,?) "
            "ON CONFLICT (dataset, ref, site) DO UPDATE SET every = excluded.every",
            (dataset, ref, site, every, now_iso()),
        )
        row = self.conn.execute("SELECT id FROM subscriptions WHERE dataset=? AND ref=? AND site=?", (dataset, ref, site)).fetchone()
        return int(row[0])

    def remove_subscription(self, dataset: str, ref: str, site: str) -> bool:
        cur = self.conn.execute("DELETE FROM subscriptions WHERE dataset=? AND ref=? AND site=?", (dataset, ref, site))
        return cur.rowcount > 0

    def subscriptions(self) -> list[dict]:
        cols = ("id", "dataset", "ref", "site", "every", "created")
        rows = self.conn.execute("SELECT id, dataset, ref, site, every, created FROM subscriptions ORDER BY id")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def subscription(self, sub_id: int) -> dict | None:
        return next((s for s in self.subscriptions() if s["id"] == sub_id), None)

    # -- audit -------------------------------------------------------------------------------
    def audit(
        self,
        action: str,
        *,
        dataset: str | None = None,
        commit: str | None = None,
        ref: str | None = None,
        site: str | None = None,
        **details: object,
    ) -> None:
        """Append one event; each event's hash covers the previous one's (a hash chain)."""
        origin = self.origin
        with self.transaction():
            row = self.conn.execute(
                "SELECT hash, origin_seq FROM audit WHERE origin = ? ORDER BY origin_seq DESC LIMIT 1", (origin,)
            ).fetchone()
            prev, number = (row[0], row[1] + 1) if row else ("0" * 64, 1)
            event = {
                "time": now_iso(),
                "user": current_user(),
                "host": HOST,
                "action": action,
                "dataset": dataset,
                "commit": commit,
                "ref": ref,
                "site": site,
                "details": details,
            }
            digest = event_hash(prev, event)
            self.conn.execute(
                "INSERT INTO audit (time, user, host, action, dataset, commit_id, ref, site, details, prev, hash, origin, origin_seq)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    event["time"],
                    event["user"],
                    HOST,
                    action,
                    dataset,
                    commit,
                    ref,
                    site,
                    json.dumps(details, sort_keys=True),
                    prev,
                    digest,
                    origin,
                    number,
                ),
            )

    def audit_events(
        self,
        *,
        dataset: str | None = None,
        action: str | None = None,
        user: str | None = None,
        since: str | None = None,
        origin: str | None = None,
        commit: str | None = None,
    ) -> Iterator[dict]:
        """Audit events matching every given filter, oldest first (``since``: ISO time, inclusive)."""
        sql = (
            "SELECT seq, time, user, host, action, dataset, commit_id, ref, site, details, origin, origin_seq, prev, hash"
            " FROM audit WHERE 1=1"
        )
        params: list = []
        for column, value in (("dataset", dataset), ("action", action), ("user", user), ("origin", origin), ("commit_id", commit)):
            if value:
                sql += f" AND {column} = ?"
                params.append(value)
        if since:
            sql += " AND time >= ?"
            params.append(since)
        cols = ("seq", "time", "user", "host", "action", "dataset", "commit", "ref", "site", "details", "origin", "origin_seq", "prev", "hash")
        for row in self.conn.execute(sql + " ORDER BY time, seq", params):
            event = dict(zip(cols, row, strict=True))
            event["details"] = json.loads(event["details"])
            yield event


def event_hash(prev: str, event: dict) -> str:
    """The chain link: SHA-256 over the previous event's hash and this event's canonical JSON."""
    return hashlib.sha256(prev.encode() + canonical_json(event)).hexdigest()


class _Tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.depth_started = False

    def __enter__(self) -> sqlite3.Connection:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.depth_started = True
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self.depth_started:
            return
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


__all__ = ["Catalog", "CachehubError"]
